"""modded_nanogpt.data.cached_fineweb10B: the real huggingface-hub download path, against a local
Hub-compatible HTTP server the test starts (HF_ENDPOINT points the command at it).

What huggingface-hub 2.4.0's hf_hub_download(..., repo_type="dataset", local_dir=...) asks of the Hub
for an LFS file such as a shard, and what `LocalHub` answers:
  HEAD {hub}/datasets/{repo}/resolve/{revision}/{name}
      -> 302, Location: {cdn}/{name}, X-Repo-Commit, X-Linked-Etag (sha256), X-Linked-Size.
         The cdn is another port, so another origin: hub takes the metadata from the 302 itself, as it
         does for the Hub's real CDN redirects. No X-Xet-Hash header, so hub takes the plain HTTP path.
  GET {cdn}/{name} -> 200 with the bytes; with `Range: bytes=K-` -> 206 with the rest (hub's resume).
Unknown repos, revisions or files get 404 with the Hub's X-Error-Code header.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modded_nanogpt.data import cached_fineweb10B
from nanogpt.data.shards import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_ID = cached_fineweb10B.REPO_ID
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VAL, TRAIN_1, TRAIN_2 = "fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"


def shard_bytes(num_tokens: int, seed: int, magic: int = SHARD_MAGIC) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, SHARD_VERSION, num_tokens
    tokens = np.random.default_rng(seed).integers(0, 50257, size=num_tokens).astype("<u2")
    return header.tobytes() + tokens.tobytes()


class LocalHub:
    """The Hub's resolve endpoint plus a CDN, on two ports of 127.0.0.1; logs every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_first_get: dict[str, int] = {}  # name -> bytes sent before the first GET's connection drops
        self.requests: list[tuple[str, str, str, str | None]] = []  # (method, "hub"|"cdn", name, Range)
        self.lock = threading.Lock()
        self.cdn = self._serve("cdn")
        self.hub = self._serve("hub")
        self.url = self._url(self.hub)

    @staticmethod
    def _url(httpd) -> str:
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    def _serve(self, role: str):
        local_hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                local_hub._answer(self, role, send_body=False)

            def do_GET(self):
                local_hub._answer(self, role, send_body=True)

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return httpd

    def _answer(self, request, role: str, send_body: bool) -> None:
        resolve_prefix = f"/datasets/{REPO_ID}/resolve/"
        path = request.path.split("?")[0]
        if role == "hub":
            revision, _, name = path.removeprefix(resolve_prefix).partition("/")
            found = path.startswith(resolve_prefix) and revision in ("main", COMMIT) and name in self.files
        else:
            name = path.removeprefix("/")
            found = name in self.files
        with self.lock:
            self.requests.append((request.command, role, name, request.headers.get("Range")))
            cut = self.cut_first_get.pop(name, None) if send_body and role == "cdn" else None
        if not found:
            request.send_response(404)
            request.send_header("X-Error-Code", "EntryNotFound" if path.startswith(resolve_prefix) else "RepoNotFound")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        body = self.files[name]
        if role == "hub":
            request.send_response(302)
            request.send_header("Location", f"{self._url(self.cdn)}/{name}?signature=local")
            request.send_header("X-Repo-Commit", COMMIT)
            request.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')
            request.send_header("X-Linked-Size", str(len(body)))
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range") or ""):
            start = int(match.group(1))
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            request.send_response(200)
        request.send_header("Content-Length", str(len(body) - start))
        request.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        request.send_header("Accept-Ranges", "bytes")
        request.end_headers()
        if send_body:
            # HTTP/1.0: the connection closes after the answer, so a cut answer ends short of its Content-Length.
            request.wfile.write(body[start:] if cut is None else body[:cut])

    def gets(self) -> list[str]:
        return [name for method, role, name, _ in self.requests if method == "GET"]

    def close(self) -> None:
        for httpd in (self.hub, self.cdn):
            httpd.shutdown()
            httpd.server_close()


@pytest.fixture
def files():
    return {VAL: shard_bytes(300, seed=0), TRAIN_1: shard_bytes(500, seed=1), TRAIN_2: shard_bytes(700, seed=2)}


@pytest.fixture
def local_hub(files):
    hub = LocalHub(files)
    yield hub
    hub.close()


