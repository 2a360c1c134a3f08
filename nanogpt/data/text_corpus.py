"""Turn any folder of text files into token shards: the offline corpus every machine has.

    python -m nanogpt.data.text_corpus --source DIR --out DIR --tokenizer char|bpe|gpt2|auto \
        [--vocab_size N] [--val_fraction F] [--shard_tokens N] [--seed S] \
        [--extensions .py,.txt,...] [--max_files N] [--max_bytes N] [--overwrite]

Default source: the running Python's standard library (without site-packages); default output:
$DATA_DIR/stdlib_<tokenizer> (DATA_DIR defaults to ./data). Examples:

    python -m nanogpt.data.text_corpus --tokenizer char                  # ~30 MB of stdlib, characters
    python -m nanogpt.data.text_corpus --tokenizer bpe --vocab_size 4096 # byte-level BPE trained on it
    python -m nanogpt.data.text_corpus --source ~/papers --out data/papers --tokenizer gpt2

Each text file is one document, stored as the end-of-text token followed by the file's tokens.
Documents go to val or train by a seeded hash of their relative path (at least one in each), in
that hash's order (a fixed shuffle). Output, in the shard format of nanogpt.data.shards:

    val_000000.bin [val_000001.bin ...] train_00000K.bin ...   shards of --shard_tokens tokens
    corpus.json                                                vocabulary, counts, shard names, settings
    tokenizer_char.json | tokenizer.json                       the char / BPE vocabulary (none for gpt2)

The same input and settings give byte-identical output. Rerunning into a folder that holds the same
corpus does nothing; a folder holding another corpus is refused unless --overwrite, which then
replaces only the corpus's own files (shards, corpus.json, tokenizer file) once the new one is
complete. Token files of other kinds there (train.bin, fineweb_train_000001.bin, ...) are always
refused, since readers would mix them in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.data.common import DataError, data_root, run_main
from nanogpt.data.shards import MAX_VOCAB, ShardError, read_shard_header, write_shard
from nanogpt.data.tokenizer import (
    BPE_FILE,
    CHAR_FILE,
    GPT2Unavailable,
    Tokenizer,
    char_tokenizer,
    gpt2_tokenizer,
    train_bpe,
)

FORMAT_VERSION = 1
DEFAULT_EXTENSIONS = (
    ".py", ".pyi", ".txt", ".rst", ".md", ".toml", ".cfg", ".ini", ".sh",
    ".c", ".h", ".cpp", ".hpp", ".js", ".css", ".html", ".tex",
)
# Installed third-party packages and caches are not the text a user points us at.
DEFAULT_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__")
DEFAULT_BPE_VOCAB = 4096
ENCODE_BATCH_BYTES = 8 << 20  # text handed to the tokenizer at once: big enough for its threads, bounded memory
OWN_FILE = re.compile(r"^(corpus\.json|tokenizer(_char)?\.json|(train|val)_\d{6}\.bin)(\.tmp)?$")
# Files that nanogpt.data.shards.find_split would read as part of this folder's data.
TOKEN_FILE = re.compile(r"^((train|val)\.bin|.*(train|val)_\d{6}\.bin)$")


class CorpusError(DataError):
    """Bad source, settings or output folder for a text corpus."""


@dataclass
class Document:
    relpath: str  # POSIX path relative to the source: names the document in splits and errors
    path: Path
    num_bytes: int
    sha1: bytes  # of the file's bytes when scanned; checked again when encoded
    split_key: float  # seeded hash in [0, 1): below val_fraction -> val; also the order inside a split


# -- finding and reading the documents --------------------------------------------------------------

def default_source() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def parse_extensions(text: str) -> tuple[str, ...] | None:
    """'.py,txt' -> ('.py', '.txt'); '*' -> None (every file, binaries still skipped)."""
    if text.strip() == "*":
        return None
    extensions = sorted({"." + part.strip().lstrip(".").lower() for part in text.split(",") if part.strip()})
    if not extensions:
        raise CorpusError(f"--extensions {text!r} names no extension")
    return tuple(extensions)


def list_candidates(source: Path, extensions: tuple[str, ...] | None, exclude_dirs: tuple[str, ...]) -> list[str]:
    """Relative paths of the files to look at, sorted. Hidden and excluded folders are skipped; links to
    folders are not followed (no cycles), links to files are."""
    found = []
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude_dirs)
        for name in files:
            if name.startswith("."):
                continue
            if extensions is not None and os.path.splitext(name)[1].lower() not in extensions:
                continue
            path = Path(root) / name
            if path.is_file():
                found.append(path.relative_to(source).as_posix())
    return sorted(found)


def split_key(relpath: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def decode_text(data: bytes) -> str | None:
    """The file's text, or None for binary (a NUL byte) and non-UTF-8 files."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def scan_documents(source: Path, relpaths: list[str], seed: int, max_files: int | None,
                   max_bytes: int | None) -> tuple[list[Document], dict, str]:
    """Read every candidate once: keep the text files (within the caps), count the skipped ones, and
    hash the kept content. Returns (documents, skipped counts, content sha256)."""
    documents: list[Document] = []
    skipped = {"binary_or_non_utf8": 0, "empty": 0, "unreadable": 0}
    content_hash = hashlib.sha256()
    total_bytes = 0
    for relpath in tqdm(relpaths, desc="scan", unit="file"):
        path = source / relpath
        try:
            data = path.read_bytes()
        except OSError:  # permission denied, vanished since listed: not a document we can use
            skipped["unreadable"] += 1
            continue
        if not data:
            skipped["empty"] += 1
            continue
        if decode_text(data) is None:
            skipped["binary_or_non_utf8"] += 1
            continue
        if max_bytes is not None and total_bytes + len(data) > max_bytes:
            break  # the first files in path order that fit the cap: a prefix, so reruns agree
        total_bytes += len(data)
        digest = hashlib.sha1(data).digest()
        content_hash.update(f"{relpath}\0{len(data)}\0".encode() + digest)
        documents.append(Document(relpath, path, len(data), digest, split_key(relpath, seed)))
        if max_files is not None and len(documents) >= max_files:
            break
    return documents, skipped, content_hash.hexdigest()


