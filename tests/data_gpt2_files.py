"""A tiny vocabulary in GPT-2's release format (vocab.bpe + encoder.json), for offline GPT-2 tests.

Written from GPT-2's published byte-to-unicode scheme, independently of the code under test: 256
byte tokens, then a few merges; NANOGPT_GPT2_TOKENIZER_DIR pointed at the folder gives a
"GPT-2" tokenizer with 256 + len(MERGES) + 1 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

# Merges in priority order, as byte strings of their two parts.
MERGES = [(b"h", b"e"), (b"l", b"l"), (b" ", b"t"), (b"he", b"ll"), (b" t", b"he"), (b"o", b"r"), (b" ", b"w")]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's mapping of bytes to printable characters: printable Latin-1 bytes stand for themselves,
    the others take the characters from U+0100 on, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_gpt2_files(directory: Path) -> dict[bytes, int]:
    """Write vocab.bpe and encoder.json into `directory`; return the token ranks (bytes -> id)."""
    directory.mkdir(parents=True, exist_ok=True)
    to_unicode = byte_to_unicode()

    def render(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    # Byte tokens are ranked in the order of the mapping above: printable ones first, then the rest.
    byte_order = sorted(range(256), key=lambda b: ord(to_unicode[b]))
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    for first, second in MERGES:
        ranks[first + second] = len(ranks)
    lines = ["#version: 0.2"] + [f"{render(a)} {render(b)}" for a, b in MERGES]
    (directory / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    encoder = {render(token): rank for token, rank in ranks.items()}
    encoder["<|endoftext|>"] = len(ranks)
    (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    return ranks
