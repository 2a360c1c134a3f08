"""modded_nanogpt.data.loader: shard reading, and BOS-aligned packed batches checked against a
plain-Python model of the packing rule on fresh random documents each run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modded_nanogpt.data.loader import DistributedBOSLoader, SequentialLoader, read_shard
from nanogpt.data.shards import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, ShardError, find_shards

VOCAB = 50257
MAX_SEQ_LEN = 16


def write_raw_shard(path, tokens, magic=SHARD_MAGIC, version=SHARD_VERSION, count=None):
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, version, tokens.size if count is None else count
    path.write_bytes(header.tobytes() + tokens.tobytes())
    return path


def random_documents(rng, bos_id, num_docs, max_seq_len=MAX_SEQ_LEN):
    """Documents of 1..3*max_seq_len tokens (BOS included) with no BOS inside."""
    docs = []
    for length in rng.integers(1, 3 * max_seq_len + 1, size=num_docs):
        body = rng.integers(0, VOCAB - 1, size=length - 1)
        body[body >= bos_id] += 1  # every id but BOS
        docs.append(np.concatenate(([bos_id], body)))
    return docs


def make_corpus(tmp_path, rng, docs_per_shard, prefix=None):
    """Shards named like FineWeb's; returns (files, bos_id, documents in stream order).

    `prefix` maps a shard index to a count of junk tokens written before its first BOS (no document).
    """
    bos_id = int(rng.integers(0, VOCAB))
    files, stream_docs = [], []
    for index, num_docs in enumerate(docs_per_shard):
        docs = random_documents(rng, bos_id, num_docs)
        junk = (bos_id + 1 + rng.integers(0, VOCAB - 1, size=(prefix or {}).get(index, 0))) % VOCAB
        tokens = np.concatenate([junk, *docs]) if docs or junk.size else np.zeros(0)
        files.append(write_raw_shard(tmp_path / f"fineweb_train_{index + 1:06d}.bin", tokens))
        stream_docs.extend(docs)
    return files, bos_id, stream_docs


def reference_batches(stream_docs, tokens_per_rank, max_seq_len, count):
    """The packing rule, spelled out document by document: list of (inputs, targets, cu_seqlens)."""
    batches, doc = [], 0
    for _ in range(count):
        tokens, owner = [], []
        cursor = doc
        while len(tokens) < tokens_per_rank + 1:
            clipped = stream_docs[cursor % len(stream_docs)][:max_seq_len]
            tokens.extend(clipped.tolist())
            owner.extend([cursor] * len(clipped))
            cursor += 1
        tokens, owner = tokens[: tokens_per_rank + 1], owner[:tokens_per_rank]
        starts = [i for i in range(tokens_per_rank) if i == 0 or owner[i] != owner[i - 1]]
        batches.append((tokens[:-1], tokens[1:], starts + [tokens_per_rank]))
        doc = owner[-1] + 1
    return batches


def as_lists(batch):
    return batch.inputs.tolist(), batch.targets.tolist(), batch.cu_seqlens.tolist()


def check_invariants(batch, tokens_per_rank, max_seq_len, bos_id):
    inputs, targets, cu_seqlens = batch
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64 and cu_seqlens.dtype == torch.int32
    assert inputs.shape == targets.shape == (tokens_per_rank,)
    assert torch.equal(inputs[1:].long(), targets[:-1])
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == tokens_per_rank
    lengths = np.diff(bounds)
    assert (lengths > 0).all() and (lengths <= max_seq_len).all()
    assert (inputs[bounds[:-1]] == bos_id).all()
    # BOS appears only at segment starts: segments are exactly the documents
    assert int((inputs == bos_id).sum()) == len(bounds) - 1


@pytest.mark.parametrize("tokens_per_rank", [7, 64, 200])
def test_single_rank_matches_reference_across_shards_and_epochs(tmp_path, tokens_per_rank):
    rng = np.random.default_rng()
    # Uneven shards, one empty, one starting with junk: batches cross shards and wrap many times.
    files, bos_id, docs = make_corpus(tmp_path, rng, [6, 0, 3, 9, 1], prefix={2: 3})
    total_tokens = sum(min(len(d), MAX_SEQ_LEN) for d in docs)
    num_batches = 3 * total_tokens // tokens_per_rank + 5  # at least a couple of epochs
    expected = reference_batches(docs, tokens_per_rank, MAX_SEQ_LEN, num_batches)
    loader = DistributedBOSLoader(files, tokens_per_rank, MAX_SEQ_LEN, bos_id)
    epochs_seen = set()
    for want in expected:
        batch = loader.next_batch()
        check_invariants(batch, tokens_per_rank, MAX_SEQ_LEN, bos_id)
        assert as_lists(batch) == (want[0], want[1], want[2])
        assert torch.equal(loader.cu_seqlens, batch.cu_seqlens)
        epochs_seen.add(loader.state_dict()["epoch"])
    assert len(epochs_seen) >= 2
    loader.close()


def test_iteration_yields_inputs_and_targets(tmp_path):
    rng = np.random.default_rng()
    files, bos_id, docs = make_corpus(tmp_path, rng, [20])
    loader = DistributedBOSLoader(files, 48, MAX_SEQ_LEN, bos_id)
    want = reference_batches(docs, 48, MAX_SEQ_LEN, 3)
    for (inputs, targets), (want_inputs, want_targets, _) in zip(loader, want, strict=False):
        assert inputs.tolist() == want_inputs and targets.tolist() == want_targets
    loader.close()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_take_disjoint_consecutive_slices_of_the_single_rank_stream(tmp_path, world_size):
    rng = np.random.default_rng()
    files, bos_id, docs = make_corpus(tmp_path, rng, [15, 11, 13])
    tokens_per_rank = 40
    single = DistributedBOSLoader(files, tokens_per_rank, MAX_SEQ_LEN, bos_id)
    ranks = [
        DistributedBOSLoader(files, tokens_per_rank, MAX_SEQ_LEN, bos_id, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for _ in range(6):
        step = [loader.next_batch() for loader in ranks]
        for batch in step:
            check_invariants(batch, tokens_per_rank, MAX_SEQ_LEN, bos_id)
            assert as_lists(batch) == as_lists(single.next_batch())
        assert len({str(loader.state_dict()) for loader in ranks}) == 1  # all ranks at the same place
    for loader in [single, *ranks]:
        loader.close()


def test_ranks_never_share_a_document(tmp_path):
    """Documents tagged with their number: each rank batch (in stream order) holds the documents
    right after the previous one's, none twice, none skipped -- until the stream wraps."""
    rng = np.random.default_rng()
    bos_id, world_size, tokens_per_rank = 0, 4, 30
    lengths = rng.integers(2, 3 * MAX_SEQ_LEN + 1, size=300)
    docs = [np.concatenate(([bos_id], np.full(n - 1, doc_id + 1))) for doc_id, n in enumerate(lengths)]
    path = write_raw_shard(tmp_path / "train_000001.bin", np.concatenate(docs))
    loaders = [
        DistributedBOSLoader([path], tokens_per_rank, MAX_SEQ_LEN, bos_id, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    next_doc, wraps = 1, 0
    for _ in range(60):  # more than one epoch (300 documents of at most 16 tokens)
        for loader in loaders:
            batch = loader.next_batch()
            inputs, bounds = batch.inputs.tolist(), batch.cu_seqlens.tolist()
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                # A batch may end on a lone BOS: that document is cut to its BOS, the rest dropped.
                doc = inputs[start + 1] if end - start > 1 else next_doc
                assert doc == next_doc
                assert inputs[start:end] == [bos_id] + [doc] * (end - start - 1)
                wraps += doc == len(docs)
                next_doc = doc % len(docs) + 1
    assert wraps >= 1  # the check ran across the wrap-around
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("world_size", [1, 2])
def test_state_dict_round_trip_resumes_the_same_batches(tmp_path, world_size):
    rng = np.random.default_rng()
    files, bos_id, _ = make_corpus(tmp_path, rng, [8, 5, 7])
    tokens_per_rank = 50
    original = DistributedBOSLoader(files, tokens_per_rank, MAX_SEQ_LEN, bos_id, rank=world_size - 1, world_size=world_size)
    for _ in range(int(rng.integers(3, 12))):
        original.next_batch()
    state = original.state_dict()
    assert set(state) == {"shard_index", "token_offset", "epoch"}
    continued = [as_lists(original.next_batch()) for _ in range(8)]
    resumed = DistributedBOSLoader(files, tokens_per_rank, MAX_SEQ_LEN, bos_id, rank=world_size - 1, world_size=world_size)
    resumed.next_batch()  # somewhere else first: load_state_dict must reposition
    resumed.load_state_dict(state)
    assert [as_lists(resumed.next_batch()) for _ in range(8)] == continued
    # an offset inside a document (not offset + 1: a random document can be a lone BOS, so the next
    # token may start another document; that made this test fail now and then)
    tokens = read_shard(files[state["shard_index"]])
    inside = np.flatnonzero(tokens != bos_id)
    assert inside.size, "the random corpus has no token besides BOS"
    with pytest.raises(ValueError, match="not a document start"):
        resumed.load_state_dict({**state, "token_offset": int(inside[0])})
    original.close()
    resumed.close()


def test_read_shard_round_trip(tmp_path):
    tokens = np.random.default_rng().integers(0, 1 << 16, size=1000)
    path = write_raw_shard(tmp_path / "val_000000.bin", tokens)
    read = read_shard(path)
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: p, "shard not found"),
        (lambda p: p.write_bytes(b"\0" * 100), "shorter than"),
        (lambda p: write_raw_shard(p, [1, 2], magic=123), "bad magic"),
        (lambda p: write_raw_shard(p, [1, 2], version=2), "unsupported shard version"),
        (lambda p: write_raw_shard(p, [1, 2, 3], count=5), "header says 5 tokens"),
    ],
)
def test_bad_shards_are_named_in_the_error(tmp_path, make_bad, message):
    path = tmp_path / "fineweb_train_000001.bin"
    make_bad(path)
    with pytest.raises(ShardError, match=message) as error:
        read_shard(path)
    assert str(path) in str(error.value)
    if path.exists():  # the loader surfaces the same error from its prefetch thread
        with pytest.raises(ShardError, match=message):
            DistributedBOSLoader([path], 8, MAX_SEQ_LEN, bos_id=0)