def split_documents(documents: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val), each in split-key order; at least one document in each."""
    ordered = sorted(documents, key=lambda d: (d.split_key, d.relpath))
    num_val = sum(d.split_key < val_fraction for d in ordered)
    num_val = min(max(num_val, 1), len(ordered) - 1)  # keys are sorted, so val is a prefix
    return ordered[num_val:], ordered[:num_val]


def read_texts(documents: list[Document]) -> Iterator[str]:
    for document in documents:
        data = document.path.read_bytes()
        if hashlib.sha1(data).digest() != document.sha1:
            raise CorpusError(f"{document.path}: changed while the corpus was being prepared; run again")
        yield data.decode("utf-8")


# -- writing ----------------------------------------------------------------------------------------

class ShardWriter:
    """Cuts a stream of token arrays into shards of exactly `shard_tokens` (the last one shorter)."""

    def __init__(self, out_dir: Path, split: str, first_index: int, shard_tokens: int):
        self.out_dir, self.split, self.index, self.shard_tokens = out_dir, split, first_index, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.names: list[str] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray):
        self.pending.append(tokens.astype(np.uint16))
        self.pending_tokens += tokens.size
        self.num_tokens += tokens.size
        if self.pending_tokens >= self.shard_tokens:
            flat = np.concatenate(self.pending)
            start = 0
            while flat.size - start >= self.shard_tokens:
                self._write(flat[start:start + self.shard_tokens])
                start += self.shard_tokens
            self.pending = [flat[start:]]
            self.pending_tokens = flat.size - start

    def close(self) -> list[str]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return self.names

    def _write(self, tokens: np.ndarray):
        name = f"{self.split}_{self.index:06d}.bin"
        write_shard(self.out_dir / name, tokens)
        self.names.append(name)
        self.index += 1


def batches_by_bytes(documents: list[Document], limit: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for document in documents:
        batch.append(document)
        size += document.num_bytes
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def split_text(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of at most max_chars characters, cut after a newline where one falls in the
    piece (else at max_chars); joined, they give the text back."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start, start + max_chars)
        end = cut + 1 if cut >= start else start + max_chars
        pieces.append(text[start:end])
        start = end
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces


def encode_split(tokenizer: Tokenizer, documents: list[Document], writer: ShardWriter, split: str,
                 doc_chars: int | None = None) -> int:
    """Each document -> [eot] + its tokens, appended to the writer; with doc_chars, each piece of at most
    doc_chars characters of a file is its own document. One progress bar per split; returns the count."""
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    count = 0
    with tqdm(total=sum(d.num_bytes for d in documents), desc=f"encode {split}", unit="B", unit_scale=True) as bar:
        for batch in batches_by_bytes(documents, ENCODE_BATCH_BYTES):
            texts = list(read_texts(batch))
            if doc_chars:
                texts = [piece for text in texts for piece in split_text(text, doc_chars)]
            for tokens in tokenizer.encode_documents(texts):
                writer.add(np.concatenate([eot, tokens]))
            count += len(texts)
            bar.update(sum(d.num_bytes for d in batch))
    return count


# -- the output folder ------------------------------------------------------------------------------

def existing_corpus(out_dir: Path) -> tuple[list[Path], dict | None]:
    """(this preparer's files in out_dir, its corpus.json or None); refuses foreign token files."""
    if not out_dir.exists():
        return [], None
    if not out_dir.is_dir():
        raise CorpusError(f"{out_dir}: --out exists and is not a directory")
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    foreign = [n for n in names if TOKEN_FILE.match(n) and not OWN_FILE.match(n)]
    if foreign:
        raise CorpusError(
            f"{out_dir}: holds token files of another kind ({', '.join(foreign)}) that readers would mix with "
            "this corpus; choose another --out or move them away"
        )
    own = [out_dir / n for n in names if OWN_FILE.match(n)]
    meta = None
    if (out_dir / "corpus.json").is_file():
        try:
            meta = json.loads((out_dir / "corpus.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
    return own, meta


def is_complete(out_dir: Path, meta: dict, own: list[Path]) -> bool:
    """Whether the corpus that `meta` describes is all there, and nothing of ours beside it."""
    try:
        listed = {"corpus.json"} | set(meta["shards"]["train"]) | set(meta["shards"]["val"])
        if meta.get("tokenizer_file"):
            listed.add(meta["tokenizer_file"])
        if {p.name for p in own} != listed:
            return False
        counted = {
            split: sum(read_shard_header(out_dir / name) for name in meta["shards"][split]) for split in ("train", "val")
        }
    except (ShardError, KeyError, TypeError):
        return False
    return counted == meta["num_tokens"]


def install(staging: Path, out_dir: Path, old_files: list[Path]):
    """Replace the old corpus by the staged one: corpus.json goes first and comes back last, so a reader
    never takes a mix of old and new shards for a whole corpus."""
    new_names = sorted(p.name for p in staging.iterdir())
    (out_dir / "corpus.json").unlink(missing_ok=True)
    for old in old_files:
        if old.name not in new_names:
            old.unlink(missing_ok=True)
    for name in new_names:
        if name != "corpus.json":
            os.replace(staging / name, out_dir / name)
    os.replace(staging / "corpus.json", out_dir / "corpus.json")


# -- main -------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nanogpt.data.text_corpus",
        description="Tokenize a folder of text files (default: the Python standard library) into token shards.",
    )
    parser.add_argument("--source", type=Path, default=None, help="folder of text files (default: the stdlib)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $DATA_DIR/stdlib_<tokenizer> or $DATA_DIR/<source name>_<tokenizer>)")
    parser.add_argument("--tokenizer", choices=("char", "bpe", "gpt2", "auto"), default="char",
                        help="char: characters; bpe: byte-level BPE trained on the train split; gpt2: tiktoken's GPT-2; "
                             "auto: gpt2 when its files can be had, else bpe")
    parser.add_argument("--vocab_size", type=int, default=None, help=f"BPE vocabulary size (default {DEFAULT_BPE_VOCAB})")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of documents in val (default 0.05)")
    parser.add_argument("--shard_tokens", type=positive_int, default=100_000_000, help="tokens per shard (default 100M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split and document order")
    parser.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS),
                        help="comma-separated file extensions to read, or '*' for all files (binaries are skipped)")
    parser.add_argument("--exclude_dirs", default=",".join(DEFAULT_EXCLUDE_DIRS),
                        help="comma-separated folder names not to descend into (hidden folders are always skipped)")
    parser.add_argument("--max_files", type=positive_int, default=None, help="use at most this many documents")
    parser.add_argument("--max_bytes", type=positive_int, default=None, help="use at most this many bytes of text")
    parser.add_argument("--doc_chars", type=positive_int, default=None,
                        help="cut files into documents of at most this many characters (at line ends; the split "
                             "into train and val stays by file). Default: a document is a file")
    parser.add_argument("--overwrite", action="store_true", help="replace a different corpus already in --out")
    return parser


