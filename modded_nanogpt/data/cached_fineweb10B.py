"""Download the speedrun's data: the cached FineWeb10B GPT-2 token shards from the Hugging Face Hub.

    python -m modded_nanogpt.data.cached_fineweb10B                # val + 9 train shards (~2 GB), enough for the speedrun
    python -m modded_nanogpt.data.cached_fineweb10B 103            # all of FineWeb10B (~21 GB)
    python -m modded_nanogpt.data.cached_fineweb10B 9 --out /shared/data/fineweb10B
    HF_ENDPOINT=https://my-mirror python -m modded_nanogpt.data.cached_fineweb10B

Fetches `fineweb_val_000000.bin` and `fineweb_train_000001.bin` .. `fineweb_train_{N:06d}.bin` of the
dataset repo `kjj0/fineweb10B-gpt2` (100M tokens per shard, 103 train shards) with huggingface-hub.
They already are the project's shard format (DESIGN.md, contract 2).

Destination: `--out`, else `$DATA_PATH/fineweb10B`, else `$DATA_DIR/fineweb10B`, else ./data/fineweb10B.

Safe to rerun: a file already there whose header and size check out is kept without any network
access; an invalid or truncated one is deleted and downloaded again. A transfer cut off midway is
resumed by huggingface-hub within the run (a Range request from where it stopped); a run that is
killed starts the file it was on over. Every downloaded file's header and size are checked.

No Hub here? Set HF_ENDPOINT to a mirror, or copy the shards into the destination by hand (rerun
this to check them); with HF_HUB_OFFLINE=1 it makes no network access and lists what is missing.
HF_HUB_ETAG_TIMEOUT (default here 10 s) and HF_HUB_DOWNLOAD_TIMEOUT (30 s) bound the waits.
Errors (bad arguments, unreachable Hub, invalid file) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from nanogpt.data.shards import ShardError, read_shard_header

REPO_ID = "kjj0/fineweb10B-gpt2"
NUM_TRAIN_SHARDS = 103  # in the dataset
DEFAULT_TRAIN_SHARDS = 9  # ~900M tokens: what the speedrun reads
VAL_FILE = "fineweb_val_000000.bin"
HUB_TIMEOUTS_S = {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "30"}


class DownloadError(Exception):
    """A shard that could not be fetched or is invalid; the message names the file."""


def shard_names(num_train_shards: int) -> list[str]:
    return [VAL_FILE] + [f"fineweb_train_{index:06d}.bin" for index in range(1, num_train_shards + 1)]


def destination(out: Path | None, environ=None) -> tuple[Path, str]:
    """The output folder and why it is that one."""
    environ = os.environ if environ is None else environ  # looked up now: tests and callers may replace it
    if out is not None:
        return out, "--out"
    for name in ("DATA_PATH", "DATA_DIR"):
        if environ.get(name):
            return Path(environ[name]) / "fineweb10B", f"${name}={environ[name]}"
    return Path("data") / "fineweb10B", "default; set --out, DATA_PATH or DATA_DIR to choose"


def _num_train_shards(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= NUM_TRAIN_SHARDS:
        raise argparse.ArgumentTypeError(f"{count} is outside 1..{NUM_TRAIN_SHARDS} (the dataset's train shards)")
    return count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modded_nanogpt.data.cached_fineweb10B",
        description="Download the cached FineWeb10B GPT-2 token shards (val + the first N train shards).",
    )
    parser.add_argument("num_train_shards", metavar="N", nargs="?", type=_num_train_shards,
                        default=DEFAULT_TRAIN_SHARDS,
                        help=f"train shards of 100M tokens to fetch, 1..{NUM_TRAIN_SHARDS} (default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $DATA_PATH/fineweb10B, else $DATA_DIR/fineweb10B, else ./data/fineweb10B)")
    parser.add_argument("--repo_id", default=REPO_ID, help=f"Hugging Face dataset repo (default {REPO_ID})")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the repo (default main)")
    return parser.parse_args(argv)


def _complete_token_count(path: Path) -> int | None:
    """The token count of a complete shard at `path`; None if absent. An invalid one is deleted."""
    if not path.exists():
        return None
    try:
        return read_shard_header(path)
    except ShardError as e:
        print(f"{path.name}: present but invalid, downloading it again ({e})", flush=True)
        path.unlink()  # else huggingface-hub would take the file as already downloaded
        return None


def _hub_help(endpoint: str, repo_id: str, revision: str, name: str, out_dir: Path) -> str:
    where = "HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else "the default; set HF_ENDPOINT for a mirror"
    return (
        f"could not fetch {name} of dataset {repo_id}@{revision} from {endpoint} ({where}). "
        f"Set HF_ENDPOINT to a reachable Hub mirror, or copy the shards by hand into {out_dir} and rerun "
        "(present files are checked without network; HF_HUB_OFFLINE=1 makes no network access at all)"
    )


class _Hub:
    """huggingface-hub, imported only when a file has to be fetched (so its timeouts can be set first)."""

    def __init__(self, repo_id: str, revision: str, out_dir: Path):
        for name, seconds in HUB_TIMEOUTS_S.items():
            os.environ.setdefault(name, seconds)  # read by huggingface_hub.constants at import
        import httpx2
        import huggingface_hub
        from huggingface_hub import constants, errors

        self.hub, self.constants = huggingface_hub, constants
        self.network_errors = (httpx2.HTTPError, errors.HfHubHTTPError, errors.LocalEntryNotFoundError)
        self.repo_id, self.revision, self.out_dir = repo_id, revision, out_dir
        self.endpoint = constants.ENDPOINT
        self.checked_reachable = False

    def _fail(self, name: str, error: Exception) -> DownloadError:
        cause = f"{type(error).__name__}: {error}".splitlines()[0]
        return DownloadError(f"{_hub_help(self.endpoint, self.repo_id, self.revision, name, self.out_dir)}. Cause: {cause}")

    def _check_reachable(self, name: str) -> None:
        """One HEAD with no retries, so a closed network fails in seconds (hf_hub_download would retry
        with backoff, for minutes where packets are dropped)."""
        url = self.hub.hf_hub_url(self.repo_id, name, repo_type="dataset", revision=self.revision)
        try:
            self.hub.get_hf_file_metadata(url, timeout=self.constants.HF_HUB_ETAG_TIMEOUT)
        except self.network_errors as e:
            raise self._fail(name, e) from e
        self.checked_reachable = True

    def download(self, name: str) -> Path:
        if self.constants.HF_HUB_OFFLINE:
            raise DownloadError(
                f"{self.out_dir / name} is missing and HF_HUB_OFFLINE is set: copy it there by hand, or unset"
                f" HF_HUB_OFFLINE to download it from {self.endpoint}"
            )
        if not self.checked_reachable:
            self._check_reachable(name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            local = self.hub.hf_hub_download(
                self.repo_id, name, repo_type="dataset", revision=self.revision, local_dir=self.out_dir
            )
        except self.network_errors as e:
            raise self._fail(name, e) from e
        except OSError as e:  # a short transfer after hub's retries, a full disk...
            raise DownloadError(f"{self.out_dir / name}: download from {self.endpoint} failed: {e}") from e
        return Path(local)


def main(argv=None) -> dict:
    """Fetch what is missing; returns {"directory", "files", "downloaded", "tokens"}."""
    args = parse_args(argv)
    out_dir, reason = destination(args.out)
    print(f"destination: {out_dir} ({reason})", flush=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise DownloadError(f"{out_dir}: exists and is not a directory")
    names = shard_names(args.num_train_shards)
    hub, downloaded, total_tokens = None, [], 0
    for position, name in enumerate(names, start=1):
        path = out_dir / name
        tokens = _complete_token_count(path)
        if tokens is not None:
            print(f"[{position}/{len(names)}] {name}: ok (present, {tokens:,} tokens)", flush=True)
        else:
            hub = hub or _Hub(args.repo_id, args.revision, out_dir)
            print(f"[{position}/{len(names)}] {name}: downloading from {hub.endpoint} ({args.repo_id}@{args.revision})",
                  flush=True)
            hub.download(name)
            try:
                tokens = read_shard_header(path)
            except ShardError as e:
                path.unlink(missing_ok=True)  # never leave an invalid shard where the trainer would read it
                raise DownloadError(f"downloaded {name} from {hub.endpoint} ({args.repo_id}@{args.revision})"
                                    f" is not a valid token shard, removed it: {e}") from e
            downloaded.append(name)
            print(f"[{position}/{len(names)}] {name}: ok ({tokens:,} tokens)", flush=True)
        total_tokens += tokens
    print(f"done: {len(names)} files ({len(downloaded)} downloaded, {len(names) - len(downloaded)} already present),"
          f" {total_tokens:,} tokens in {out_dir}", flush=True)
    return {"directory": str(out_dir), "files": names, "downloaded": downloaded, "tokens": total_tokens}


if __name__ == "__main__":
    # On SIGTERM (scancel, timeouts) unwind like Ctrl-C, so huggingface-hub deletes its partial file.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