def test_find_shards(tmp_path):
    for name in ["fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
                 "train_000003.bin", "train_1.bin", "train_000001.bin.tmp"]:
        write_raw_shard(tmp_path / name, [0])
    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "train_000003.bin"]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    with pytest.raises(ShardError, match="no test shards") as error:
        find_shards(tmp_path, "test")
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ShardError, match="not found"):
        find_shards(tmp_path / "missing", "train")


def test_no_documents_anywhere_is_an_error(tmp_path):
    path = write_raw_shard(tmp_path / "train_000001.bin", [5, 6, 7])
    with pytest.raises(ShardError, match="no document starting with BOS id 0"):
        DistributedBOSLoader([path], 8, MAX_SEQ_LEN, bos_id=0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sequential_loader_reads_the_stream_contiguously(tmp_path, world_size):
    """Validation reads the first tokens of the split as they are (the speedrun's val loader): every rank's
    forwards, interleaved, are the stream itself; documents are neither clipped nor realigned."""
    rng = np.random.default_rng(7)
    files, bos_id, docs = make_corpus(tmp_path, rng, [5, 7])
    stream = np.concatenate(docs)
    n, num_tokens = 24, 24 * world_size * 3
    loaders = [SequentialLoader(files, n, num_tokens, bos_id, rank, world_size) for rank in range(world_size)]
    seen = []
    for _ in range(3):
        for loader in loaders:
            batch = loader.next_batch()
            start = len(seen)
            seen.extend(batch.inputs.tolist())
            assert batch.targets.tolist() == stream[start + 1 : start + n + 1].tolist()
            starts = [0] + [i for i in range(1, n) if stream[start + i] == bos_id] + [n]
            assert batch.cu_seqlens.tolist() == starts
    assert seen == stream[:num_tokens].tolist()
    with pytest.raises(StopIteration):
        loaders[0].next_batch()


def test_sequential_loader_names_the_shards_when_too_short(tmp_path):
    rng = np.random.default_rng(8)
    files, bos_id, docs = make_corpus(tmp_path, rng, [2])
    total = sum(d.size for d in docs)
    with pytest.raises(ShardError, match="fineweb_train_000001.bin.*fewer than"):
        SequentialLoader(files, 8, total, bos_id)  # needs total + 1
    SequentialLoader(files, 1, total - 1, bos_id).next_batch()


def test_clipped_fraction_counts_what_clipping_leaves_out(tmp_path):
    bos = 7
    docs = [[bos] + [1] * 9, [bos] + [2] * 29, [bos] + [3] * 3]  # 10 + 30 + 4 tokens; clipped to 16: 10 + 16 + 4
    path = write_raw_shard(tmp_path / "fineweb_train_000001.bin", [t for d in docs for t in d])
    loader = DistributedBOSLoader([path], 8, 16, bos)
    assert loader.clipped_fraction() == pytest.approx(14 / 44)
    loader.close()
    loader = DistributedBOSLoader([path], 8, 64, bos)
    assert loader.clipped_fraction() == 0.0
    loader.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loaders_give_the_cpu_batches(tmp_path):
    """On CUDA the batches are assembled in pinned host memory and copied asynchronously (to_device_async):
    the same tokens, dtypes and document starts as on the CPU, batch after batch across shards."""
    rng = np.random.default_rng()
    files, bos_id, _ = make_corpus(tmp_path, rng, [30, 0, 12])
    pairs = [(DistributedBOSLoader(files, 200, MAX_SEQ_LEN, bos_id),
              DistributedBOSLoader(files, 200, MAX_SEQ_LEN, bos_id, device="cuda")),
             (SequentialLoader(files, 64, 64 * 6, bos_id), SequentialLoader(files, 64, 64 * 6, bos_id, device="cuda"))]
    for cpu, gpu in pairs:
        for _ in range(6):
            want, got = cpu.next_batch(), gpu.next_batch()
            for a, b in zip(want, got, strict=True):
                assert b.is_cuda and a.dtype == b.dtype and torch.equal(a, b.cpu())
    for loader in pairs[0]:  # the shard loaders' background threads
        loader.close()
