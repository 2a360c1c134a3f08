"""Choose documents to follow through training: a docs file for --probe_docs and score_checkpoints.

A document of a token folder's val split is a BOS/end-of-text token and the tokens up to the next one
(DESIGN.md contract 2); documents are numbered 0, 1, ... in file order. Pick them

  by index         python -m nanogpt.data.select_docs DATA_DIR --out docs.npz --indices 0,7,42
  at random        python -m nanogpt.data.select_docs DATA_DIR --out docs.npz --random 20 --seed 1
  by length        python -m nanogpt.data.select_docs DATA_DIR --out docs.npz --min_length 200 --max_length 1000
                   (all of them; with --random N, N of them)
  from text        python -m nanogpt.data.select_docs DATA_DIR --out docs.npz --text strings.txt
                   (one document per non-empty line, encoded with the folder's tokenizer after a BOS token)

Lengths count tokens, the leading BOS included. The file records each document's tokens, where it came from
(val file, offset of its BOS, length) and a hash of the content (printed; runs record it in probes/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nanogpt.data.common import DataError, run_main
from nanogpt.data.shards import find_split, open_tokens, read_meta
from nanogpt.probe_store import Docs, ProbeError, make_docs, write_docs

GPT2_EOT = 50256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nanogpt.data.select_docs", description=__doc__.split("\n", 1)[0],
        epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="a prepared token folder (its val split is read)")
    parser.add_argument("--out", required=True, help="the docs file to write (.npz); an existing file is kept "
                                                     "unless --force")
    parser.add_argument("--indices", help="comma-separated document numbers of the val split, e.g. 0,7,42")
    parser.add_argument("--random", type=int, metavar="N", help="N documents drawn at random (without repeats)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument("--min_length", type=int, help="only documents of at least this many tokens")
    parser.add_argument("--max_length", type=int, help="only documents of at most this many tokens")
    parser.add_argument("--text", help="a text file: one document per non-empty line, encoded with the folder's "
                                       "tokenizer")
    parser.add_argument("--bos_id", type=int, help="the document separator (default: the folder's corpus.json "
                                                   "eot_id, else GPT-2's 50256)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def check_args(args) -> None:
    ranged = args.min_length is not None or args.max_length is not None
    modes = [name for name, given in (("--indices", args.indices), ("--random", args.random is not None),
                                      ("--text", args.text)) if given]
    if not modes and not ranged:
        raise DataError("choose documents: --indices I,J,..., --random N, --min_length/--max_length, or --text FILE")
    if len(modes) > 1:
        raise DataError(f"{' and '.join(modes)}: give one way of choosing documents")
    if ranged and modes and modes[0] != "--random":
        raise DataError(f"{modes[0]} picks exact documents; --min_length/--max_length go alone or with --random")
    if args.random is not None and args.random < 1:
        raise DataError(f"--random {args.random}: must be at least 1")
    for name in ("min_length", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise DataError(f"--{name} {value}: a document needs at least 2 tokens (its BOS and one to predict)")
    if args.min_length is not None and args.max_length is not None and args.min_length > args.max_length:
        raise DataError(f"--min_length {args.min_length} exceeds --max_length {args.max_length}")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"{out}: exists; give another --out, or --force to replace it")
    if not out.parent.is_dir():
        raise DataError(f"{out.parent}: no such directory for --out")
    if args.text and not Path(args.text).is_file():
        raise DataError(f"--text {args.text}: file not found")


class ValSplit:
    """The documents of a folder's val split: where each starts and how long it is (tokens before the first BOS
    belong to no document; a document may run on from one file into the next)."""

    def __init__(self, data_dir: Path, bos_id: int):
        self.files = find_split(data_dir, "val")
        self.arrays = [open_tokens(f) for f in self.files]
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.bases = np.concatenate([[0], np.cumsum(sizes)])
        self.starts = np.concatenate([np.flatnonzero(np.asarray(a) == bos_id) + base
                                      for a, base in zip(self.arrays, self.bases[:-1], strict=True)]).astype(np.int64)
        self.lengths = np.diff(np.append(self.starts, self.bases[-1]))

    def __len__(self) -> int:
        return len(self.starts)

    def tokens(self, i: int) -> np.ndarray:
        start, end = int(self.starts[i]), int(self.starts[i] + self.lengths[i])
        pieces = []
        for array, base in zip(self.arrays, self.bases[:-1], strict=True):
            lo, hi = max(start, base), min(end, base + len(array))
            if lo < hi:
                pieces.append(np.asarray(array[lo - base:hi - base]))
        return np.concatenate(pieces).astype(np.int64)

    def source(self, i: int) -> tuple[str, int]:
        file_index = int(np.searchsorted(self.bases, self.starts[i], side="right")) - 1
        return self.files[file_index].name, int(self.starts[i] - self.bases[file_index])


def pick(split: ValSplit, args, where: str) -> list[int]:
    count = len(split)
    if args.indices:
        try:
            chosen = [int(s) for s in args.indices.split(",")]
        except ValueError:
            raise DataError(f"--indices {args.indices!r}: not a comma-separated list of numbers") from None
        outside = [i for i in chosen if not 0 <= i < count]
        if outside:
            raise DataError(f"--indices {outside}: out of range; the val split of {where} holds {count} documents "
                            f"(0..{count - 1})")
        return chosen
    candidates = np.arange(count)
    if args.min_length is not None or args.max_length is not None:
        low, high = args.min_length or 2, args.max_length or np.iinfo(np.int64).max
        candidates = np.flatnonzero((split.lengths >= low) & (split.lengths <= high))
        if not len(candidates):
            raise DataError(f"no document of the {count} in the val split of {where} has a length in [{low}, "
                            f"{args.max_length if args.max_length is not None else 'any'}] tokens (they run from "
                            f"{split.lengths.min()} to {split.lengths.max()})")
    if args.random is not None:
        if args.random > len(candidates):
            raise DataError(f"--random {args.random}: only {len(candidates)} documents to draw from in {where}")
        rng = np.random.default_rng(args.seed)
        candidates = np.sort(rng.choice(candidates, size=args.random, replace=False))
    return [int(i) for i in candidates]


def select(args) -> Docs:
    data_dir = Path(args.data_dir)
    meta = read_meta(data_dir) if data_dir.is_dir() else {}
    selection = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "force") and v is not None}
    common = {"data_dir": str(data_dir.resolve()), "vocab_size": meta.get("vocab_size"),
              "tokenizer": meta.get("tokenizer"), "selection": selection}
    if args.text:
        from nanogpt.data.tokenizer import load_tokenizer

        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: data directory not found (its tokenizer encodes --text)")
        tokenizer = load_tokenizer(data_dir)
        lines = [line for line in Path(args.text).read_text().splitlines() if line.strip()]
        if not lines:
            raise DataError(f"--text {args.text}: no non-empty line (one document per line)")
        documents = [np.array([tokenizer.eot_id] + tokenizer.encode(line), dtype=np.int64) for line in lines]
        return make_docs(documents, [""] * len(documents), [-1] * len(documents),
                         common | {"bos_id": tokenizer.eot_id, "tokenizer": tokenizer.name})
    bos_id = args.bos_id if args.bos_id is not None else int(meta.get("eot_id", GPT2_EOT))
    split = ValSplit(data_dir, bos_id)
    if not len(split):
        raise DataError(f"{data_dir}: its val split ({', '.join(f.name for f in split.files)}) holds no document "
                        f"(no BOS token {bos_id}; --bos_id sets another)")
    chosen = pick(split, args, str(data_dir))
    sources = [split.source(i) for i in chosen]
    return make_docs([split.tokens(i) for i in chosen], [s[0] for s in sources], [s[1] for s in sources],
                     common | {"bos_id": bos_id, "indices": chosen})


def main(argv=None) -> Docs:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        docs = select(args)
    except ProbeError as e:
        raise DataError(str(e)) from None
    write_docs(args.out, docs)
    print(f"{args.out}: {len(docs)} documents, {len(docs.tokens):,} tokens (lengths {docs.lengths.min()}.."
          f"{docs.lengths.max()}), sha256 {docs.sha256}")
    print(json.dumps({"documents": len(docs), "tokens": int(len(docs.tokens)), "sha256": docs.sha256}))
    return docs


if __name__ == "__main__":
    run_main(main)