def check_args(args) -> dict:
    """Validate everything that needs no reading; returns the settings recorded in corpus.json."""
    if args.source is None:
        args.source = default_source()
    if not args.source.exists():
        raise CorpusError(f"{args.source}: --source not found")
    if not args.source.is_dir():
        raise CorpusError(f"{args.source}: --source is not a directory")
    args.source = args.source.resolve()
    if args.tokenizer in ("bpe", "auto"):  # auto may end up training a BPE
        args.vocab_size = DEFAULT_BPE_VOCAB if args.vocab_size is None else args.vocab_size
        if not 257 <= args.vocab_size <= MAX_VOCAB:
            raise CorpusError(
                f"--vocab_size {args.vocab_size} must lie in [257, {MAX_VOCAB}] for bpe: 256 byte tokens + "
                "end-of-text, and token ids are stored as uint16"
            )
    elif args.vocab_size is not None:
        raise CorpusError(f"--vocab_size applies to --tokenizer bpe (or auto) only; the {args.tokenizer} vocabulary is fixed")
    if not 0.0 < args.val_fraction < 1.0:
        raise CorpusError(f"--val_fraction {args.val_fraction} must lie strictly between 0 and 1")
    extensions = parse_extensions(args.extensions)
    exclude_dirs = tuple(sorted({d.strip() for d in args.exclude_dirs.split(",") if d.strip()}))
    if args.out is None:
        stem = "stdlib" if args.source == default_source().resolve() else args.source.name
        args.out = data_root() / f"{stem}_{args.tokenizer}"
    return {
        "format_version": FORMAT_VERSION, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
        "val_fraction": args.val_fraction, "shard_tokens": args.shard_tokens, "seed": args.seed,
        "extensions": list(extensions) if extensions is not None else "*", "exclude_dirs": list(exclude_dirs),
        "max_files": args.max_files, "max_bytes": args.max_bytes,
        **({"doc_chars": args.doc_chars} if args.doc_chars else {}),  # absent by default: older corpora still match
    }


