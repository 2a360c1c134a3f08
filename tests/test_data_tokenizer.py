"""nanogpt.data.tokenizer: char / BPE / GPT-2 tokenizers and the loader of a data folder's tokenizer."""

from __future__ import annotations

import json
import pickle
import random
import re
import socket
import threading
import time

import pytest

from nanogpt.data.tokenizer import (
    EOT_TEXT,
    GPT2Unavailable,
    TokenizerError,
    char_tokenizer,
    gpt2_tokenizer,
    load_bpe_file,
    load_char_file,
    load_tokenizer,
    train_bpe,
)
from tests.data_gpt2_files import MERGES, write_gpt2_files

ALPHABET = "abcdefghij klmnop\nqrstuvwxyz ABC.,;:!?'\"()[]{}<|>_-=+0123456789 éüßñ日本語 😀\t"


@pytest.fixture
def rand():
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed {seed}")
    return random.Random(seed)


def random_text(rand, length=400, alphabet=ALPHABET):
    return "".join(rand.choice(alphabet) for _ in range(length))


@pytest.fixture
def gpt2_dir(tmp_path, monkeypatch):
    directory = tmp_path / "gpt2_files"
    ranks = write_gpt2_files(directory)
    monkeypatch.setenv("NANOGPT_GPT2_TOKENIZER_DIR", str(directory))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))
    return directory, ranks


# -- characters -------------------------------------------------------------------------------------

def test_char_vocabulary_is_sorted_characters_then_eot(rand):
    text = random_text(rand)
    tokenizer = char_tokenizer(text)
    assert tokenizer.chars == sorted(set(text))
    assert tokenizer.eot_id == len(set(text)) == tokenizer.vocab_size - 1
    assert tokenizer.name == "char"
    ids = tokenizer.encode(text)
    assert ids == [tokenizer.chars.index(c) for c in text]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.eot_id]) == EOT_TEXT


def test_char_encodes_eot_text_as_characters():
    tokenizer = char_tokenizer("<|endoftext|> abc")
    ids = tokenizer.encode(EOT_TEXT)
    assert len(ids) == len(EOT_TEXT) and tokenizer.eot_id not in ids


def test_char_unknown_character_is_named():
    tokenizer = char_tokenizer("abc")
    with pytest.raises(TokenizerError, match="'z' \\(position 2\\)"):
        tokenizer.encode("abz")
    with pytest.raises(TokenizerError, match="token id 9"):
        tokenizer.decode([0, 9])


def test_char_save_and_load(tmp_path, rand):
    text = random_text(rand)
    tokenizer = char_tokenizer(text)
    path = tokenizer.save(tmp_path / "tokenizer_char.json")
    loaded = load_char_file(path)
    assert loaded.chars == tokenizer.chars and loaded.eot_id == tokenizer.eot_id
    assert loaded.encode(text) == tokenizer.encode(text)


def test_char_file_errors_name_the_file(tmp_path):
    path = tmp_path / "tokenizer_char.json"
    with pytest.raises(TokenizerError, match=re.escape(str(path)) + ".*not found"):
        load_char_file(path)
    path.write_text(json.dumps({"type": "char", "chars": ["a", "bc"]}))
    with pytest.raises(TokenizerError, match=re.escape(str(path)) + ".*'bc'"):
        load_char_file(path)
    path.write_text(json.dumps({"type": "char", "chars": ["a", "a"]}))
    with pytest.raises(TokenizerError, match=re.escape(str(path)) + ".*twice"):
        load_char_file(path)


# -- NanoGPT's meta.pkl ------------------------------------------------------------------------------

def write_meta(directory, chars):
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (directory / "meta.pkl").write_bytes(pickle.dumps(meta))
    return meta


