"""Small pieces shared by the data preparers: the error type, default output roots, atomic writes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from nanogpt.data.shards import ShardError


class DataError(Exception):
    """Bad input to a preparer (missing source, bad option, conflicting output); the message names it."""


def data_root() -> Path:
    """Root under which preparers put their default output folders: $DATA_DIR, else ./data."""
    return Path(os.environ.get("DATA_DIR") or "data")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` only ever holds a complete file (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_bin_out_dir(out_dir: Path, keeps_meta_pkl: bool) -> None:
    """Refuse an output folder whose other files would change how NanoGPT's train.bin/val.bin are read.

    The tokenizer of a data folder comes from corpus.json first, then meta.pkl, then GPT-2
    (nanogpt.data.tokenizer.load_tokenizer). A corpus.json left there would win over what we write,
    and so would a meta.pkl when we write GPT-2 tokens.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: output path exists and is not a directory")
    culprits = [out_dir / "corpus.json"] + ([] if keeps_meta_pkl else [out_dir / "meta.pkl"])
    for culprit in culprits:
        if culprit.exists():
            raise DataError(
                f"{culprit}: this folder holds another corpus's vocabulary file, which would be used instead of "
                f"the one this preparer writes; choose another --out or remove {culprit.name}"
            )


def run_main(main: Callable[[], object]) -> None:
    """Run a preparer's main() as a command: known input errors print one line and exit 1, no traceback."""
    try:
        main()
    except (DataError, ShardError) as e:
        sys.exit(f"error: {e}")