def main(argv=None) -> dict:
    """Prepare the corpus; returns its corpus.json contents."""
    args = build_parser().parse_args(argv)
    settings = check_args(args)
    own_files, old_meta = existing_corpus(args.out)
    same_settings = bool(old_meta) and old_meta.get("settings") == settings and old_meta.get("source") == str(args.source)
    if own_files and not args.overwrite and not same_settings:
        what = describe_difference(old_meta, str(args.source), settings) if old_meta else "leftover corpus files"
        raise CorpusError(
            f"{args.out}: already holds {what}; pass --overwrite to replace it (only "
            f"{', '.join(p.name for p in own_files[:4])}{' ...' if len(own_files) > 4 else ''} are removed) "
            "or choose another --out"
        )
    wants_gpt2 = args.tokenizer in ("gpt2", "auto")
    # Before any work, since a missing GPT-2 is the likeliest failure; unless the corpus may be there already.
    tokenizer = pick_gpt2(args) if wants_gpt2 and not same_settings else None
    started = time.time()
    documents, scan_summary = find_documents(args, settings)
    if same_settings and old_meta.get("content_sha256") == scan_summary["content_sha256"] \
            and is_complete(args.out, old_meta, own_files) and not args.overwrite:
        print(f"{args.out}: already holds this corpus (same source content and settings); nothing to do")
        return old_meta
    if own_files and not args.overwrite:
        raise CorpusError(
            f"{args.out}: holds a corpus of {args.source} with these settings but other content (the source "
            "changed, or the corpus is incomplete); pass --overwrite to replace it or choose another --out"
        )
    if tokenizer is None and wants_gpt2:
        tokenizer = pick_gpt2(args)
    meta = write_corpus(args, settings, tokenizer, documents, scan_summary, own_files)
    num_tokens, num_bytes = meta["num_tokens"], meta["num_bytes"]
    print(
        f"{args.out}: {len(documents)} files, {sum(meta['num_documents'].values())} documents "
        f"({num_bytes['train'] + num_bytes['val']:,} bytes) -> "
        f"{num_tokens['train'] + num_tokens['val']:,} {meta['tokenizer']} tokens (vocab {meta['vocab_size']}; "
        f"train {num_tokens['train']:,}, val {num_tokens['val']:,}) in "
        f"{len(meta['shards']['train']) + len(meta['shards']['val'])} shard(s), {time.time() - started:.1f} s"
    )
    return meta