def test_load_tokenizer_from_meta_pkl(tmp_path, rand):
    text = random_text(rand)
    chars = sorted(set(text))
    rand.shuffle(chars)  # ids need not follow code point order
    write_meta(tmp_path, chars)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.name == "char" and tokenizer.eot_id is None and tokenizer.vocab_size == len(chars)
    assert tokenizer.encode(text) == [chars.index(c) for c in text]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bad_meta_pkl_is_named(tmp_path):
    meta = write_meta(tmp_path, list("abc"))
    del meta["stoi"]
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "meta.pkl")) + ".*'stoi'"):
        load_tokenizer(tmp_path)
    meta = write_meta(tmp_path, list("abc"))
    meta["vocab_size"] = 5
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "meta.pkl")) + ".*vocab_size"):
        load_tokenizer(tmp_path)


# -- corpus.json --------------------------------------------------------------------------------------

def write_corpus_json(directory, **fields):
    (directory / "corpus.json").write_text(json.dumps(fields))


def test_load_tokenizer_from_corpus_json_char(tmp_path):
    tokenizer = char_tokenizer("hello world")
    tokenizer.save(tmp_path / "tokenizer_char.json")
    write_corpus_json(tmp_path, tokenizer="char", tokenizer_file="tokenizer_char.json", vocab_size=tokenizer.vocab_size,
                      eot_id=tokenizer.eot_id)
    (tmp_path / "meta.pkl").write_bytes(b"ignored: corpus.json comes first")
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello") == tokenizer.encode("hello") and loaded.eot_id == tokenizer.eot_id


@pytest.mark.parametrize("fields, message", [
    ({"tokenizer": "words"}, "'tokenizer' is 'words'"),
    ({"vocab_size": 9}, "'tokenizer' is None"),
    ({"tokenizer": "char"}, "'tokenizer_file' is missing"),
    ({"tokenizer": "char", "tokenizer_file": "absent.json"}, "absent.json: character vocabulary file not found"),
    ({"tokenizer": "bpe", "tokenizer_file": "absent.json"}, "absent.json: BPE tokenizer file not found"),
    ({"tokenizer": "char", "tokenizer_file": "tokenizer_char.json", "vocab_size": 99}, "vocab_size is 99"),
    ({"tokenizer": "char", "tokenizer_file": "tokenizer_char.json", "eot_id": 0}, "eot_id is 0"),
])
def test_corpus_json_errors_name_the_culprit(tmp_path, fields, message):
    char_tokenizer("abc").save(tmp_path / "tokenizer_char.json")
    write_corpus_json(tmp_path, **fields)
    with pytest.raises(TokenizerError, match=re.escape(message)):
        load_tokenizer(tmp_path)


# -- byte-level BPE ----------------------------------------------------------------------------------

def test_train_bpe_roundtrip_and_eot_last(tmp_path, rand):
    texts = [random_text(rand, 300) for _ in range(30)] + ["the cat sat on the mat " * 20] * 5
    tokenizer = train_bpe(iter(texts), 300, tmp_path / "tokenizer.json")
    assert tokenizer.name == "bpe"
    assert tokenizer.vocab_size <= 300 and tokenizer.eot_id == tokenizer.vocab_size - 1
    probe = random_text(rand, 500, ALPHABET + "ÆØÅ\x00\x7f")  # characters never seen in training still encode
    for text in texts[:3] + [probe]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges learned
    ids = tokenizer.encode("a" + EOT_TEXT + "b")
    assert tokenizer.eot_id not in ids and tokenizer.decode(ids) == "a" + EOT_TEXT + "b"
    assert tokenizer.decode([tokenizer.eot_id]) == EOT_TEXT
    loaded = load_bpe_file(tmp_path / "tokenizer.json")
    assert loaded.encode(probe) == tokenizer.encode(probe) and loaded.eot_id == tokenizer.eot_id
    assert [a.tolist() for a in loaded.encode_documents(texts[:4])] == [tokenizer.encode(t) for t in texts[:4]]


