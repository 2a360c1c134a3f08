"""OpenWebText (or any text dataset) with GPT-2's tokenizer, as NanoGPT's headerless train.bin / val.bin.

    python -m nanogpt.data.openwebtext [--out DIR] [--num_proc N] [--dataset NAME|PATH] [--data_files GLOB ...]

Output (default DIR: $DATA_DIR/openwebtext, DATA_DIR defaulting to ./data): train.bin and val.bin,
uint16 GPT-2 tokens without a header, each document followed by end-of-text (50256). A seeded
0.0005 of the documents is val. For the full set (8M documents, ~9B train tokens, ~17 GB) this takes
hours and ~80 GB of HF cache (set --cache_dir or HF_HOME to a big shared disk).

Sources, all read through the same datasets.load_dataset call:
    --dataset openwebtext                        the HF hub dataset (default; needs hub access)
    --dataset openwebtext --revision refs/convert/parquet   if the hub copy is script-based
    --data_files 'dir/*.jsonl' [--dataset json]  local json/jsonl/parquet/txt files (builder from the suffix)
    --dataset path/to/folder                     a local folder of data files

GPT-2's tokenizer files must be at hand (tiktoken's cache or $NANOGPT_GPT2_TOKENIZER_DIR).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.data.common import DataError, check_bin_out_dir, data_root, run_main
from nanogpt.data.tokenizer import GPT2Tokenizer, gpt2_tokenizer

BUILDER_OF_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
LOCAL_BUILDERS = ("json", "parquet", "text", "csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.data.openwebtext",
                                     description="A text dataset -> GPT-2 tokens (NanoGPT's train.bin/val.bin).")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $DATA_DIR/openwebtext)")
    parser.add_argument("--dataset", default="openwebtext",
                        help="HF hub dataset name, a local folder, or a builder (json/parquet/text/csv) for --data_files")
    parser.add_argument("--data_files", nargs="+", default=None, help="local data files or globs")
    parser.add_argument("--revision", default=None, help="hub revision of --dataset (e.g. refs/convert/parquet)")
    parser.add_argument("--split", default="train", help="split of the dataset to read (default train)")
    parser.add_argument("--text_column", default="text", help="column holding the documents (default text)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="processes for loading and tokenizing (default: half the CPUs)")
    parser.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents in val (0.0005)")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val split")
    parser.add_argument("--cache_dir", default=None, help="HF datasets cache (default: HF_HOME's)")
    parser.add_argument("--write_batches", type=int, default=1024, help="pieces each .bin is written in")
    return parser


def resolve_source(args) -> tuple[str, dict]:
    """(path argument of load_dataset, its data_files keyword); checks local files before any work."""
    if args.data_files:
        files = []
        for pattern in args.data_files:
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matches:
                raise DataError(f"--data_files {pattern}: matches no file")
            files += matches
        if args.dataset in LOCAL_BUILDERS:
            return args.dataset, {"data_files": files}
        suffixes = {Path(f.removesuffix(".gz")).suffix.lower() for f in files}
        builders = {BUILDER_OF_SUFFIX.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise DataError(
                f"--data_files: cannot tell the file format from the suffixes {sorted(suffixes)}; "
                f"pass --dataset {'|'.join(LOCAL_BUILDERS)}"
            )
        return builders.pop(), {"data_files": files}
    return args.dataset, {}


def tokenize_batch(batch: dict, tokenizer: GPT2Tokenizer, text_column: str) -> dict:
    """datasets.map function: GPT-2 tokens of each document, end-of-text appended (NanoGPT's layout)."""
    token_lists = tokenizer.encoding.encode_ordinary_batch(batch[text_column], num_threads=1)
    for tokens in token_lists:
        tokens.append(tokenizer.eot_id)
    return {"ids": token_lists, "len": [len(tokens) for tokens in token_lists]}


def write_bin(dataset, path: Path, num_batches: int) -> int:
    """Concatenate the 'ids' of `dataset` into a uint16 file, in contiguous pieces; returns the token count."""
    total = int(np.sum(dataset.with_format("numpy")["len"], dtype=np.int64))
    tmp = path.with_name(path.name + ".tmp")
    tokens = np.memmap(tmp, dtype="<u2", mode="w+", shape=(total,))
    num_batches = max(1, min(num_batches, len(dataset)))
    position = 0
    for index in tqdm(range(num_batches), desc=f"writing {path.name}", unit="piece"):
        piece = dataset.shard(num_shards=num_batches, index=index, contiguous=True).with_format("numpy")
        chunk = np.concatenate(list(piece["ids"]))
        tokens[position:position + chunk.size] = chunk
        position += chunk.size
    tokens.flush()
    del tokens
    if position != total:
        raise DataError(f"{path}: wrote {position} tokens but the dataset counts {total}")
    os.replace(tmp, path)
    return total


def load_documents(args, path: str, load_kwargs: dict):
    """The split of the dataset to tokenize, checked to have the text column and at least 2 documents."""
    import datasets

    try:
        loaded = datasets.load_dataset(path, revision=args.revision, cache_dir=args.cache_dir,
                                       num_proc=args.num_proc, **load_kwargs)
    except Exception as e:  # noqa: BLE001 - hub, network and format errors all end here; say which source
        hint = ("script-based on the hub? try --revision refs/convert/parquet" if "script" in str(e)
                else "no access to the hub? pass --data_files with local json/parquet/txt files")
        raise DataError(f"--dataset {args.dataset}: could not be loaded ({hint}): {type(e).__name__}: {e}") from e
    if args.split not in loaded:
        raise DataError(f"--dataset {args.dataset}: has no split {args.split!r} (splits: {sorted(loaded)})")
    documents = loaded[args.split]
    if args.text_column not in documents.column_names:
        raise DataError(
            f"--dataset {args.dataset}: has no column {args.text_column!r} (columns: {documents.column_names}); "
            "see --text_column"
        )
    if len(documents) < 2:
        raise DataError(f"--dataset {args.dataset}: {len(documents)} document(s); need at least 2 (train and val)")
    return documents


def main(argv=None) -> dict:
    """Prepare the dataset; returns the token and document counts per split."""
    args = build_parser().parse_args(argv)
    out_dir = args.out or data_root() / "openwebtext"
    check_bin_out_dir(out_dir, keeps_meta_pkl=False)
    if not 0.0 < args.val_fraction < 1.0:
        raise DataError(f"--val_fraction {args.val_fraction} must lie strictly between 0 and 1")
    if args.num_proc < 1 or args.write_batches < 1:
        raise DataError("--num_proc and --write_batches must be at least 1")
    path, load_kwargs = resolve_source(args)
    tokenizer = gpt2_tokenizer(suggestion="prepare an offline corpus instead: python -m nanogpt.data.text_corpus "
                               "--tokenizer bpe")

    import datasets

    documents = load_documents(args, path, load_kwargs)
    try:
        splits = documents.train_test_split(test_size=args.val_fraction, seed=args.seed, shuffle=True)
    except ValueError as e:  # e.g. a val share that leaves no train document
        raise DataError(f"--val_fraction {args.val_fraction} cannot split {len(documents)} documents: {e}") from e
    splits["val"] = splits.pop("test")
    features = datasets.Features({"ids": datasets.List(datasets.Value("uint16")), "len": datasets.Value("int64")})
    tokenized = {}
    for name, split in splits.items():
        # An explicit fingerprint: datasets' own hash of the function would not see which GPT-2 files
        # the tokenizer came from, and could serve a cached map made with other ones.
        fingerprint = hashlib.sha256(
            f"{split._fingerprint}|{tokenizer.fingerprint}|{args.text_column}|eot-after|v1".encode()
        ).hexdigest()[:32]
        tokenized[name] = split.map(
            tokenize_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "text_column": args.text_column},
            remove_columns=split.column_names, features=features, num_proc=min(args.num_proc, len(split)),
            new_fingerprint=fingerprint, desc=f"tokenizing {name}",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in ("train", "val"):
        result[f"{name}_tokens"] = write_bin(tokenized[name], out_dir / f"{name}.bin", args.write_batches)
        result[f"{name}_documents"] = len(tokenized[name])
    print(f"{out_dir}: train {result['train_tokens']:,} tokens ({result['train_documents']:,} documents), "
          f"val {result['val_tokens']:,} tokens ({result['val_documents']:,} documents)")
    return result


if __name__ == "__main__":
    run_main(main)
