"""nanogpt.data.text_corpus: a folder of text files -> token shards + corpus.json."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt.data.common import DataError
from nanogpt.data.shards import find_split, open_tokens, read_shard_header
from nanogpt.data.text_corpus import CorpusError, default_source, list_candidates, main, split_text
from nanogpt.data.tokenizer import load_tokenizer
from tests.data_gpt2_files import write_gpt2_files

REPO = Path(__file__).resolve().parents[1]
WORDS = "def return self import class for in if else while the of and to a is x y value print ( ) : = + 42 é 日本".split()


@pytest.fixture
def rand():
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed {seed}")
    return random.Random(seed)


def make_source(root: Path, rand: random.Random, num_docs: int = 12) -> dict[str, str]:
    """A folder with text documents and every kind of file the preparer must skip; returns {relpath: text}."""
    texts = {}
    for index in range(num_docs):
        relpath = f"pkg{index % 3}/module_{index}.py" if index % 2 else f"docs/note_{index}.txt"
        text = "\n".join(" ".join(rand.choice(WORDS) for _ in range(rand.randint(1, 12)))
                         for _ in range(rand.randint(1, 30)))
        texts[relpath] = text + "\n"
    texts["README.md"] = "# <|endoftext|> is text here, not a separator\n"
    for relpath, text in texts.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(text, encoding="utf-8")
    (root / "binary.txt").write_bytes(b"abc\0def")  # NUL: binary
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (root / "empty.py").write_bytes(b"")
    (root / "image.png").write_bytes(b"\x89PNG not text by extension")
    for skipped_dir in ("__pycache__", ".git", "site-packages/pkg"):
        (root / skipped_dir).mkdir(parents=True)
        (root / skipped_dir / "skipped.py").write_text("print('never read')\n")
    return texts


@pytest.fixture
def source(tmp_path, rand):
    root = tmp_path / "source"
    texts = make_source(root, rand)
    return root, texts


def run(source_dir, out_dir, *extra):
    return main(["--source", str(source_dir), "--out", str(out_dir), *map(str, extra)])


def documents_of(out_dir: Path) -> dict[str, list[str]]:
    """Decode every shard back into its documents (split at the end-of-text tokens)."""
    tokenizer = load_tokenizer(out_dir)
    found = {}
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(open_tokens(f)) for f in find_split(out_dir, split)])
        assert tokens[0] == tokenizer.eot_id  # every document starts with end-of-text
        starts = np.flatnonzero(tokens == tokenizer.eot_id).tolist() + [tokens.size]
        found[split] = [tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return found


def test_split_text_pieces():
    assert split_text("ab\ncd\nef\n", 6) == ["ab\ncd\n", "ef\n"]
    assert split_text("abcdefgh", 3) == ["abc", "def", "gh"]  # no newline: cut at the limit
    assert split_text("", 5) == [""]
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(300))
    pieces = split_text(text, 80)
    assert "".join(pieces) == text and all(0 < len(p) <= 80 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)  # every line here is shorter than the limit


def test_doc_chars_cuts_files_into_documents_and_splits_by_file(source, tmp_path):
    source_dir, texts = source
    meta = run(source_dir, tmp_path / "out", "--tokenizer", "char", "--doc_chars", 40)
    docs = documents_of(tmp_path / "out")
    assert all(len(d) <= 40 for d in docs["train"] + docs["val"])
    assert meta["num_documents"] == {"train": len(docs["train"]), "val": len(docs["val"])}
    assert meta["num_files"]["train"] + meta["num_files"]["val"] == len(texts)
    assert meta["settings"]["doc_chars"] == 40 and "at most 40 characters" in meta["document_layout"]
    # The pieces of a file are consecutive and in one split: joined, the val split is whole files.
    val_text = "".join(docs["val"])
    whole_val = [t for t in texts.values() if t and t in val_text]
    assert sum(len(t) for t in whole_val) == len(val_text)
    # Other settings than the corpus in the folder: refused without --overwrite.
    with pytest.raises(CorpusError, match="doc_chars"):
        run(source_dir, tmp_path / "out", "--tokenizer", "char")


@pytest.fixture
def gpt2_env(tmp_path, monkeypatch):
    write_gpt2_files(tmp_path / "gpt2_files")
    monkeypatch.setenv("NANOGPT_GPT2_TOKENIZER_DIR", str(tmp_path / "gpt2_files"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))


@pytest.mark.parametrize("tokenizer", ["char", "bpe", "gpt2"])
def test_documents_roundtrip(source, tmp_path, tokenizer, gpt2_env):
    source_dir, texts = source
    out = tmp_path / "out"
    extra = ["--vocab_size", 300] if tokenizer == "bpe" else []
    meta = run(source_dir, out, "--tokenizer", tokenizer, *extra)
    on_disk = json.loads((out / "corpus.json").read_text())
    assert on_disk == meta
    assert meta["tokenizer"] == tokenizer
    assert meta["shards"] == {"train": ["train_000001.bin"], "val": ["val_000000.bin"]}
    assert meta["source"] == str(source_dir.resolve())
    docs = documents_of(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(texts.values())
    assert len(docs["val"]) >= 1 and len(docs["train"]) >= 1
    assert meta["num_documents"] == {"train": len(docs["train"]), "val": len(docs["val"])}
    assert meta["num_tokens"] == {s: sum(read_shard_header(out / n) for n in meta["shards"][s]) for s in ("train", "val")}
    assert meta["skipped_files"] == {"binary_or_non_utf8": 2, "empty": 1, "unreadable": 0}
    tokenizer_obj = load_tokenizer(out)
    assert (meta["vocab_size"], meta["eot_id"]) == (tokenizer_obj.vocab_size, tokenizer_obj.eot_id)
    if tokenizer == "char":
        assert meta["tokenizer_file"] == "tokenizer_char.json"
        assert meta["vocab_size"] == len(set("".join(texts.values()))) + 1 and meta["eot_id"] == meta["vocab_size"] - 1
    elif tokenizer == "bpe":
        assert meta["tokenizer_file"] == "tokenizer.json" and meta["vocab_size"] <= 300
    else:
        assert meta["tokenizer_file"] is None
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_same_input_gives_identical_bytes(source, tmp_path, tokenizer):
    source_dir, _ = source
    extra = ["--vocab_size", 300] if tokenizer == "bpe" else []
    run(source_dir, tmp_path / "a", "--tokenizer", tokenizer, "--shard_tokens", 500, *extra)
    run(source_dir, tmp_path / "b", "--tokenizer", tokenizer, "--shard_tokens", 500, *extra)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_split_follows_seed_and_keeps_one_document_each(source, tmp_path):
    source_dir, _ = source
    seen = set()
    for seed in range(4):
        out = tmp_path / f"seed{seed}"
        run(source_dir, out, "--seed", seed, "--val_fraction", 0.3)
        seen.add(tuple(sorted(documents_of(out)["val"])))
    assert len(seen) > 1  # the seed moves documents between the splits
    meta = run(source_dir, tmp_path / "tiny_val", "--val_fraction", 1e-9)
    assert meta["num_documents"]["val"] == 1
    meta = run(source_dir, tmp_path / "tiny_train", "--val_fraction", 1 - 1e-9)
    assert meta["num_documents"]["train"] == 1


def test_small_shards_are_numbered_val_first(source, tmp_path):
    source_dir, texts = source
    out = tmp_path / "out"
    meta = run(source_dir, out, "--shard_tokens", 300)
    val, train = meta["shards"]["val"], meta["shards"]["train"]
    assert val[0] == "val_000000.bin" and len(train) > 1
    expected = [f"val_{i:06d}.bin" for i in range(len(val))] + [f"train_{i:06d}.bin" for i in range(len(val), len(val) + len(train))]
    assert val + train == expected
    sizes = [read_shard_header(out / name) for name in val + train]
    assert all(s == 300 for s in sizes[:len(val) - 1] + sizes[len(val):-1])  # all full but each split's last
    assert [p.name for p in find_split(out, "train")] == train
    docs = documents_of(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(texts.values())


def test_caps_take_a_prefix_in_path_order(source, tmp_path):
    source_dir, texts = source
    meta = run(source_dir, tmp_path / "files", "--max_files", 3)
    assert sum(meta["num_documents"].values()) == 3
    first = sorted(texts)[:4]
    size_of_three = sum(len(texts[p].encode()) for p in first[:3])
    meta = run(source_dir, tmp_path / "bytes", "--max_bytes", size_of_three + 1)
    assert sum(meta["num_documents"].values()) == 3
    assert sorted(documents_of(tmp_path / "bytes")["train"] + documents_of(tmp_path / "bytes")["val"]) == sorted(
        texts[p] for p in first[:3])


def test_extensions_knob(source, tmp_path):
    source_dir, texts = source
    meta = run(source_dir, tmp_path / "out", "--extensions", "md, .TXT")
    expected = [t for p, t in texts.items() if p.endswith((".md", ".txt"))]
    assert sum(meta["num_documents"].values()) == len(expected)
    meta = run(source_dir, tmp_path / "all", "--extensions", "*")
    assert meta["skipped_files"]["binary_or_non_utf8"] == 3  # the .png too


def test_rerun_is_a_no_op_and_other_settings_are_refused(source, tmp_path, capsys):
    source_dir, _ = source
    out = tmp_path / "out"
    run(source_dir, out)
    (out / "notes.txt").write_text("mine")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run(source_dir, out)
    assert "nothing to do" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    with pytest.raises(DataError, match=re.escape(str(out)) + ".*tokenizer='char' \\(now 'bpe'\\).*--overwrite"):
        run(source_dir, out, "--tokenizer", "bpe", "--vocab_size", 300)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # nothing touched

    meta = run(source_dir, out, "--tokenizer", "bpe", "--vocab_size", 300, "--overwrite")
    assert meta["tokenizer"] == "bpe"
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "notes.txt", "tokenizer.json", "train_000001.bin",
                                                     "val_000000.bin"]
    assert (out / "notes.txt").read_text() == "mine"  # unrelated files stay


def test_changed_source_is_refused_without_overwrite(source, tmp_path):
    source_dir, texts = source
    out = tmp_path / "out"
    run(source_dir, out)
    (source_dir / "docs" / "new.txt").write_text("a new document\n")
    with pytest.raises(DataError, match="other content"):
        run(source_dir, out)
    meta = run(source_dir, out, "--overwrite")
    assert sum(meta["num_documents"].values()) == len(texts) + 1


def test_leftover_shards_shrink_with_overwrite(source, tmp_path):
    source_dir, _ = source
    out = tmp_path / "out"
    many = run(source_dir, out, "--shard_tokens", 200)
    assert len(many["shards"]["train"]) > 2
    run(source_dir, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "tokenizer_char.json", "train_000001.bin",
                                                     "val_000000.bin"]


@pytest.mark.parametrize("foreign", ["train.bin", "fineweb_train_000001.bin"])
def test_foreign_token_files_are_refused(source, tmp_path, foreign):
    source_dir, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / foreign).write_bytes(b"\0\0")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(DataError, match=re.escape(str(out)) + ".*" + re.escape(foreign)):
            run(source_dir, out, *extra)
    assert sorted(p.name for p in out.iterdir()) == [foreign]


def test_bad_inputs_are_named(tmp_path, source):
    source_dir, _ = source
    out = tmp_path / "out"
    cases = [
        (["--source", tmp_path / "missing"], "missing: --source not found"),
        (["--source", source_dir / "README.md"], "README.md: --source is not a directory"),
        (["--tokenizer", "bpe", "--vocab_size", 256], "--vocab_size 256"),
        (["--tokenizer", "bpe", "--vocab_size", 65537], "--vocab_size 65537"),
        (["--tokenizer", "char", "--vocab_size", 300], "--vocab_size applies to --tokenizer bpe"),
        (["--val_fraction", 0], "--val_fraction 0"),
        (["--val_fraction", 1], "--val_fraction 1"),
        (["--extensions", ","], "--extensions ','"),
    ]
    for args, message in cases:
        full = ["--source", source_dir, "--out", out] + args
        with pytest.raises(DataError, match=re.escape(message)):
            main(list(map(str, full)))
    assert not out.exists()  # nothing was written for any of them
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "a_file")) + ".*not a directory"):
        run(source_dir, tmp_path / "a_file")


def test_sources_without_two_text_documents(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty)) + ".*no files"):
        run(empty, tmp_path / "out")
    (empty / "blob.txt").write_bytes(b"\0\1\2")
    with pytest.raises(DataError, match=re.escape(str(empty)) + ".*0 text document"):
        run(empty, tmp_path / "out")
    (empty / "one.txt").write_text("only one document")
    with pytest.raises(DataError, match=re.escape(str(empty)) + ".*1 text document.*at least 2"):
        run(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_unavailable_is_refused_before_work(source, tmp_path, monkeypatch):
    source_dir, _ = source
    monkeypatch.delenv("NANOGPT_GPT2_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("NANOGPT_GPT2_DOWNLOAD_TIMEOUT", "20")
    try:
        run(source_dir, tmp_path / "out", "--tokenizer", "gpt2")
    except DataError as e:
        assert "--tokenizer bpe" in str(e)
    else:
        pytest.skip("GPT-2's files could be downloaded here")
    assert not (tmp_path / "out").exists()
    meta = run(source_dir, tmp_path / "auto", "--tokenizer", "auto", "--vocab_size", 300)
    assert meta["tokenizer"] == "bpe" and meta["settings"]["tokenizer"] == "auto"


def test_default_source_is_the_stdlib_capped(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data_root"))
    meta = main(["--max_files", "40", "--extensions", ".py"])
    out = tmp_path / "data_root" / "stdlib_char"
    assert json.loads((out / "corpus.json").read_text()) == meta
    import sysconfig

    assert meta["source"] == str(Path(sysconfig.get_paths()["stdlib"]).resolve())
    assert sum(meta["num_documents"].values()) == 40
    relpaths = list_candidates(default_source(), (".py",), tuple(meta["settings"]["exclude_dirs"]))
    assert relpaths and not [p for p in relpaths if "site-packages/" in p or "__pycache__/" in p]


def test_command_line(source, tmp_path):
    source_dir, texts = source
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "nanogpt.data.text_corpus", "--source", str(source_dir), "--out",
                           str(out), "--tokenizer", "char"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(texts)} documents" in done.stdout
    failed = subprocess.run([sys.executable, "-m", "nanogpt.data.text_corpus", "--source", str(tmp_path / "nope")],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip() == f"error: {tmp_path / 'nope'}: --source not found"  # one line, no traceback


def test_modules_do_nothing_at_import():
    code = ("import nanogpt.data.tokenizer, nanogpt.data.text_corpus, nanogpt.data.download, "
            "nanogpt.data.shakespeare, nanogpt.data.shakespeare_char, nanogpt.data.openwebtext")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