def run_cli(args, endpoint: str, tmp_path: Path, timeout: float = 60, **extra_env):
    """The command as users run it, in a fresh process whose huggingface-hub talks to `endpoint`."""
    env = {key: value for key, value in os.environ.items()
           if not key.lower().endswith("_proxy") and key not in ("HF_HUB_OFFLINE", "HF_TOKEN", "DATA_PATH", "DATA_DIR")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "modded_nanogpt.data.cached_fineweb10B", *map(str, args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.bin"))


def test_downloads_then_reruns_without_network(local_hub, files, tmp_path):
    out = tmp_path / "fineweb10B"
    first = run_cli([2, "--out", out], local_hub.url, tmp_path)
    assert first.returncode == 0, first.stderr
    assert shard_files(out) == [TRAIN_1, TRAIN_2, VAL]
    for name in (VAL, TRAIN_1, TRAIN_2):
        assert (out / name).read_bytes() == files[name]
    assert sorted(local_hub.gets()) == [TRAIN_1, TRAIN_2, VAL]
    assert f"destination: {out} (--out)" in first.stdout
    assert f"done: 3 files (3 downloaded, 0 already present), 1,500 tokens in {out}" in first.stdout
    assert not list(out.rglob("*.incomplete"))

    requests_before = len(local_hub.requests)
    second = run_cli([2, "--out", out], local_hub.url, tmp_path)
    assert second.returncode == 0, second.stderr
    assert len(local_hub.requests) == requests_before  # not even a HEAD
    assert second.stdout.count("ok (present") == 3
    assert "(0 downloaded, 3 already present), 1,500 tokens" in second.stdout

    (out / TRAIN_2).unlink()
    offline = run_cli([2, "--out", out], local_hub.url, tmp_path, HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and len(local_hub.requests) == requests_before
    assert f"error: {out / TRAIN_2} is missing and HF_HUB_OFFLINE is set" in offline.stderr


def test_invalid_local_files_are_downloaded_again(local_hub, files, tmp_path):
    out = tmp_path / "out"
    assert run_cli([2, "--out", out], local_hub.url, tmp_path).returncode == 0
    # huggingface-hub's own record (out/.cache/huggingface) still says these two are downloaded.
    (out / TRAIN_1).write_bytes(files[TRAIN_1][:-10])  # truncated
    (out / TRAIN_2).write_bytes(shard_bytes(700, seed=2, magic=7))  # not a shard
    gets_before = len(local_hub.gets())
    result = run_cli([2, "--out", out], local_hub.url, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(local_hub.gets()[gets_before:]) == [TRAIN_1, TRAIN_2]
    for name in (VAL, TRAIN_1, TRAIN_2):
        assert (out / name).read_bytes() == files[name]
    assert re.search(rf"{TRAIN_1}: present but invalid, downloading it again .*truncated", result.stdout)
    assert re.search(rf"{TRAIN_2}: present but invalid, downloading it again .*bad magic", result.stdout)
    assert "(2 downloaded, 1 already present)" in result.stdout


def test_a_served_file_that_is_not_a_shard_fails_naming_it(local_hub, files, tmp_path):
    files[TRAIN_1] = shard_bytes(500, seed=1, magic=12345)
    out = tmp_path / "out"
    result = run_cli([2, "--out", out], local_hub.url, tmp_path)
    assert result.returncode == 2
    assert re.search(rf"error: downloaded {TRAIN_1} from {re.escape(local_hub.url)} .*bad magic number 12345",
                     result.stderr)
    assert "Traceback" not in result.stderr
    assert shard_files(out) == [VAL]  # the invalid file was removed; the run stopped there
    assert TRAIN_2 not in local_hub.gets()


def test_unreachable_hub_fails_fast_naming_endpoint_and_file(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_cli([1, "--out", out], dead_endpoint, tmp_path, timeout=30)
    assert time.monotonic() - started < 10  # hf_hub_download alone would retry with backoff for ~25 s
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: could not fetch") and "Traceback" not in result.stderr
    for part in (dead_endpoint, VAL, REPO_ID, "HF_ENDPOINT", "HF_HUB_OFFLINE", "copy the shards by hand", str(out)):
        assert part in message
    assert not out.exists()


def test_interrupted_transfer_resumes_within_the_run(tmp_path):
    # hub yields a GET's bytes to its file in 10 MiB chunks: cut after the first chunk so that part is kept.
    chunk = 10 * 1024 * 1024
    files = {VAL: shard_bytes(300, seed=0), TRAIN_1: shard_bytes(chunk // 2 + 100_000, seed=1)}
    local_hub = LocalHub(files)
    local_hub.cut_first_get[TRAIN_1] = chunk + 1000
    try:
        result = run_cli([1, "--out", tmp_path / "out"], local_hub.url, tmp_path)
    finally:
        local_hub.close()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / TRAIN_1).read_bytes() == files[TRAIN_1]
    train_gets = [range_ for method, role, name, range_ in local_hub.requests if method == "GET" and name == TRAIN_1]
    assert train_gets == [None, f"bytes={chunk}-"]


@pytest.mark.parametrize("bad", ["0", "104", "abc"])
def test_bad_shard_count_exits_2_before_anything(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cached_fineweb10B.main([bad, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert re.search(r"argument N: .*" + re.escape(bad), capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def write_present_shards(folder: Path, num_train: int) -> None:
    folder.mkdir(parents=True)
    for index, name in enumerate(cached_fineweb10B.shard_names(num_train)):
        (folder / name).write_bytes(shard_bytes(10 + index, seed=index))


@pytest.mark.parametrize("setting", ["out", "DATA_PATH", "DATA_DIR", "default"])
def test_destination_resolution(setting, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_PATH", raising=False)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data_dir"))  # loses to --out and DATA_PATH
    argv = ["1"]
    expected, reason = {
        "out": (tmp_path / "chosen", "(--out)"),
        "DATA_PATH": (tmp_path / "data_path" / "fineweb10B", f"($DATA_PATH={tmp_path / 'data_path'})"),
        "DATA_DIR": (tmp_path / "data_dir" / "fineweb10B", f"($DATA_DIR={tmp_path / 'data_dir'})"),
        "default": (Path("data") / "fineweb10B", "(default;"),
    }[setting]
    if setting == "out":
        argv += ["--out", str(expected)]
    elif setting == "DATA_PATH":
        monkeypatch.setenv("DATA_PATH", str(tmp_path / "data_path"))
    elif setting == "default":
        monkeypatch.setenv("DATA_DIR", "")
    # Every file already there: main() must neither fetch nor even ask the Hub.
    write_present_shards(tmp_path / expected, num_train=1)
    summary = cached_fineweb10B.main(argv)
    assert summary == {"directory": str(expected), "files": [VAL, TRAIN_1], "downloaded": [], "tokens": 10 + 11}
    output = capsys.readouterr().out
    assert f"destination: {expected} {reason}" in output
    assert output.count("ok (present") == 2
