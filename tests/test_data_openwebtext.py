"""nanogpt.data.openwebtext end to end on a tiny local dataset, through the same datasets.load_dataset call."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from nanogpt.data.common import DataError
from nanogpt.data.openwebtext import main
from nanogpt.data.tokenizer import load_tokenizer
from tests.data_gpt2_files import write_gpt2_files

WORDS = "the hello world <|endoftext|> 42 café 日本 or w he ll !! \n".split(" ")


@pytest.fixture
def documents(tmp_path):
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed {seed}")
    rand = random.Random(seed)
    docs = [" ".join(rand.choice(WORDS) for _ in range(rand.randint(1, 40))) for _ in range(60)]
    folder = tmp_path / "owt_src"
    folder.mkdir()
    for part in range(2):  # two files: the glob must take both
        with open(folder / f"part{part}.jsonl", "w") as f:
            for index, doc in enumerate(docs[part::2]):
                f.write(json.dumps({"text": doc, "id": index}) + "\n")
    return docs, folder


@pytest.fixture
def gpt2_env(tmp_path, monkeypatch):
    write_gpt2_files(tmp_path / "gpt2_files")
    monkeypatch.setenv("NANOGPT_GPT2_TOKENIZER_DIR", str(tmp_path / "gpt2_files"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))


def split_documents(path, tokenizer):
    tokens = np.fromfile(path, dtype="<u2")
    assert tokens[-1] == tokenizer.eot_id  # every document ends with end-of-text
    ends = np.flatnonzero(tokens == tokenizer.eot_id).tolist()
    return [tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip([-1] + ends[:-1], ends, strict=True)]


def test_local_dataset_end_to_end(documents, gpt2_env, tmp_path):
    docs, folder = documents
    out = tmp_path / "out"
    args = ["--data_files", str(folder / "*.jsonl"), "--out", str(out), "--cache_dir", str(tmp_path / "hf_cache"),
            "--num_proc", "2", "--val_fraction", "0.1", "--write_batches", "7"]
    result = main(args)
    tokenizer = load_tokenizer(out)
    assert tokenizer.name == "gpt2"
    train = split_documents(out / "train.bin", tokenizer)
    val = split_documents(out / "val.bin", tokenizer)
    assert Counter(train + val) == Counter(docs)  # every document once, text intact ("<|endoftext|>" in it too)
    assert len(val) == 6 == result["val_documents"] and result["train_documents"] == 54
    assert result["train_tokens"] == (out / "train.bin").stat().st_size // 2
    first = (out / "train.bin").read_bytes()
    main(args)  # again, from datasets' cache: the same split and bytes
    assert (out / "train.bin").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]


def test_other_tokenizer_files_are_not_served_from_the_cache(documents, gpt2_env, tmp_path, monkeypatch):
    docs, folder = documents
    args = ["--data_files", str(folder / "*.jsonl"), "--cache_dir", str(tmp_path / "hf_cache"), "--num_proc", "1"]
    main(args + ["--out", str(tmp_path / "a")])
    bigger = tmp_path / "gpt2_files_b"
    write_gpt2_files(bigger)
    # Same merges but one more: the token ids of " the" differ only if the cache is not reused blindly.
    (bigger / "vocab.bpe").write_text((bigger / "vocab.bpe").read_text() + "Ġw or\n")
    encoder = json.loads((bigger / "encoder.json").read_text())
    encoder["Ġwor"] = encoder.pop("<|endoftext|>")
    encoder["<|endoftext|>"] = encoder["Ġwor"] + 1
    (bigger / "encoder.json").write_text(json.dumps(encoder))
    monkeypatch.setenv("NANOGPT_GPT2_TOKENIZER_DIR", str(bigger))
    main(args + ["--out", str(tmp_path / "b")])
    tokens_a = np.fromfile(tmp_path / "a" / "train.bin", dtype="<u2")
    tokens_b = np.fromfile(tmp_path / "b" / "train.bin", dtype="<u2")
    assert tokens_b.max() == encoder["<|endoftext|>"] and tokens_a.max() < tokens_b.max()


def test_bad_inputs_are_named(documents, gpt2_env, tmp_path):
    docs, folder = documents
    base = ["--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "hf_cache"), "--num_proc", "1"]
    missing = str(folder / "*.parquet")
    with pytest.raises(DataError, match=re.escape(missing) + ": matches no file"):
        main(base + ["--data_files", missing])
    with pytest.raises(DataError, match="no column 'body'"):
        main(base + ["--data_files", str(folder / "*.jsonl"), "--text_column", "body"])
    (folder / "odd.xyz").write_text("x")
    with pytest.raises(DataError, match="cannot tell the file format"):
        main(base + ["--data_files", str(folder / "odd.xyz")])
    with pytest.raises(DataError, match="--val_fraction 0.0"):
        main(base + ["--data_files", str(folder / "*.jsonl"), "--val_fraction", "0"])
    assert not (tmp_path / "out").exists()


def test_gpt2_unavailable_is_refused_before_loading(documents, tmp_path, monkeypatch):
    docs, folder = documents
    monkeypatch.delenv("NANOGPT_GPT2_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("NANOGPT_GPT2_DOWNLOAD_TIMEOUT", "20")
    try:
        main(["--data_files", str(folder / "*.jsonl"), "--out", str(tmp_path / "out"),
              "--cache_dir", str(tmp_path / "hf_cache")])
    except DataError as e:
        assert "text_corpus --tokenizer bpe" in str(e)
    else:
        pytest.skip("GPT-2's files could be downloaded here")
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf_cache").exists()