def test_train_bpe_is_deterministic(tmp_path, rand):
    texts = [random_text(rand, 2000) for _ in range(20)]
    train_bpe(iter(texts), 400, tmp_path / "a.json")
    train_bpe(iter(texts), 400, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("vocab_size", [256, 65537])
def test_train_bpe_rejects_bad_vocab_size(tmp_path, vocab_size):
    with pytest.raises(TokenizerError, match=f"vocab_size {vocab_size}"):
        train_bpe(iter(["abc"]), vocab_size, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_bad_bpe_file_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(TokenizerError, match=re.escape(str(path))):
        load_bpe_file(path)


# -- GPT-2 ----------------------------------------------------------------------------------------------

def test_gpt2_from_local_dir(gpt2_dir, rand):
    _, ranks = gpt2_dir
    tokenizer = gpt2_tokenizer()
    assert tokenizer.name == "gpt2"
    assert tokenizer.vocab_size == 256 + len(MERGES) + 1 and tokenizer.eot_id == 256 + len(MERGES)
    # Merges apply within GPT-2's pre-tokens: "hello" -> "hell" + "o"; " the" is one token; " world" -> " w" ...
    assert tokenizer.encode("hello") == [ranks[b"hell"], ranks[b"o"]]
    assert tokenizer.encode(" the") == [ranks[b" the"]]
    assert tokenizer.encode(" wor") == [ranks[b" w"], ranks[b"or"]]
    text = random_text(rand)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode(EOT_TEXT)
    assert tokenizer.eot_id not in ids and tokenizer.decode(ids + [tokenizer.eot_id]) == EOT_TEXT * 2


def test_gpt2_pattern_matches_tiktoken_own(gpt2_dir, rand):
    """The pre-tokenization regex written here splits text as tiktoken's GPT-2 definition does."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    tokenizer = gpt2_tokenizer()
    reference = tiktoken.Encoding(name="reference", pat_str=r50k_pat_str,
                                  mergeable_ranks=tokenizer.encoding._mergeable_ranks,
                                  special_tokens={EOT_TEXT: tokenizer.eot_id})
    alphabet = ALPHABET + "   \n\n\t'sdmtllvere" * 3
    for _ in range(20):
        text = random_text(rand, 300, alphabet)
        assert tokenizer.encode(text) == reference.encode_ordinary(text)


def test_gpt2_local_dir_errors_name_the_file(gpt2_dir):
    directory, _ = gpt2_dir
    (directory / "encoder.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(TokenizerError, match=re.escape(str(directory)) + ".*does not match"):
        gpt2_tokenizer()
    (directory / "encoder.json").unlink()
    with pytest.raises(TokenizerError, match=re.escape(str(directory / "encoder.json")) + ".*not found"):
        gpt2_tokenizer()


def test_load_tokenizer_falls_back_to_gpt2(gpt2_dir, tmp_path):
    data_dir = tmp_path / "fineweb_like"
    data_dir.mkdir()
    tokenizer = load_tokenizer(data_dir)
    assert tokenizer.name == "gpt2" and tokenizer.eot_id == 256 + len(MERGES)
    write_corpus_json(data_dir, tokenizer="gpt2", tokenizer_file=None, vocab_size=tokenizer.vocab_size,
                      eot_id=tokenizer.eot_id)
    assert load_tokenizer(data_dir).encode("hello") == tokenizer.encode("hello")


@pytest.fixture
def no_gpt2_files(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_GPT2_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_tiktoken_cache"))
    monkeypatch.setenv("NANOGPT_GPT2_DOWNLOAD_TIMEOUT", "20")


def test_gpt2_unavailable_fails_fast_with_advice(no_gpt2_files):
    started = time.monotonic()
    try:
        gpt2_tokenizer()
    except GPT2Unavailable as e:
        message = str(e)
    else:
        pytest.skip("GPT-2's files could be downloaded here; the closed-network error cannot be shown")
    assert time.monotonic() - started < 25
    assert "--tokenizer bpe" in message and "NANOGPT_GPT2_TOKENIZER_DIR" in message and "vocab.bpe" in message


def test_gpt2_download_that_hangs_times_out(no_gpt2_files, monkeypatch):
    """A network that swallows packets: tiktoken's request goes to a proxy that accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []
    stop = threading.Event()

    def accept_and_hold():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NANOGPT_GPT2_DOWNLOAD_TIMEOUT", "1.5")
    started = time.monotonic()
    try:
        with pytest.raises(GPT2Unavailable, match="no answer within 1.5 s"):
            gpt2_tokenizer()
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()  # lets the abandoned download thread finish
        server.close()
