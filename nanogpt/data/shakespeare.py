"""Tiny Shakespeare with GPT-2's tokenizer, as NanoGPT's headerless train.bin / val.bin.

    python -m nanogpt.data.shakespeare [--out DIR] [--url URL | --input FILE] [--val_fraction 0.1]

Output (default DIR: $DATA_DIR/shakespeare, DATA_DIR defaulting to ./data):
    input.txt            the downloaded text (kept: reruns reuse it; not written with --input)
    train.bin, val.bin   uint16 GPT-2 tokens, no header: the first 90% of the text, then the last 10%

GPT-2's tokenizer files must be at hand (tiktoken's cache or $NANOGPT_GPT2_TOKENIZER_DIR);
without them use the character-level set: python -m nanogpt.data.shakespeare_char.
This module also holds what both Shakespeare preparers share (the source of the text, the split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nanogpt.data.common import DataError, atomic_write_bytes, check_bin_out_dir, data_root, run_main
from nanogpt.data.download import download
from nanogpt.data.shards import MAX_VOCAB
from nanogpt.data.tokenizer import Tokenizer, gpt2_tokenizer

# The tiny Shakespeare text of char-rnn (~1.1 MB, 40k lines).
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def build_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m nanogpt.data.{name}", description=description)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: $DATA_DIR/{name})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", default=SHAKESPEARE_URL, help="where to download input.txt from")
    source.add_argument("--input", type=Path, default=None, help="use this local text file instead of downloading")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last share of the text is val (0.1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="download timeout per attempt, seconds")
    parser.add_argument("--retries", type=int, default=3, help="download attempts")
    parser.add_argument("--force_download", action="store_true", help="download again even if input.txt exists")
    return parser


def check_args(args, name: str, keeps_meta_pkl: bool):
    if args.out is None:
        args.out = data_root() / name
    if not 0.0 < args.val_fraction < 1.0:
        raise DataError(f"--val_fraction {args.val_fraction} must lie strictly between 0 and 1")
    if args.input is not None and not args.input.is_file():
        raise DataError(f"{args.input}: --input file not found")
    check_bin_out_dir(args.out, keeps_meta_pkl=keeps_meta_pkl)


def read_text(args) -> str:
    """The text: --input, else out/input.txt from an earlier run, else downloaded from --url."""
    if args.input is not None:
        path = args.input
    else:
        path = args.out / "input.txt"
        if args.force_download or not path.is_file():
            download(args.url, path, timeout_s=args.timeout, retries=args.retries)
        else:
            print(f"{path}: using the copy from an earlier run (--force_download to fetch it again)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if not text:
        raise DataError(f"{path}: is empty")
    return text


def write_bins(out_dir: Path, text: str, tokenizer: Tokenizer, val_fraction: float) -> dict:
    """Split the text by position (first 1 - val_fraction for train), encode both parts, write the .bin files."""
    cut = int(len(text) * (1.0 - val_fraction))
    if cut == 0 or cut == len(text):
        raise DataError(f"{len(text)} characters are too few to split with --val_fraction {val_fraction}")
    if tokenizer.vocab_size > MAX_VOCAB:
        raise DataError(f"vocabulary of {tokenizer.vocab_size} tokens does not fit uint16 files")
    counts = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        tokens = np.asarray(tokenizer.encode(part), dtype=np.uint16)
        atomic_write_bytes(out_dir / f"{split}.bin", tokens.astype("<u2").tobytes())
        counts[split] = int(tokens.size)
    return counts


def main(argv=None) -> dict:
    """Prepare GPT-2-tokenized Tiny Shakespeare; returns the token counts per split."""
    args = build_parser("shakespeare", "Tiny Shakespeare -> GPT-2 tokens (NanoGPT's train.bin/val.bin).").parse_args(argv)
    check_args(args, "shakespeare", keeps_meta_pkl=False)
    tokenizer = gpt2_tokenizer(suggestion="use the character-level set: python -m nanogpt.data.shakespeare_char")
    text = read_text(args)
    counts = write_bins(args.out, text, tokenizer, args.val_fraction)
    print(f"{args.out}: {len(text):,} characters -> train {counts['train']:,} / val {counts['val']:,} GPT-2 tokens")
    return counts


if __name__ == "__main__":
    run_main(main)
