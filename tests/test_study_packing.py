"""The speedrun's probe documents packed into forwards of one length (modded_nanogpt/probes.py): the scores equal
one document per forward, every forward has one shape, one traced graph serves every forward and window, and a
docs file whose documents do not start with the trainer's BOS token is refused before anything runs (CPU; the
compiled path on CUDA in the GPU tier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modded_nanogpt import probes
from modded_nanogpt.model import BLOCK, GPT, ModelConfig
from nanogpt.probe_store import ProbeError, ProbeStore, Study, make_docs, write_docs
from tests.fixtures import run_module

VOCAB, BOS = 97, 96
FORWARD = 256  # tokens per packed forward in these tests (two FlexAttention blocks)
# Packed and single-document forwards differ only in float rounding: the same attention within each document
# over keys at other absolute positions (RoPE of a shifted pair), and matmuls over other row counts. Measured
# on the model below: 2.4e-6 at most on losses of ~4.6 (float32).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def tiny_model(backend: str, seed: int = 0, **changes) -> GPT:
    """Every feature on (paired heads, long windows, key offset, value and bigram embeddings, smear, skip,
    backout, softcap), every parameter random: zero-initialized gates and tables would hide features."""
    config = dict(vocab_size=VOCAB, bos_id=BOS, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                  attention_skip_layers=[2], long_window_layers=[1, 3], paired_head_layers=[0],
                  value_embed_layers=[0, 3], skip_from=0, skip_to=2, backout_layer=2, fp8=False)
    model = GPT(ModelConfig(**config | changes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.scalars.add_(0.5)
    model.attention_backend = backend
    return model


def random_docs(seed: int, extra_lengths=()):
    """Documents of random lengths (2..199 tokens), BOS first, plus `extra_lengths` (e.g. longer than a
    forward), in a random order."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(2, 200, 14)] + list(extra_lengths)
    rng.shuffle(lengths)
    documents = [np.concatenate([[BOS], rng.integers(0, BOS, n - 1)]) for n in lengths]
    return make_docs(documents, [""] * len(documents), [-1] * len(documents), {"bos_id": BOS})