def find_documents(args, settings: dict) -> tuple[list[Document], dict]:
    """The source's text documents (at least 2) and what the scan saw: file count, skips, content hash."""
    extensions = None if settings["extensions"] == "*" else tuple(settings["extensions"])
    relpaths = list_candidates(args.source, extensions, tuple(settings["exclude_dirs"]))
    if not relpaths:
        raise CorpusError(f"{args.source}: no files with extensions {settings['extensions']} (see --extensions)")
    documents, skipped, content_sha256 = scan_documents(args.source, relpaths, args.seed, args.max_files,
                                                        args.max_bytes)
    if len(documents) < 2:
        raise CorpusError(
            f"{args.source}: {len(documents)} text document(s) found ({skipped} skipped); need at least 2, one "
            "for train and one for val"
        )
    return documents, {"num_files_seen": len(relpaths), "skipped_files": skipped, "content_sha256": content_sha256}


def write_corpus(args, settings: dict, tokenizer: Tokenizer | None, documents: list[Document], scan_summary: dict,
                 own_files: list[Path]) -> dict:
    """Tokenize into a staging folder inside --out, then swap it in for the old corpus; returns corpus.json."""
    train_docs, val_docs = split_documents(documents, args.val_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".text_corpus-staging-", dir=args.out))
    try:
        tokenizer, tokenizer_file = make_tokenizer(args, tokenizer, documents, train_docs, staging)
        val_writer = ShardWriter(staging, "val", 0, args.shard_tokens)
        val_count = encode_split(tokenizer, val_docs, val_writer, "val", args.doc_chars)
        val_names = val_writer.close()
        train_writer = ShardWriter(staging, "train", len(val_names), args.shard_tokens)
        train_count = encode_split(tokenizer, train_docs, train_writer, "train", args.doc_chars)
        train_names = train_writer.close()
        meta = {
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "tokenizer": tokenizer.name,
            "tokenizer_file": tokenizer_file,
            "num_tokens": {"train": train_writer.num_tokens, "val": val_writer.num_tokens},
            "num_documents": {"train": train_count, "val": val_count},
            "num_files": {"train": len(train_docs), "val": len(val_docs)},
            "num_bytes": {"train": sum(d.num_bytes for d in train_docs), "val": sum(d.num_bytes for d in val_docs)},
            "shards": {"train": train_names, "val": val_names},
            "source": str(args.source),
            **scan_summary,
            "document_layout": "each document is eot_id followed by its tokens" + (
                f"; a document is a piece of at most {args.doc_chars} characters of a file" if args.doc_chars else
                "; a document is a file"),
            "settings": settings,
            "created_by": "nanogpt.data.text_corpus",
        }
        (staging / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
        install(staging, args.out, own_files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def describe_difference(old_meta: dict, source: str, settings: dict) -> str:
    old_settings = old_meta.get("settings") if isinstance(old_meta.get("settings"), dict) else {}
    changed = [f"source {old_meta.get('source')} (now {source})"] if old_meta.get("source") != source else []
    changed += [f"{key}={old_settings.get(key)!r} (now {value!r})" for key, value in settings.items()
                if old_settings.get(key) != value]
    return "a corpus prepared with other settings: " + ", ".join(changed)


def pick_gpt2(args) -> Tokenizer | None:
    """GPT-2 for --tokenizer gpt2 (or its clear error); for auto, GPT-2 if it can be had, else None (-> bpe)."""
    try:
        return gpt2_tokenizer(suggestion="prepare with --tokenizer bpe or --tokenizer char")
    except GPT2Unavailable as e:
        if args.tokenizer == "gpt2":
            raise
        print(f"--tokenizer auto: GPT-2 unavailable ({str(e).split(':')[0]}); training a byte-level BPE instead")
        return None


def make_tokenizer(args, tokenizer: Tokenizer | None, documents, train_docs, staging: Path):
    """(tokenizer, its file name in the output folder or None)."""
    if tokenizer is not None:
        return tokenizer, None
    if args.tokenizer == "char":
        chars: set[str] = set()
        for text in tqdm(read_texts(documents), total=len(documents), desc="characters", unit="file"):
            chars.update(text)  # val's characters too: every document must be encodable
        tokenizer = char_tokenizer(chars)
        tokenizer.save(staging / CHAR_FILE)
        return tokenizer, CHAR_FILE
    # bpe (or auto without GPT-2): trained on train documents only, so val stays unseen.
    return train_bpe(read_texts(train_docs), args.vocab_size, staging / BPE_FILE), BPE_FILE


if __name__ == "__main__":
    run_main(main)
