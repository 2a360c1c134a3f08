"""Tiny Shakespeare at the character level, as NanoGPT's train.bin / val.bin + meta.pkl.

    python -m nanogpt.data.shakespeare_char [--out DIR] [--url URL | --input FILE] [--val_fraction 0.1]

Output (default DIR: $DATA_DIR/shakespeare_char, DATA_DIR defaulting to ./data):
    input.txt            the downloaded text (kept: reruns reuse it; not written with --input)
    train.bin, val.bin   uint16 character ids, no header: the first 90% of the text, then the last 10%
    meta.pkl             {'vocab_size', 'itos', 'stoi'}: the sorted distinct characters (65 for this text)

The vocabulary has no end-of-text token, as in NanoGPT: the text is one document.
Offline: --input path/to/input.txt (any UTF-8 text works).
"""

from __future__ import annotations

import pickle

from nanogpt.data.common import atomic_write_bytes, run_main
from nanogpt.data.shakespeare import build_parser, check_args, read_text, write_bins
from nanogpt.data.tokenizer import char_tokenizer


def main(argv=None) -> dict:
    """Prepare character-level Tiny Shakespeare; returns the token counts per split and the vocab size."""
    parser = build_parser("shakespeare_char", "Tiny Shakespeare -> character ids (NanoGPT's train.bin/val.bin/meta.pkl).")
    args = parser.parse_args(argv)
    check_args(args, "shakespeare_char", keeps_meta_pkl=True)
    text = read_text(args)
    tokenizer = char_tokenizer(text, with_eot=False)  # the vocabulary of the whole text, val's characters too
    counts = write_bins(args.out, text, tokenizer, args.val_fraction)
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "itos": dict(enumerate(tokenizer.chars)),
        "stoi": {char: index for index, char in enumerate(tokenizer.chars)},
    }
    atomic_write_bytes(args.out / "meta.pkl", pickle.dumps(meta))
    print(
        f"{args.out}: {len(text):,} characters, vocab {tokenizer.vocab_size} -> "
        f"train {counts['train']:,} / val {counts['val']:,} tokens"
    )
    return {**counts, "vocab_size": tokenizer.vocab_size}


if __name__ == "__main__":
    run_main(main)
