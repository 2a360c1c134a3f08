"""The token file formats of nanogpt.data.shards: round trips, and an error naming the file for each bad case."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from nanogpt.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardError,
    find_split,
    open_bin,
    open_shard,
    open_tokens,
    read_meta,
    read_shard_header,
    write_shard,
)


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"random seed {seed}")  # shown on failure, to replay the inputs
    return np.random.default_rng(seed)


def names(path, then: str = "") -> str:
    """A regex for an error message that names `path` (then says `then`)."""
    return re.escape(str(path)) + ".*" + then


def random_tokens(rng, max_len=5000):
    return rng.integers(0, 65536, size=int(rng.integers(1, max_len)), dtype=np.int64)


def test_write_read_roundtrip(tmp_path, rng):
    tokens = random_tokens(rng)
    path = tmp_path / "train_000001.bin"
    assert write_shard(path, tokens) == tokens.size
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    assert read_shard_header(path) == tokens.size
    np.testing.assert_array_equal(open_shard(path), tokens)
    np.testing.assert_array_equal(open_tokens(path), tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [SHARD_MAGIC, 1, tokens.size]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_000001.bin"]  # no temp file left


def test_empty_shard_roundtrip(tmp_path):
    path = tmp_path / "val_000000.bin"
    assert write_shard(path, []) == 0
    assert read_shard_header(path) == 0
    assert open_shard(path).size == 0


@pytest.mark.parametrize("bad", [[1, 65536], [-1, 3], [[1, 2], [3, 4]]])
def test_write_rejects_bad_tokens(tmp_path, bad):
    path = tmp_path / "train_000001.bin"
    with pytest.raises(ShardError, match=names(path)):
        write_shard(path, np.array(bad))
    assert not path.exists()


def corrupt(path, index, value):
    data = bytearray(path.read_bytes())
    data[4 * index:4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture
def shard(tmp_path, rng):
    path = tmp_path / "train_000001.bin"
    write_shard(path, random_tokens(rng))
    return path


def test_wrong_magic_names_file(shard):
    corrupt(shard, 0, 12345)
    with pytest.raises(ShardError, match=names(shard, "magic")):
        open_shard(shard)


def test_wrong_version_names_file(shard):
    corrupt(shard, 1, 7)
    with pytest.raises(ShardError, match=names(shard, "version 7")):
        read_shard_header(shard)


def test_truncated_shard_names_file(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(ShardError, match=names(shard, "truncated")):
        read_shard_header(shard)


def test_size_larger_than_header_says(shard):
    with open(shard, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ShardError, match=names(shard, "header says")):
        read_shard_header(shard)


def test_negative_count_in_header(shard):
    corrupt(shard, 2, -5)
    with pytest.raises(ShardError, match=names(shard)):
        read_shard_header(shard)


def test_file_shorter_than_header(tmp_path):
    path = tmp_path / "train_000001.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ShardError, match=names(path, "shorter than")):
        read_shard_header(path)


def test_missing_shard_names_file(tmp_path):
    path = tmp_path / "val_000000.bin"
    with pytest.raises(ShardError, match=names(path, "not found")):
        open_shard(path)
    with pytest.raises(ShardError, match=names(tmp_path / 'train.bin', "not found")):
        open_bin(tmp_path / "train.bin")


def test_missing_data_dir_names_it(tmp_path):
    missing = tmp_path / "nothing_here"
    with pytest.raises(ShardError, match=names(missing, "not found")):
        find_split(missing, "train")


def test_dir_without_split_names_it(tmp_path, rng):
    write_shard(tmp_path / "train_000001.bin", random_tokens(rng))
    with pytest.raises(ShardError, match=names(tmp_path, "no val data")):
        find_split(tmp_path, "val")


def test_headerless_bin_roundtrip(tmp_path, rng):
    tokens = random_tokens(rng).astype("<u2")
    path = tmp_path / "train.bin"
    path.write_bytes(tokens.tobytes())
    np.testing.assert_array_equal(open_bin(path), tokens)
    np.testing.assert_array_equal(open_tokens(path), tokens)


def test_headerless_file_named_like_a_shard_is_detected(tmp_path, rng):
    tokens = random_tokens(rng).astype("<u2")
    tokens[:2] = [1, 2]  # not the magic number by chance
    path = tmp_path / "train_000001.bin"
    path.write_bytes(tokens.tobytes() + b"\0" * HEADER_BYTES)
    with pytest.raises(ShardError, match=names(path, "headerless")):
        open_tokens(path)


def test_shard_named_like_a_headerless_bin_is_detected(tmp_path, rng):
    path = tmp_path / "val.bin"
    write_shard(path, random_tokens(rng))
    with pytest.raises(ShardError, match=names(path, "shard header")):
        open_tokens(path)


def test_odd_sized_headerless_bin(tmp_path):
    path = tmp_path / "val.bin"
    path.write_bytes(b"\1\2\3")
    with pytest.raises(ShardError, match=names(path, "whole number")):
        open_bin(path)


def test_find_split_orders_shards_and_prefers_bin(tmp_path, rng):
    for name in ("fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, random_tokens(rng, 50))
    (tmp_path / "notes_train.bin").write_bytes(b"")  # not a shard name: ignored
    assert [p.name for p in find_split(tmp_path, "train")] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in find_split(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    (tmp_path / "train.bin").write_bytes(b"\0\0")
    assert [p.name for p in find_split(tmp_path, "train")] == ["train.bin"]


def test_read_meta(tmp_path):
    assert read_meta(tmp_path) == {}
    meta = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    assert read_meta(tmp_path) == meta
    (tmp_path / "corpus.json").write_text('{"vocab_size": 9}')
    assert read_meta(tmp_path) == {"vocab_size": 9}  # corpus.json wins


def test_read_meta_bad_files_name_them(tmp_path):
    (tmp_path / "meta.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ShardError, match=names(tmp_path / "meta.pkl")):
        read_meta(tmp_path)
    (tmp_path / "corpus.json").write_text("{broken")
    with pytest.raises(ShardError, match=names(tmp_path / "corpus.json")):
        read_meta(tmp_path)
