"""Tokenizers of the baseline's data: one loader for preparers and sampling, three constructors.

    load_tokenizer(data_dir)        what a prepared data folder was tokenized with:
                                    corpus.json (char / bpe / gpt2), else NanoGPT's meta.pkl (characters),
                                    else GPT-2 (e.g. FineWeb shards or OpenWebText's train.bin)
    char_tokenizer(chars)           sorted distinct characters + an end-of-text token at the end
    train_bpe(texts, vocab_size, save_path)   byte-level BPE trained with HF `tokenizers`
    gpt2_tokenizer()                tiktoken's "gpt2"; offline from $NANOGPT_GPT2_TOKENIZER_DIR

Every tokenizer has .encode(text) -> list[int], .decode(ids) -> str, .eot_id, .vocab_size, .name.
encode() treats its input as plain text: the string "<|endoftext|>" inside a document is encoded
as characters, never as the end-of-text token, which only preparers insert (between documents).

GPT-2's files (vocab.bpe, encoder.json) come from tiktoken's download, which caches them under
$TIKTOKEN_CACHE_DIR (default: a data-gym-cache folder in the system temp dir). Machines without
access to them can use a folder holding the two files: NANOGPT_GPT2_TOKENIZER_DIR=/path/to/dir.

Command line (prints what a data folder's tokenizer makes of a text):
    python -m nanogpt.data.tokenizer DATA_DIR "some text"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nanogpt.data.common import DataError, run_main
from nanogpt.data.shards import MAX_VOCAB, read_meta

EOT_TEXT = "<|endoftext|>"
GPT2_DIR_ENV = "NANOGPT_GPT2_TOKENIZER_DIR"
GPT2_TIMEOUT_ENV = "NANOGPT_GPT2_DOWNLOAD_TIMEOUT"  # seconds tiktoken may spend fetching GPT-2's files
# GPT-2's pre-tokenization regex as published with its encoder (contractions, letters, digits, other, spaces).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAR_FILE = "tokenizer_char.json"
BPE_FILE = "tokenizer.json"


class TokenizerError(DataError):
    """A tokenizer that cannot be built or loaded, or text it cannot encode; the message names the culprit."""


class GPT2Unavailable(TokenizerError):
    """GPT-2's vocabulary files could not be had (closed network, no local copy)."""


