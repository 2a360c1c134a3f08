"""Token files: the headered shard format shared by every corpus, and NanoGPT's headerless .bin.

Shard format (DESIGN.md, contract 2): a header of 256 little-endian int32 -- [0] = 20240520
(magic), [1] = 1 (version), [2] = number of tokens -- then the tokens as little-endian uint16.
One document is an end-of-text/BOS token followed by its tokens. The FineWeb10B cached shards
(`fineweb_val_000000.bin`, `fineweb_train_000001.bin`, ...) are exactly this; so is what
`nanogpt.data.text_corpus` writes (`val_000000.bin`, `train_000001.bin`, ...).

NanoGPT's own `train.bin`/`val.bin` are bare uint16 tokens with no header (`meta.pkl` beside
them holds the vocabulary of character-level sets).

Every reader checks what it reads and names the file in its error. Both trainers read token files through
this module (the speedrun's loader too), so the format is checked by one piece of code.
"""

from __future__ import annotations

import glob
import os
import pickle
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16  # tokens are stored as uint16


class ShardError(ValueError):
    """A token file that is missing, malformed or inconsistent; the message names the file."""


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write `tokens` (any int sequence with values < 65536) as one shard, atomically.

    Returns the number of tokens written. The file appears under its final name only once it is
    complete (temp file + rename), so a reader never sees a half-written shard.
    """
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ShardError(f"{path}: tokens must be one-dimensional, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= MAX_VOCAB):
        raise ShardError(f"{path}: token ids must lie in [0, {MAX_VOCAB}), got [{array.min()}, {array.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, array.size
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(array.astype(TOKEN_DTYPE, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return int(array.size)


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(
            f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); not a token shard"
            " (NanoGPT's headerless files must be named train.bin/val.bin)"
        )
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if num_tokens < 0 or size != expected:
        raise ShardError(
            f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes"
            " (truncated or still being written?)"
        )
    return num_tokens


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a validated shard's tokens (read-only uint16)."""
    num_tokens = read_shard_header(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def open_bin(path: str | os.PathLike) -> np.memmap:
    """Memory-map one of NanoGPT's headerless uint16 files (train.bin / val.bin)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: token file not found")
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
        raise ShardError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(8), dtype="<i4")
    if head.size == 2 and head[0] == SHARD_MAGIC and head[1] == SHARD_VERSION:
        raise ShardError(f"{path}: has a shard header; name it like a shard (e.g. train_000001.bin) instead")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def _data_dir(data_dir: str | os.PathLike) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"{data_dir}: data directory not found (prepare data first, e.g. python -m nanogpt.data.text_corpus)")
    return data_dir


def _shards(data_dir: Path, split: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(data_dir / f"*{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin")))


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The headered shards of one split ('train' or 'val') in `data_dir`: every `*{split}_NNNNNN.bin`, by name."""
    shards = _shards(_data_dir(data_dir), split)
    if not shards:
        raise ShardError(f"{data_dir}: no {split} shards (expected files matching *{split}_NNNNNN.bin)")
    return shards


def find_split(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The token files of one split ('train' or 'val') in `data_dir`, in order.

    NanoGPT's `{split}.bin` wins when present; otherwise every `*{split}_NNNNNN.bin` shard.
    """
    plain = _data_dir(data_dir) / f"{split}.bin"
    if plain.is_file():
        return [plain]
    shards = _shards(Path(data_dir), split)
    if not shards:
        raise ShardError(f"{data_dir}: no {split} data (expected {split}.bin or *{split}_000000.bin shards)")
    return shards


def open_tokens(path: Path) -> np.memmap:
    """Open either kind of token file by its name: `train.bin`/`val.bin` headerless, else a shard."""
    return open_bin(path) if path.name in ("train.bin", "val.bin") else open_shard(path)


def check_token_ids(files: list[Path], vocab_size: int, tokens_needed: int | None = None,
                    chunk: int = 1 << 26) -> None:
    """The token ids of `files` are below vocab_size, read once in chunks, file after file until tokens_needed
    tokens are covered (None: every file): an id the embedding cannot look up otherwise fails later as an
    IndexError (a device-side assert on a GPU), or as a misleading loader error, far from its cause. The error
    names the file, the largest id and the vocabulary."""
    covered = 0
    for path in files:
        if tokens_needed is not None and covered >= tokens_needed:
            return
        tokens = open_tokens(Path(path))
        covered += len(tokens)
        largest = max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)
        if largest >= vocab_size:
            raise ShardError(f"{path}: token id {largest} is outside the vocabulary of {vocab_size} (a shard of "
                             "another tokenizer? set --vocab_size, or prepare the data again)")


def read_meta(data_dir: str | os.PathLike) -> dict:
    """Vocabulary facts of a data directory: from corpus.json (text_corpus) or meta.pkl (NanoGPT).

    Returns {} when neither exists (e.g. FineWeb shards, which use GPT-2's 50257 tokens).
    """
    data_dir = Path(data_dir)
    corpus_json = data_dir / "corpus.json"
    if corpus_json.is_file():
        import json

        try:
            return json.loads(corpus_json.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{corpus_json}: not valid JSON ({e})") from e
    meta_pkl = data_dir / "meta.pkl"
    if meta_pkl.is_file():
        with open(meta_pkl, "rb") as f:
            try:
                return pickle.load(f)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                raise ShardError(f"{meta_pkl}: cannot be read ({e})") from e
    return {}