def one_document_per_forward(model, docs, short, long, forward_tokens) -> np.ndarray:
    """The scores written out the plain way: each document alone, in consecutive pieces of forward_tokens,
    each piece its own forward (FlexAttention's last block filled with BOS tokens whose states are dropped)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(len(docs)):
            tokens = torch.tensor(docs.document(i), dtype=torch.int32, device=model.lm_head_t.device)
            inputs, targets = tokens[:-1], tokens[1:].long()
            for start in range(0, len(inputs), forward_tokens):
                piece = inputs[start:start + forward_tokens]
                n = piece.numel()
                if model.attention_backend == "flex" and n % BLOCK:
                    piece = F.pad(piece, (0, BLOCK - n % BLOCK), value=BOS)
                states = model.states(piece, short, long)[:n]
                out.append(probes.token_losses(model, states, targets[start:start + forward_tokens]))
    model.train()
    return torch.cat(out).cpu().numpy()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_scores_equal_one_document_per_forward(backend):
    """Random documents, one longer than two forwards and one filling a forward exactly: packed, each
    document's scores are those of its own forwards, in order (flex runs eagerly on CPU)."""
    model = tiny_model(backend)
    docs = random_docs(1, extra_lengths=(2 * FORWARD + 77, FORWARD + 1))
    packed = probes.pack_documents(model, docs, FORWARD, "cpu")
    alone = int(sum(-(-(n - 1) // FORWARD) for n in docs.lengths))  # forwards of one document (piece) each
    assert len(packed) < 0.8 * alone
    for short, long in ((1, 2), (2, 3)):
        scores = probes.score_documents(model, packed, short, long)
        assert model.training  # back in the mode it was in
        assert scores.dtype == np.float32 and scores.shape == (docs.num_scores,)
        np.testing.assert_allclose(scores, one_document_per_forward(model, docs, short, long, FORWARD), **TOLERANCE)


def test_placements_fill_forwards_in_order_and_long_documents_start_forwards():
    lengths = np.array([101, 60, 51, 300, 10, 257, 2])  # inputs: 100, 59, 50, 299 (128 + 128 + 43), 9, 256, 1
    assert probes.placements(lengths, 128) == [
        (0, 0, 0, 0, 100),  # forward, offset, document, first input, inputs
        (1, 0, 1, 0, 59), (1, 59, 2, 0, 50),  # the second does not fit after the first
        (2, 0, 3, 0, 128), (3, 0, 3, 128, 128), (4, 0, 3, 256, 43),  # cut into pieces, each starting a forward
        (4, 43, 4, 0, 9),  # the next document follows the last piece
        (5, 0, 5, 0, 128), (6, 0, 5, 128, 128),  # exactly two forwards
        (7, 0, 6, 0, 1),
    ]


@pytest.mark.parametrize("backend", ["sdpa", "flex", "fa3", "fa4"])
def test_every_forward_has_one_shape_and_the_documents_bos_boundaries(backend):
    """Inputs and targets of every forward are forward_tokens long (padding: BOS tokens); FA3/FA4's boundaries
    are the loader's (0, every document start) with the padding one segment, all forwards' of one length,
    padded as train_gpt.flash_boundaries pads a batch's. (Packing only: fa3/fa4 do not run on CPU.)"""
    from modded_nanogpt.train_gpt import FLASH_BOUNDARY_SLOTS

    model = tiny_model(backend)
    docs = random_docs(2, extra_lengths=(3 * FORWARD,))
    packed = probes.pack_documents(model, docs, FORWARD, "cpu")
    assert {tuple(t.shape) for t in packed.inputs + packed.targets} == {(FORWARD,)}
    assert {t.dtype for t in packed.inputs} == {torch.int32} and {t.dtype for t in packed.targets} == {torch.int64}
    flat_inputs, flat_targets = torch.cat(packed.inputs), torch.cat(packed.targets)
    padding = torch.ones(flat_inputs.numel(), dtype=torch.bool)
    padding[packed.keep] = False
    assert (flat_inputs[padding] == BOS).all()
    # The kept positions hold every document's inputs and targets, one document after another.
    expected = np.concatenate([docs.document(i)[:-1] for i in range(len(docs))])
    assert np.array_equal(flat_inputs[packed.keep].numpy(), expected)
    assert np.array_equal(flat_targets[packed.keep].numpy(), np.concatenate([docs.document(i)[1:]
                                                                             for i in range(len(docs))]))
    if backend in ("sdpa", "flex"):
        assert packed.cu_seqlens == [None] * len(packed)
        return
    assert {tuple(cu.shape) for cu in packed.cu_seqlens} == {(FORWARD + 1,)}  # min(1024 slots, tokens + 1)
    assert FLASH_BOUNDARY_SLOTS > FORWARD
    for inputs, keep_row, cu in zip(packed.inputs, padding.view(len(packed), FORWARD), packed.cu_seqlens,
                                    strict=True):
        assert cu.dtype == torch.int32
        end = int((~keep_row).sum())  # real tokens come first
        assert not keep_row[:end].any() and keep_row[end:].all()
        starts = [0] + [p for p in torch.nonzero(inputs[:end] == BOS).flatten().tolist() if p > 0]
        segments = starts + ([end] if end < FORWARD else [])
        values = cu.tolist()
        assert values[:len(segments)] == segments and set(values[len(segments):]) == {FORWARD}


def test_one_traced_graph_serves_every_forward_and_window():
    """What the trainer compiles on CUDA, traced on CPU (fullgraph, static shapes): one graph for all forwards
    of a packing and every window pair (windows are tensors), scoring as the eager path."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = tiny_model("flex")
    docs = random_docs(3, extra_lengths=(FORWARD + 50,))
    packed = probes.pack_documents(model, docs, FORWARD, "cpu")
    compiled = torch.compile(probes.packed_losses, fullgraph=True, dynamic=False, backend=recording_backend)
    for short, long in ((1, 2), (2, 3)):
        np.testing.assert_array_equal(probes.score_documents(model, packed, short, long, compiled),
                                      probes.score_documents(model, packed, short, long))
    assert len(packed) > 2 and len(graphs) == 1


def test_forward_length_is_the_validation_forward_capped_by_backend_in_whole_blocks():
    cap, dense = probes.PACKED_FORWARD_TOKENS, probes.DENSE_FORWARD_TOKENS
    assert cap % BLOCK == 0 and dense % BLOCK == 0
    assert probes.forward_tokens("fa3", True, 262_144) == probes.forward_tokens("fa4", False, 262_144) == cap
    assert probes.forward_tokens("flex", True, 262_144) == cap
    # SDPA, and FlexAttention without torch.compile, hold dense (tokens, tokens) scores.
    assert probes.forward_tokens("flex", False, 262_144) == probes.forward_tokens("sdpa", False, 262_144) == dense
    assert probes.forward_tokens("fa3", True, 1024) == 1024
    assert probes.forward_tokens("sdpa", False, 1000) == 1024  # whole blocks


def bad_docs_file(path, first_tokens=(BOS, BOS, 5, BOS)):
    """Documents whose first tokens are `first_tokens` (here the third starts with token 5, not BOS)."""
    documents = [np.array([first, 1, 2, 3]) for first in first_tokens]
    write_docs(path, make_docs(documents, [""] * len(documents), [-1] * len(documents), {"bos_id": 5}))
    return path


def test_packing_and_the_study_refuse_documents_that_do_not_start_with_bos(tmp_path):
    from nanogpt.probe_store import read_docs

    path = bad_docs_file(tmp_path / "bad.npz")
    message = (r"document 2 starts with token 5, not the model's BOS token 96 \(1 of 4 documents do not; the file "
               r"was selected with bos_id 5\)")
    with pytest.raises(ProbeError, match=message):
        probes.pack_documents(tiny_model("sdpa"), read_docs(path), FORWARD, "cpu")
    with pytest.raises(ProbeError, match=f"{path}: " + message):
        Study(tmp_path / "run", str(path), 1, "", "", "full", 5, VOCAB, True, bos_id=BOS)
    assert not (tmp_path / "run").exists()
    # A trainer without a BOS token to pack by (the baseline: bos_id -1) takes them.
    assert Study(tmp_path / "run", str(path), 1, "", "", "full", 5, VOCAB, True).docs is not None


def corpus_bos(data_dir) -> int:
    import json

    return json.loads((data_dir / "corpus.json").read_text())["eot_id"]


def test_the_speedrun_refuses_a_docs_file_without_its_bos_before_building_anything(char_corpus, tmp_path):
    eot = corpus_bos(char_corpus)
    path = bad_docs_file(tmp_path / "bad.npz", first_tokens=(eot, 4 if eot != 4 else 5))
    run_dir = tmp_path / "run"
    proc = run_module("modded_nanogpt.train_gpt", "--recipe=tiny_cpu", f"--data_dir={char_corpus}",
                      f"--run_dir={run_dir}", "--num_iterations=4", f"--probe_docs={path}", "--probe_every=2",
                      check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: document 1 starts with token" in proc.stderr and f"BOS token {eot}" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_score_checkpoints_refuses_a_docs_file_without_the_runs_bos_before_writing(char_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_module("modded_nanogpt.train_gpt", "--recipe=tiny_cpu", f"--data_dir={char_corpus}", f"--run_dir={run_dir}",
               "--num_iterations=4", "--extension_iterations=0", "--save_checkpoints=2")
    path = bad_docs_file(tmp_path / "bad.npz", first_tokens=(4 if corpus_bos(char_corpus) != 4 else 5,))
    proc = run_module("modded_nanogpt.score_checkpoints", run_dir, "--docs", path, "--device=cpu", check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: document 0 starts with token" in proc.stderr and "not the model's BOS token" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "probes").exists()
    assert ProbeStore(run_dir).steps() == {}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "fa4"])
def test_gpu_compiled_packed_scores_near_one_document_per_forward(backend):
    """On CUDA the trainer's probe forward, compiled, packed in forwards of the trainer's size (bf16), near the
    eager one-document-per-forward scores of the same backend."""
    from modded_nanogpt.model import fa4_import_error

    if backend == "fa4" and (torch.cuda.get_device_capability()[0] not in (9, 10) or fa4_import_error()):
        pytest.skip("FlashAttention 4 needs sm90/sm100 and flash-attn-4")
    model = tiny_model(backend, model_dim=256, head_dim=128).cuda()  # head dimensions the GPU kernels take
    docs = random_docs(4, extra_lengths=(3000,))
    tokens = probes.forward_tokens(backend, True, 262_144)
    packed = probes.pack_documents(model, docs, tokens, "cuda")
    compiled = torch.compile(probes.packed_losses, fullgraph=True, dynamic=False)
    scores = probes.score_documents(model, packed, 2, 5, compiled)
    if backend == "fa4":
        reference = probes.score_documents(model, probes.pack_documents(model, docs, tokens, "cuda"), 2, 5)
    else:  # eager FlexAttention materializes the scores: one document per forward keeps them small
        reference = one_document_per_forward(model, docs, 2, 5, tokens)
    assert np.isfinite(scores).all() and scores.shape == reference.shape
    assert np.abs(scores - reference).mean() < 2e-2 * np.abs(reference).mean()