class Tokenizer:
    """Base class: name, vocab_size, eot_id (None when the vocabulary has no end-of-text token)."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts at once (preparers use this; subclasses batch it natively)."""
        return [np.asarray(self.encode(text), dtype=np.int64) for text in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# -- characters -------------------------------------------------------------------------------------

class CharTokenizer(Tokenizer):
    """One token per character; ids follow `chars`; with_eot adds the end-of-text token as the last id."""

    name = "char"

    def __init__(self, chars: Sequence[str], with_eot: bool = True, source: str = "characters"):
        chars = list(chars)
        for char in chars:
            if not isinstance(char, str) or len(char) != 1:
                raise TokenizerError(f"{source}: vocabulary entry {char!r} is not a single character")
        if len(set(chars)) != len(chars):
            raise TokenizerError(f"{source}: vocabulary lists a character twice")
        self.chars = chars
        self.source = source
        self.eot_id = len(chars) if with_eot else None
        self.vocab_size = len(chars) + int(with_eot)
        if self.vocab_size > MAX_VOCAB:
            raise TokenizerError(
                f"{source}: {self.vocab_size} character tokens do not fit uint16 token files (at most {MAX_VOCAB}); "
                "use --tokenizer bpe"
            )
        # Encoding looks code points up in a sorted table, so a whole document is one numpy call.
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[order]
        self._ids_of_sorted = order.astype(np.int64)

    def _encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        if codes.size == 0:
            return np.zeros(0, dtype=np.int64)
        if self._sorted_codes.size == 0:
            raise TokenizerError(f"character {text[0]!r} (position 0) is not in the vocabulary of {self.source}")
        slots = np.minimum(np.searchsorted(self._sorted_codes, codes), self._sorted_codes.size - 1)
        unknown = self._sorted_codes[slots] != codes
        if unknown.any():
            position = int(np.argmax(unknown))
            raise TokenizerError(
                f"character {text[position]!r} (position {position}) is not in the vocabulary of {self.source}"
            )
        return self._ids_of_sorted[slots]

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_array(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = []
        for token in ids:
            token = int(token)
            if token == self.eot_id:
                pieces.append(EOT_TEXT)
            elif 0 <= token < len(self.chars):
                pieces.append(self.chars[token])
            else:
                raise TokenizerError(f"token id {token} is outside the vocabulary of {self.source} ({self.vocab_size})")
        return "".join(pieces)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (readable: the characters in id order)."""
        path = Path(path)
        if self.eot_id is None:
            raise TokenizerError(f"{path}: only vocabularies with an end-of-text token are saved as {CHAR_FILE}")
        payload = {"type": "char", "chars": self.chars, "eot_token": EOT_TEXT, "eot_id": self.eot_id}
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        return path


def char_tokenizer(chars: Iterable[str], with_eot: bool = True) -> CharTokenizer:
    """Vocabulary = the sorted distinct characters of `chars` (a string or any iterable of them) + end-of-text."""
    return CharTokenizer(sorted(set(chars)), with_eot=with_eot)


def load_char_file(path: str | os.PathLike) -> CharTokenizer:
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TokenizerError(f"{path}: character vocabulary file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a valid JSON vocabulary ({e})") from e
    if not isinstance(payload, dict) or payload.get("type") != "char" or not isinstance(payload.get("chars"), list):
        raise TokenizerError(f"{path}: expected {{'type': 'char', 'chars': [...]}}")
    return CharTokenizer(payload["chars"], with_eot=True, source=str(path))


def char_tokenizer_from_meta(meta: dict, source: str) -> CharTokenizer:
    """NanoGPT's meta.pkl: {'vocab_size', 'itos': {id: char}, 'stoi': {char: id}}; no end-of-text token."""
    if not isinstance(meta, dict):
        raise TokenizerError(f"{source}: holds a {type(meta).__name__}, not NanoGPT's dict of vocab_size/itos/stoi")
    for key in ("stoi", "itos"):
        if not isinstance(meta.get(key), dict):
            raise TokenizerError(f"{source}: key {key!r} is missing or not a dict (expected NanoGPT's char meta.pkl)")
    itos, stoi = meta["itos"], meta["stoi"]
    if sorted(itos) != list(range(len(itos))):
        raise TokenizerError(f"{source}: 'itos' ids are not 0..{len(itos) - 1}")
    if any(stoi.get(char) != index for index, char in itos.items()) or len(stoi) != len(itos):
        raise TokenizerError(f"{source}: 'stoi' is not the inverse of 'itos'")
    if meta.get("vocab_size", len(itos)) != len(itos):
        raise TokenizerError(f"{source}: 'vocab_size' is {meta['vocab_size']} but 'itos' has {len(itos)} entries")
    return CharTokenizer([itos[i] for i in range(len(itos))], with_eot=False, source=source)


# -- byte-level BPE (HF tokenizers) -----------------------------------------------------------------

class BPETokenizer(Tokenizer):
    name = "bpe"

    def __init__(self, hf_tokenizer, source: str):
        self.hf = hf_tokenizer
        self.source = source
        # Documents are plain text: "<|endoftext|>" written inside one must not become the separator.
        self.hf.encode_special_tokens = True
        self.eot_id = self.hf.token_to_id(EOT_TEXT)
        if self.eot_id is None:
            raise TokenizerError(f"{source}: has no {EOT_TEXT} token")
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch_fast skips character offsets, which we never use (~1.6x faster).
        encode_batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        encodings = encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, save_path: str | os.PathLike) -> BPETokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens (end-of-text last) and save it as JSON.

    The 256 byte tokens are always present, so any text encodes; a small corpus may run out of
    merges first, and then the vocabulary is smaller than asked (see .vocab_size).
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if not 257 <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(
            f"BPE vocab_size {vocab_size} must lie in [257, {MAX_VOCAB}]: 256 byte tokens + end-of-text, "
            "and ids must fit uint16"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the end-of-text token is appended after training, as GPT-2's last id
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    hf.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    save_path = Path(save_path)
    hf.save(str(save_path))
    return BPETokenizer(hf, source=str(save_path))


def load_bpe_file(path: str | os.PathLike) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: BPE tokenizer file not found")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception on any bad file
        raise TokenizerError(f"{path}: not a valid HF tokenizers file ({e})") from e
    return BPETokenizer(hf, source=str(path))


# -- GPT-2 (tiktoken) -------------------------------------------------------------------------------

class GPT2Tokenizer(Tokenizer):
    name = "gpt2"

    def __init__(self, encoding, source: str, fingerprint: str):
        self.encoding = encoding
        self.source = source
        self.fingerprint = fingerprint  # identifies the vocabulary files, for caches of tokenized data
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        batches = self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)
        return [np.asarray(ids, dtype=np.int64) for ids in batches]

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gpt2_from_dir(directory: str | os.PathLike) -> GPT2Tokenizer:
    """GPT-2's encoding built by tiktoken from a local vocab.bpe + encoder.json (GPT-2's release format)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    directory = Path(directory)
    files = {name: directory / name for name in ("vocab.bpe", "encoder.json")}
    for path in files.values():
        if not path.is_file():
            raise TokenizerError(f"{path}: not found (${GPT2_DIR_ENV}={directory} must hold vocab.bpe and encoder.json)")
    hashes = {name: _sha256_of(path) for name, path in files.items()}
    try:
        # tiktoken caches even local files under their path; passing their hashes keeps that cache honest
        # when the files at this path are replaced.
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(files["vocab.bpe"]), str(files["encoder.json"]),
            vocab_bpe_hash=hashes["vocab.bpe"], encoder_json_hash=hashes["encoder.json"],
        )
    except AssertionError as e:
        raise TokenizerError(f"{directory}: encoder.json does not match the merges of vocab.bpe") from e
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{directory}: vocab.bpe / encoder.json are not in GPT-2's format ({e!r})") from e
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TEXT: len(ranks)}
    )
    return GPT2Tokenizer(encoding, source=str(directory), fingerprint=f"{hashes['vocab.bpe']}:{hashes['encoder.json']}")


def _tiktoken_gpt2(timeout_s: float):
    """tiktoken.get_encoding('gpt2'), given up on after `timeout_s`: its download has no timeout of its own,
    and a compute node whose firewall drops packets would otherwise wait forever."""
    import tiktoken

    outcome: dict = {}

    def fetch():
        try:
            outcome["encoding"] = tiktoken.get_encoding("gpt2")
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread as is
            outcome["error"] = e

    worker = threading.Thread(target=fetch, name="tiktoken-gpt2", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s (${GPT2_TIMEOUT_ENV})")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["encoding"]


def gpt2_tokenizer(suggestion: str = "prepare with --tokenizer bpe or --tokenizer char") -> GPT2Tokenizer:
    """GPT-2's tokenizer (50257 tokens, end-of-text 50256).

    From $NANOGPT_GPT2_TOKENIZER_DIR when set, else through tiktoken (its cache or a download). When
    neither works, raises GPT2Unavailable with `suggestion` (what the caller's user can do instead).
    """
    local_dir = os.environ.get(GPT2_DIR_ENV)
    if local_dir:
        return gpt2_from_dir(local_dir)
    timeout_s = float(os.environ.get(GPT2_TIMEOUT_ENV) or 120)
    try:
        encoding = _tiktoken_gpt2(timeout_s)
    except Exception as e:  # noqa: BLE001 - requests, hash and timeout errors all mean "no files"
        raise GPT2Unavailable(
            f"GPT-2's tokenizer files (vocab.bpe, encoder.json) cannot be had here: tiktoken could not fetch them "
            f"({type(e).__name__}: {e}). Either {suggestion}, or copy GPT-2's vocab.bpe and encoder.json into a "
            f"folder and set {GPT2_DIR_ENV} to it (or fill tiktoken's cache on a machine with access and share it "
            "through TIKTOKEN_CACHE_DIR)."
        ) from e
    # tiktoken checks the downloaded files against GPT-2's published hashes, so the name is enough.
    return GPT2Tokenizer(encoding, source="tiktoken:gpt2", fingerprint="tiktoken:gpt2")


# -- the loader -------------------------------------------------------------------------------------

def load_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer a prepared data folder was made with (see the module docstring for the order)."""
    data_dir = Path(data_dir)
    corpus_json = data_dir / "corpus.json"
    meta_pkl = data_dir / "meta.pkl"
    if corpus_json.is_file():
        meta = read_meta(data_dir)
        kind = meta.get("tokenizer")
        if kind == "gpt2":
            tokenizer = gpt2_tokenizer(suggestion=f"use data prepared with --tokenizer bpe or char instead of {data_dir}")
        elif kind in ("char", "bpe"):
            file_name = meta.get("tokenizer_file")
            if not isinstance(file_name, str) or not file_name:
                raise TokenizerError(f"{corpus_json}: key 'tokenizer_file' is missing for tokenizer {kind!r}")
            path = data_dir / file_name
            tokenizer = load_char_file(path) if kind == "char" else load_bpe_file(path)
        else:
            raise TokenizerError(f"{corpus_json}: key 'tokenizer' is {kind!r}; expected 'char', 'bpe' or 'gpt2'")
        for key in ("vocab_size", "eot_id"):
            if key in meta and meta[key] != getattr(tokenizer, key):
                raise TokenizerError(
                    f"{corpus_json}: {key} is {meta[key]} but its tokenizer ({tokenizer.source}) has "
                    f"{getattr(tokenizer, key)}"
                )
        return tokenizer
    if meta_pkl.is_file():
        return char_tokenizer_from_meta(read_meta(data_dir), source=str(meta_pkl))
    return gpt2_tokenizer(suggestion=f"prepare {data_dir} with a corpus.json or meta.pkl of its own")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Show how a data folder's tokenizer encodes a text.")
    parser.add_argument("data_dir", help="prepared data folder (corpus.json, meta.pkl, or GPT-2 data)")
    parser.add_argument("text", nargs="?", default="Hello, world!", help="text to encode")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.data_dir)
    ids = tokenizer.encode(args.text)
    print(f"{tokenizer!r}")
    print(f"{len(ids)} tokens: {ids}")
    print(f"decoded: {tokenizer.decode(ids)!r}")
    return ids


if __name__ == "__main__":
    run_main(main)
