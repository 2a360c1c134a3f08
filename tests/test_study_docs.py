"""Choosing documents for a training-dynamics study: python -m nanogpt.data.select_docs and its docs file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanogpt.data.shards import write_shard
from nanogpt.probe_store import ProbeError, read_docs
from tests.fixtures import run_module

BOS = 0
# Ten documents (BOS + body), their bodies of 3, 4, ..., 12 tokens; the stream is cut into two val files at
# token 40, inside a document; two stray tokens before the first BOS belong to no document.
BODIES = [list(range(1, 3 + n)) for n in range(1, 11)]


@pytest.fixture
def folder(tmp_path) -> Path:
    stream = [5, 5] + [t for body in BODIES for t in [BOS] + body]
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "val_000000.bin", stream[:40])
    write_shard(data / "val_000001.bin", stream[40:])
    write_shard(data / "train_000001.bin", stream)
    (data / "corpus.json").write_text(json.dumps({"vocab_size": 16, "eot_id": BOS}))
    return data


def select(folder, out, *args, check=True):
    return run_module("nanogpt.data.select_docs", folder, "--out", out, *args, check=check)


def test_by_index_with_sources_and_a_document_across_two_files(folder, tmp_path):
    select(folder, tmp_path / "d.npz", "--indices", "0,4,9")
    docs = read_docs(tmp_path / "d.npz")
    assert [docs.document(i).tolist() for i in range(3)] == [[BOS] + BODIES[i] for i in (0, 4, 9)]
    # Document 4 starts at stream position 2 + (4+5+6+7) = 24.
    starts = [2 + sum(len(b) + 1 for b in BODIES[:i]) for i in range(10)]
    assert starts[4] == 24
    expected = [("val_000000.bin", starts[0]), ("val_000000.bin", starts[4]), ("val_000001.bin", starts[9] - 40)]
    assert list(zip(docs.shards.tolist(), docs.offsets.tolist(), strict=True)) == expected
    assert docs.lengths.tolist() == [len(BODIES[i]) + 1 for i in (0, 4, 9)]
    assert docs.meta["indices"] == [0, 4, 9] and docs.meta["bos_id"] == BOS
    across = 5  # the document that holds the cut: starts before 40, ends after it
    assert starts[across] < 40 < starts[across] + len(BODIES[across]) + 1
    select(folder, tmp_path / "across.npz", "--indices", str(across))
    assert read_docs(tmp_path / "across.npz").document(0).tolist() == [BOS] + BODIES[across]


def test_at_random_with_a_seed(folder, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        select(folder, tmp_path / f"{name}.npz", "--random", "4", "--seed", str(seed))
    a, b, c = (read_docs(tmp_path / f"{n}.npz") for n in "abc")
    assert a.sha256 == b.sha256 and a.meta["indices"] == b.meta["indices"]
    assert a.meta["indices"] != c.meta["indices"] and len(set(c.meta["indices"])) == 4


def test_by_length_range_alone_and_with_random(folder, tmp_path):
    select(folder, tmp_path / "range.npz", "--min_length", "6", "--max_length", "8")
    docs = read_docs(tmp_path / "range.npz")
    assert docs.meta["indices"] == [2, 3, 4] and docs.lengths.tolist() == [6, 7, 8]
    select(folder, tmp_path / "some.npz", "--min_length", "10", "--random", "2", "--seed", "3")
    some = read_docs(tmp_path / "some.npz")
    assert len(some) == 2 and all(n >= 10 for n in some.lengths)


def test_from_text_with_the_folders_tokenizer(char_corpus, tmp_path):
    from nanogpt.data.tokenizer import load_tokenizer

    strings = tmp_path / "strings.txt"
    strings.write_text("def main():\n\n    return 42\n")
    select(char_corpus, tmp_path / "t.npz", "--text", strings)
    docs = read_docs(tmp_path / "t.npz")
    tokenizer = load_tokenizer(char_corpus)
    assert [docs.document(i).tolist() for i in range(2)] == [[tokenizer.eot_id] + tokenizer.encode(s)
                                                             for s in ("def main():", "    return 42")]
    assert docs.shards.tolist() == ["", ""] and docs.offsets.tolist() == [-1, -1]


def test_the_content_hash_is_recorded_checked_and_printed(folder, tmp_path):
    proc = select(folder, tmp_path / "d.npz", "--indices", "1,2")
    docs = read_docs(tmp_path / "d.npz")
    assert docs.sha256 in proc.stdout
    select(folder, tmp_path / "same.npz", "--min_length", "5", "--max_length", "6")  # the same two documents
    assert read_docs(tmp_path / "same.npz").sha256 == docs.sha256
    select(folder, tmp_path / "other.npz", "--indices", "1,3")
    assert read_docs(tmp_path / "other.npz").sha256 != docs.sha256
    with np.load(tmp_path / "d.npz") as data:
        fields = dict(data)
    fields["tokens"] = fields["tokens"].copy()
    fields["tokens"][3] += 1
    np.savez(tmp_path / "damaged.npz", **fields)
    with pytest.raises(ProbeError, match="damaged.npz: content hash .* differs"):
        read_docs(tmp_path / "damaged.npz")


@pytest.mark.parametrize("args, message", [
    (["--indices", "2,10"], "--indices [10]: out of range; the val split of {folder} holds 10 documents (0..9)"),
    (["--min_length", "40"], "no document of the 10 in the val split of {folder} has a length in [40, any] tokens "
                             "(they run from 4 to 13)"),
    (["--random", "11"], "--random 11: only 10 documents to draw from"),
    (["--min_length", "8", "--max_length", "6"], "--min_length 8 exceeds --max_length 6"),
    (["--indices", "1", "--random", "2"], "--indices and --random: give one way of choosing documents"),
    (["--indices", "1", "--min_length", "3"], "--indices picks exact documents"),
    ([], "choose documents: --indices"),
    (["--text", "nope.txt"], "--text nope.txt: file not found"),
])
def test_bad_requests_are_named_and_write_nothing(folder, tmp_path, args, message):
    proc = select(folder, tmp_path / "d.npz", *args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message.format(folder=folder) in proc.stderr
    assert not (tmp_path / "d.npz").exists()


def test_an_empty_split_a_missing_folder_and_an_existing_output(folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shard(empty / "val_000000.bin", [1, 2, 3])
    proc = select(empty, tmp_path / "d.npz", "--indices", "0", check=False)
    assert proc.returncode == 1 and "val split (val_000000.bin) holds no document (no BOS token 50256" in proc.stderr
    proc = select(tmp_path / "missing", tmp_path / "d.npz", "--indices", "0", check=False)
    assert proc.returncode == 1 and f"{tmp_path / 'missing'}: data directory not found" in proc.stderr
    select(folder, tmp_path / "d.npz", "--indices", "0")
    before = (tmp_path / "d.npz").read_bytes()
    proc = select(folder, tmp_path / "d.npz", "--indices", "1", check=False)
    assert proc.returncode == 1 and "d.npz: exists; give another --out, or --force" in proc.stderr
    assert (tmp_path / "d.npz").read_bytes() == before
    select(folder, tmp_path / "d.npz", "--indices", "1", "--force")
    assert (tmp_path / "d.npz").read_bytes() != before


def test_help_explains_the_modes():
    out = run_module("nanogpt.data.select_docs", "--help").stdout
    for text in ("--indices", "--random", "--seed", "--min_length", "--max_length", "--text", "by length",
                 "from text", "val split"):
        assert text in out, text
