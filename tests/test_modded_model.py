"""The speedrun model on CPU: masks, rotary/YaRN, every flag, the published defaults, initialization and
schedule (record #68), and the all-off model against a plain reference."""

import dataclasses
import json
import math
import os
import shutil
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from modded_nanogpt import model as modded_model
from modded_nanogpt.model import (
    BLOCK,
    EVAL_HEAD_ROWS,
    GPT,
    ModelConfig,
    _ordered_lists_op,
    attend,
    attention_mask,
    block_classes,
    dense_mask,
    fa4_precompile,
    flex_block_mask,
    norm,
    ordered_lists,
    rotary_frequencies,
    validate_config,
    yarn_rescale,
)

VOCAB, BOS = 128, 0


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, bos_id=BOS, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                attention_skip_layers=[2], long_window_layers=[1, 3], paired_head_layers=[0], value_embed_layers=[0, 3],
                skip_from=0, skip_to=2, backout_layer=2, fp8=False)
    base.update(changes)
    return ModelConfig(**base)


def packed_tokens(T=256, seed=0, doc_lengths=(70, 31, 100, 55)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (T + 1,), generator=g)
    pos = 0
    for length in doc_lengths:
        if pos >= T:
            break
        tokens[pos] = BOS
        pos += length
    return tokens[:-1], tokens[1:]


def randomized(model: GPT, seed=1) -> GPT:
    """Every parameter random (zero-initialized gates, tables and projections would hide features)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.scalars.add_(0.5)
    return model


def loss_of(model, inputs, targets, short=1, long=2, mtp=(1.0,)):
    return model(inputs, targets, short, long, torch.tensor(mtp), 1.0)


def test_forward_backward_tiny():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    inputs, targets = packed_tokens()
    loss = loss_of(model, inputs, targets, mtp=(1.0, 0.5, 0.25))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["embed"] is None  # tied: the embedding reads lm_head_t
    for name in ("attn_bank", "mlp_bank", "lm_head_t", "scalars", "x0_lambdas", "value_embeds", "bigram_embed",
                 "attn_gate", "skip_gate"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
    # The padding slots of the MLP bank (4 layers -> 4 slots here) and the gates' inputs exist as declared.
    assert model.mlp_bank.shape == (4, 2, 256, 64) and model.attn_bank.shape == (3, 4 * 64, 64)


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    inputs, targets = packed_tokens()
    per_token = loss_of(model, inputs, targets).item() / targets.numel()
    # softcap maps logits near 0 into ~23 * sigmoid(2/3) but every logit alike: near log(V)
    assert abs(per_token - math.log(VOCAB)) < 0.5


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("window", [1, 100, 127, 128, 200, 1000])
def test_block_classes_agree_with_the_dense_mask(paired, window):
    """Each (query block, key block) tile of the dense mask is all allowed (full), some (partial) or none,
    for a plain stream and a paired one (two positions per token)."""
    g = torch.Generator().manual_seed(window + paired)
    P = 1024
    tokens = P // 2 if paired else P
    starts = torch.zeros(tokens, dtype=torch.bool)
    starts[0] = True
    starts[torch.randint(1, tokens, (6,), generator=g)] = True
    doc = torch.cumsum(starts.int(), 0).repeat_interleave(2 if paired else 1)
    dense = dense_mask(doc, window)
    partial, full = block_classes(doc, window)
    nb = P // BLOCK
    for qb in range(nb):
        for kb in range(nb):
            tile = dense[qb * BLOCK:(qb + 1) * BLOCK, kb * BLOCK:(kb + 1) * BLOCK]
            if full[qb, kb]:
                assert tile.all(), (qb, kb)
            elif partial[qb, kb]:
                assert tile.any() and not tile.all(), (qb, kb)
            else:
                assert not tile.any(), (qb, kb)
            assert not (partial[qb, kb] and full[qb, kb])


def keys_of(mask_row: torch.Tensor) -> list[int]:
    return mask_row.nonzero().flatten().tolist()


def test_dense_mask_rules():
    """Causal, same document, and q - k <= window positions (FlashAttention's window_size=(window, 0)):
    window 2 admits keys t, t-1, t-2; in a paired stream those are 3 positions, 1.5 tokens."""
    doc = torch.tensor([1, 1, 1, 2, 2, 2, 2, 2])  # document 2 starts at position 3
    mask = dense_mask(doc, 2)
    assert keys_of(mask[7]) == [5, 6, 7]  # 7 - 4 = 3 > 2: outside the window
    assert keys_of(mask[2]) == [0, 1, 2]
    assert keys_of(mask[4]) == [3, 4]  # position 2 is in the window but in another document
    assert not mask[4, 5]  # the future
    assert torch.equal(dense_mask(doc, 0), torch.eye(8, dtype=torch.bool))  # window 0: the query alone
    paired = dense_mask(doc.repeat_interleave(2), 2)  # positions 2t, 2t+1 belong to token t
    assert keys_of(paired[15]) == [13, 14, 15]  # token 7's two positions and token 6's second one
    assert keys_of(paired[14]) == [12, 13, 14]  # token 7's first position and both of token 6's
    assert paired[5, 4] and not paired[4, 5]  # within a token: position 1 sees position 0, not the reverse
    assert keys_of(paired[7]) == [6, 7]  # token 3 opens document 2 (positions 6, 7)


def test_attention_respects_documents_and_windows():
    g = torch.Generator().manual_seed(0)
    T, H, D = 64, 2, 16
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    doc = torch.tensor([0] * 20 + [1] * 44)
    mask = attention_mask(doc, 8, "sdpa")
    out = attend(q, k, v, mask, None, 8, 0, 0.25, "sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[:20], v2[:20] = torch.randn(20, H, D), torch.randn(20, H, D)  # change document 0 only
    k2[21:30], v2[21:30] = torch.randn(9, H, D), torch.randn(9, H, D)  # and keys 21..29
    out2 = attend(q, k2, v2, mask, None, 8, 0, 0.25, "sdpa")
    assert torch.equal(out[38:], out2[38:])  # queries >= 38 see only keys 30.. of their own document
    assert not torch.allclose(out[37], out2[37])  # query 37 still sees key 29 (37 - 29 = 8)
    assert not torch.allclose(out[20:30], out2[20:30])
    # The reference: softmax over the allowed keys only, one query at a time.
    for t in (0, 20, 27, 63):
        keys = [j for j in range(T) if doc[j] == doc[t] and 0 <= t - j <= 8]
        scores = torch.einsum("hd,jhd->hj", q[t], k[keys]) * 0.25
        expected = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[keys])
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-6)


def same_block_lists(a, b) -> bool:
    """Two BlockMasks list the same blocks (everything but the mask_mod function)."""
    for x, y in zip(a.as_tuple()[:-1], b.as_tuple()[:-1], strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
            return False
    return True


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_masks_built_once_per_forward_equal_the_masks_of_each_layer(backend):
    """attention_masks builds one mask per kind of layer; each layer's is the one built for its own window
    and pairing (what building it inside the layer gave), for int and 0-d tensor windows alike."""
    model = GPT(tiny_config(num_layers=6, attention_skip_layers=[2], long_window_layers=[1, 3, 5],
                            paired_head_layers=[0, 3], value_embed_layers=[0]))
    model.attention_backend = backend
    inputs, _ = packed_tokens(T=512, doc_lengths=(70, 200, 31, 150))
    doc = torch.cumsum((inputs == BOS).int(), 0)
    short, long = 1 * BLOCK, 3 * BLOCK
    masks = model.attention_masks(doc, short, long)
    tensor_masks = model.attention_masks(doc, torch.tensor(short), torch.tensor(long))
    assert set(masks) == {(False, True), (True, False), (True, True), (False, False)}
    for layer in model.attn_layers:
        long_layer, paired = layer in model.config.long_window_layers, layer in model.config.paired_head_layers
        layer_doc = doc.repeat_interleave(2) if paired else doc
        window = long if long_layer else short
        per_layer = attention_mask(layer_doc, window, backend)
        for built in (masks, tensor_masks):
            mask = built[long_layer, paired]
            if backend == "sdpa":
                assert torch.equal(mask, per_layer) and torch.equal(mask, dense_mask(layer_doc, window))
            else:
                assert same_block_lists(mask, per_layer)
                # the mask_mod agrees with the dense mask on every pair (checks the captured window)
                pos = torch.arange(layer_doc.numel())
                assert torch.equal(mask.mask_mod(0, 0, pos[:, None], pos[None, :]), dense_mask(layer_doc, window))


@pytest.mark.parametrize("n", [1, 3, 128, 257])
def test_ordered_lists_equal_a_stable_descending_argsort(n):
    g = torch.Generator().manual_seed(n)
    blocks = torch.rand(n, n, generator=g) < torch.rand(n, 1, generator=g)  # rows from empty to full
    blocks[0] = True
    blocks[-1] = False
    counts, order = ordered_lists(blocks)
    want = torch.argsort(blocks.int(), dim=-1, descending=True, stable=True).int()
    assert counts.dtype == order.dtype == torch.int32
    assert torch.equal(counts[0, 0], blocks.sum(-1).int())
    assert torch.equal(order[0, 0], want)
    # a compiled graph sees the op through its fake: same shapes and strides, also for a transposed input
    torch.library.opcheck(_ordered_lists_op, (blocks,))
    torch.library.opcheck(_ordered_lists_op, (blocks.transpose(0, 1),))


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU backend needs a C++ compiler")
def test_flex_block_mask_built_inside_a_compiled_graph_attends_as_the_dense_mask():
    """What the trainer compiles, on CPU: the block mask built inside a fullgraph torch.compile from the
    documents and a 0-d window tensor, then flex_attention with it, for plain and paired-head positions, equals
    SDPA with the dense mask. (A variant that sliced the four block lists out of one stacked op output broke
    Inductor's flex template here; the GPU tests run the Triton side.)"""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    T, H, D = 512, 2, 16
    doc = torch.cumsum((packed_tokens(T=T, doc_lengths=(150, 40, 200))[0] == BOS).int(), 0)
    q, k, v = (torch.randn(1, H, 2 * T, D, generator=g) for _ in range(3))

    # The paired positions' documents come in as an input: Inductor's CPU flex template (not the GPU one the
    # trainer uses) refuses a mask_mod that reads a tensor computed inside the graph.
    def attend_both(q, k, v, doc, paired_doc, window):
        plain = flex_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], block_mask=flex_block_mask(doc, window))
        paired = flex_attention(q, k, v, block_mask=flex_block_mask(paired_doc, window))
        return plain, paired

    window = 2 * BLOCK - 50  # a window that ends inside a block: partial blocks on both edges
    plain, paired = torch.compile(attend_both, fullgraph=True)(q, k, v, doc, doc.repeat_interleave(2),
                                                               torch.tensor(window))
    for out, positions_doc, n in ((plain, doc, T), (paired, doc.repeat_interleave(2), 2 * T)):
        want = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n],
                                              attn_mask=dense_mask(positions_doc, window))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_lists_equal_those_flex_derives_itself():
    """The per-key-block lists built here from the transposed classes equal FlexAttention's own
    transposition of the per-query-block lists (which sorts)."""
    from torch.nn.attention.flex_attention import BlockMask

    doc = torch.cumsum((packed_tokens(T=1024, doc_lengths=(300, 50, 500))[0] == BOS).int(), 0)
    for repeats, window in ((1, 2 * BLOCK), (2, 3 * BLOCK), (1, 1), (2, BLOCK - 1)):
        positions_doc = doc.repeat_interleave(repeats)
        ours = flex_block_mask(positions_doc, window)
        theirs = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                          ours.full_kv_indices, BLOCK_SIZE=BLOCK, mask_mod=ours.mask_mod)
        assert same_block_lists(ours, theirs)


def test_flex_block_mask_of_a_tensor_window_equals_that_of_an_int():
    doc = torch.cumsum((packed_tokens(T=1024, doc_lengths=(300, 50, 500))[0] == BOS).int(), 0)
    for repeats in (1, 2):
        positions_doc = doc.repeat_interleave(repeats)
        a, b = (flex_block_mask(positions_doc, w) for w in (2 * BLOCK, torch.tensor(2 * BLOCK)))
        assert same_block_lists(a, b)


def test_windows_as_tensors_give_the_same_loss_and_gradients():
    """The trainer passes windows as 0-d tensors (one compiled graph for every window): the same function."""
    model = randomized(GPT(tiny_config()))
    inputs, targets = packed_tokens()
    results = []
    for short, long in ((1, 2), (torch.tensor(1), torch.tensor(2))):
        model.zero_grad(set_to_none=True)
        loss = model(inputs, targets, short, long, torch.tensor([1.0, 0.5]), 1.0)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("changes", [{}, {"value_embeds": False, "bigram_embeds": False}])
def test_gathered_rows_give_the_dense_gradients(tied, changes):
    """--embedding_grads=scatter: rows gathered outside the graph, their gradients scatter-added into the tables'
    .grad after each backward, accumulated over micro-steps, equal autograd's dense table gradients (every
    parameter, also rows no token read: zero); the losses are identical. While tied the token rows are the
    head's, their gradient lands in embed.grad, and tie_gradients() adds it to the head's: the tied weight's
    gradient, as autograd gives it when the graph reads the head for both uses."""
    model = randomized(GPT(tiny_config(**changes)))
    if not tied:
        model.untie()
    batches = [packed_tokens(seed=s) for s in (0, 1)]  # two micro-steps: the second adds to the first's grads
    results = []
    for scatter in (False, True):
        model.zero_grad(set_to_none=True)
        losses = []
        for inputs, targets in batches:
            rows, todo = model.gather_rows(inputs) if scatter else (None, [])
            loss = model(inputs, targets, 1, 2, torch.tensor([1.0, 0.5]), 1.0, None, rows)
            loss.backward()
            model.add_row_grads(todo)
            losses.append(loss.detach())
        if scatter and tied:
            assert model.embed.grad is not None and torch.equal(model.embed, model.lm_head_t.T)
        model.tie_gradients()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
        if scatter:
            assert rows["token"] is not None
            assert (rows["value"] is None) == (changes.get("value_embeds") is False)
    (dense_losses, dense), (scatter_losses, scattered) = results
    assert all(torch.equal(a, b) for a, b in zip(dense_losses, scatter_losses, strict=True))
    assert dense.keys() == scattered.keys()
    for name, want in dense.items():
        if want is None:
            assert scattered[name] is None, name
        else:
            torch.testing.assert_close(scattered[name], want, rtol=1e-5, atol=1e-5, msg=name)  # summation order
    if not changes:
        assert (scattered["bigram_embed"] == 0).all(dim=1).any()  # rows no bigram hashed to stay zero


def test_rotary_half_truncated_and_yarn():
    freqs = rotary_frequencies(128, 1024.0)
    assert freqs.shape == (64,) and (freqs[32:] == 0).all()
    assert freqs[0] == 1.0 and freqs[31] == pytest.approx(1 / 1024)
    new, temperature = yarn_rescale(freqs, 384, 896)
    s = 896 / 384
    assert new[0] == freqs[0]  # turns many times in the window: kept
    assert new[31] == pytest.approx(freqs[31] / s)  # less than one turn: interpolated
    assert (new[32:] == 0).all()
    assert temperature == pytest.approx(0.2 * math.log(s) + 1)  # the speedrun's factor 0.2 (YaRN paper: 0.1)
    model = GPT(tiny_config())
    model.set_long_window(3)
    before = model.rotary_freqs.clone()
    model.set_long_window(3)
    assert torch.equal(model.rotary_freqs, before)  # no growth, no change
    model.set_long_window(7)
    assert model.temperature == pytest.approx(0.2 * math.log(7 / 3) + 1)
    assert int(model.yarn_window) == 7 * BLOCK and not torch.equal(model.rotary_freqs, before)


class TensorReads(TorchFunctionMode):
    """Records the tensor -> Python conversions (int(), float(), bool(), item, tolist) made inside it: on a GPU
    each one waits for the device to drain."""

    READS = ("__int__", "__float__", "__bool__", "item", "tolist")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_per_step_schedule_hooks_read_no_tensor():
    """The trainer calls set_long_window every step: with an unchanged (or smaller) window it must read no buffer
    (each read of a CUDA buffer drained the GPU before every step was queued), and untie none either. The Python
    mirrors stay equal to the buffers through growth, untie and a checkpoint load."""
    model = GPT(tiny_config())
    model.set_long_window(3)
    for blocks in (3, 2, 3):
        with TensorReads() as mode:
            model.set_long_window(blocks)
        assert mode.reads == [], blocks
    model.set_long_window(7)
    with TensorReads() as mode:
        model.untie()
    assert mode.reads == []

    def mirrors(m):
        return m.yarn_tokens, m.temperature, m.is_tied

    assert mirrors(model) == (int(model.yarn_window), float(model.attn_temperature), bool(model.tied)) == \
        (7 * BLOCK, pytest.approx(0.2 * math.log(7 / 3) + 1), False)
    fresh = GPT(tiny_config())
    fresh.load_state_dict(model.state_dict())
    assert mirrors(fresh) == mirrors(model)
    fresh.set_long_window(7)  # the loaded window: no rescaling a second time
    assert torch.equal(fresh.rotary_freqs, model.rotary_freqs)


def test_bigram_hash():
    model = GPT(tiny_config())
    inputs, _ = packed_tokens()
    h = model.bigram_index(inputs)
    buckets = model.bigram_embed.size(0)
    assert buckets == 5 * VOCAB
    assert ((0 <= h) & (h < buckets)).all()
    assert (h[inputs == BOS] == buckets - 1).all()  # a document's first token has no bigram
    same = model.bigram_index(torch.tensor([5, 7, 9, 5, 7]))
    assert same[1] == same[4] and same[1] != same[2]  # a function of (previous, current) only


def test_untie_copies_the_head_and_separates_the_gradients():
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config()))
    inputs, targets = packed_tokens()
    before = loss_of(model, inputs, targets)
    model.untie()
    assert not model.is_tied and torch.equal(model.embed, model.lm_head_t.T)
    after = loss_of(model, inputs, targets)
    torch.testing.assert_close(before, after)
    after.backward()
    assert model.embed.grad is not None and model.embed.grad.abs().sum() > 0
    state = model.state_dict()
    fresh = GPT(tiny_config())
    fresh.load_state_dict(state)
    assert not fresh.is_tied  # the tie state travels with checkpoints


FLAGS = ["value_embeds", "bigram_embeds", "skip_connections", "skip_gate", "smear", "backout", "key_offset", "softcap",
         "qk_norm", "sa_lambdas"]


@pytest.mark.parametrize("flag", FLAGS)
def test_each_off_switch_changes_the_model(flag):
    torch.manual_seed(0)
    on = randomized(GPT(tiny_config()))
    off = GPT(tiny_config(**{flag: False}))
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing
    inputs, targets = packed_tokens()
    assert not torch.allclose(loss_of(on, inputs, targets), loss_of(off, inputs, targets))
    removed = {"value_embeds": {"value_embeds", "ve_gate"}, "bigram_embeds": {"bigram_embed"}, "smear": {"smear_gate"},
               "skip_connections": {"skip_gate"}, "skip_gate": {"skip_gate"}}
    assert set(unexpected) == removed.get(flag, set())


@pytest.mark.parametrize("changes", [{"paired_head_layers": []}, {"mlp_activation": "gelu"},
                                     {"long_window_layers": [1]}, {"attention_skip_layers": []}])
def test_structural_switches_change_the_model(changes):
    torch.manual_seed(0)
    on = randomized(GPT(tiny_config()))
    off = GPT(tiny_config(**changes))
    state = on.state_dict()
    if changes.get("attention_skip_layers") == []:
        state = {k: v for k, v in state.items() if k not in ("attn_bank", "attn_gate")}
    off.load_state_dict(state, strict=False)
    inputs, targets = packed_tokens()
    assert not torch.allclose(loss_of(on, inputs, targets), loss_of(off, inputs, targets))


def test_mtp_weights_add_later_targets():
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config(softcap=False)))
    inputs, targets = packed_tokens()
    one = loss_of(model, inputs, targets, mtp=(1.0,))
    two = loss_of(model, inputs, targets, mtp=(1.0, 0.5))
    zero = loss_of(model, inputs, targets, mtp=(1.0, 0.0))
    torch.testing.assert_close(one, zero)
    assert two > one


def plain_reference_loss(model: GPT, inputs, targets, short, long, skip_weight=None):
    """The all-features-off model written out plainly: x0 mixing, pre-norm attention with half-truncated
    RoPE over each document's sliding window (keys j with t - j <= window tokens), ReLU^2 MLP, RMSNorm, tied
    head, cross-entropy. With sa_lambdas the QKV and O weights are scaled by their gains; with skip_connections
    x += skip_weight(x0) * skip at skip_to, by default sigmoid(lambda) * 2 sigmoid(x0[:, :12] @ W.T)
    (sigmoid(lambda) alone without the skip gate). Scalars as laid out: residual, sa_qkv, sa_o, bigram (L each),
    smear, backout, skip."""
    c = model.config
    L, T, H, D = c.num_layers, inputs.numel(), c.num_heads, c.head_dim
    hd = H * D
    residual, gain_qkv, gain_o = model.scalars[:L], model.scalars[L:2 * L], model.scalars[2 * L:3 * L]
    skip_logit = model.scalars[4 * L + 2]
    if skip_weight is None:
        def skip_weight(x0):
            gate = torch.sigmoid(skip_logit)
            return gate * 2 * torch.sigmoid(x0[:, :12] @ model.skip_gate.T) if c.skip_gate else gate
    doc = torch.cumsum((inputs == c.bos_id).int(), 0)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * model.rotary_freqs[None]
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # (T, H, D): pairs (i, i + D/2)
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * cos[:, None] + b * sin[:, None], b * cos[:, None] - a * sin[:, None]], -1)

    x = x0 = norm(model.lm_head_t.T[inputs])
    skip = None
    for layer in range(L):
        if c.skip_connections and layer == c.skip_to:
            x = x + skip_weight(x0) * skip
        x = residual[layer] * x + model.x0_lambdas[layer] * x0
        if layer not in c.attention_skip_layers:
            w = model.attn_bank[model.attn_slot[layer]]
            g_qkv, g_o = (gain_qkv[layer], gain_o[layer]) if c.sa_lambdas else (1.0, 1.0)
            h = norm(x)
            q, k, v = (h @ (g_qkv * w[i * hd:(i + 1) * hd]).T for i in range(3))
            q, k, v = rope(q.view(T, H, D)), rope(k.view(T, H, D)), v.view(T, H, D)
            window = (long if layer in c.long_window_layers else short) * BLOCK
            y = torch.empty(T, H, D)
            for t in range(T):
                keys = [j for j in range(t + 1) if doc[j] == doc[t] and t - j <= window]
                p = (torch.einsum("hd,jhd->hj", q[t], k[keys]) * c.attn_scale).softmax(-1)
                y[t] = torch.einsum("hj,jhd->hd", p, v[keys])
            gate = torch.sigmoid(h[:, :12] @ model.attn_gate[model.attn_slot[layer]].T)
            x = x + (y * gate[..., None]).reshape(T, hd) @ (g_o * w[3 * hd:]).T  # o stored (out, in)
        up, down = model.mlp_bank[layer]
        x = x + F.relu(norm(x) @ up.T).square() @ down
        if c.skip_connections and layer == c.skip_from:
            skip = x
    logits = norm(x) @ model.lm_head_t
    return F.cross_entropy(logits, targets, reduction="sum")


ALL_OFF = dict(paired_head_layers=[], value_embeds=False, bigram_embeds=False, skip_connections=False, smear=False,
               backout=False, key_offset=False, softcap=False, qk_norm=False, sa_lambdas=False)
PLAIN_PARAMETERS = {"attn_bank", "mlp_bank", "lm_head_t", "embed", "attn_gate", "scalars", "x0_lambdas"}


@pytest.mark.parametrize("extra, added", [
    ({}, set()),
    ({"sa_lambdas": True}, set()),
    ({"skip_connections": True, "skip_gate": True}, {"skip_gate"}),
    ({"skip_connections": True, "skip_gate": False}, set()),
])
def test_all_features_off_is_the_plain_model(extra, added):
    """Every feature off equals plain_reference_loss; so does that model plus the attention gains, or plus the
    skip with its per-token gate or its scalar gate (every parameter random, gains and gate weights included)."""
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config(**{**ALL_OFF, **extra})))
    assert {n for n, _ in model.named_parameters()} == PLAIN_PARAMETERS | added
    inputs, targets = packed_tokens(T=256, doc_lengths=(180, 76))
    # a window of 1 block: the first document (180 tokens) is longer than the window (128 + 1 keys)
    got = loss_of(model, inputs, targets, short=1, long=1)
    expected = plain_reference_loss(model, inputs, targets, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-3)  # a window one key narrower: 0.09 off


@pytest.mark.parametrize("changes, message", [
    ({"paired_head_layers": [9]}, "paired_head_layers: layer indices [9]"),
    ({"paired_head_layers": [2]}, "paired_head_layers: layers [2] have no attention"),
    ({"num_heads": 3, "head_dim": 32, "model_dim": 96}, "even num_heads"),
    ({"skip_from": 3, "skip_to": 1}, "skip_from (3) must be before skip_to (1)"),
    ({"mlp_activation": "swish"}, "mlp_activation"),
    ({"bos_id": 500}, "bos_id 500 is outside"),
    ({"attention_skip_layers": [0, 1, 2, 3]}, "skips every layer"),
])
def test_bad_model_settings_are_named(changes, message):
    with pytest.raises(ValueError) as err:
        validate_config(dataclasses.replace(tiny_config(), **changes))
    assert message in str(err.value)


def final_states(model, inputs, targets, short=1, long=2):
    """The normalized states the head sees, per position (captured at the loss)."""
    captured = {}
    original = model.loss

    def capture(x, *args):
        captured["x"] = x.detach().clone()
        return original(x, *args)

    model.loss = capture
    try:
        model(inputs, targets, short, long, torch.tensor([1.0, 0.5]), 1.0)
    finally:
        model.loss = original
    return captured["x"]


def test_no_position_sees_the_future():
    """Every feature on (paired heads, key offset, smear, bigram, value embeddings, skip, backout): changing
    tokens from position j on leaves every state before j unchanged."""
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config()))
    inputs, targets = packed_tokens(T=256, doc_lengths=(256,))
    j = 150
    changed = inputs.clone()
    changed[j:] = torch.randint(1, VOCAB, (256 - j,), generator=torch.Generator().manual_seed(5))
    a, b = final_states(model, inputs, targets), final_states(model, changed, targets)
    torch.testing.assert_close(a[:j], b[:j], rtol=0, atol=0)
    assert not torch.allclose(a[j:], b[j:])


@pytest.mark.parametrize("flag, other, bad", [("mlp_kernel", "torch", "cuda"), ("qkv_kernel", "torch", "fused")])
def test_kernel_choices_are_the_same_function_on_cpu(flag, other, bad):
    """mlp_kernel and qkv_kernel pick an implementation, never the math: on CPU both values give the same loss
    (qkv_kernel=triton runs its fused op on GPUs only: elsewhere the model computes kernels.attention_inputs_reference)."""
    torch.manual_seed(0)
    a = randomized(GPT(tiny_config()))
    b = GPT(tiny_config(**{flag: other}))
    b.load_state_dict(a.state_dict())
    inputs, targets = packed_tokens()
    torch.testing.assert_close(loss_of(a, inputs, targets), loss_of(b, inputs, targets), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=f"{flag} must be triton or torch, got '{bad}'"):
        validate_config(tiny_config(**{flag: bad}))


# ---- the published record #68 layout, initialization and schedule ------------------------------------------


def attend_calls(model, inputs, short=1, long=2):
    """Each attention layer's call of attend in one forward: {layer: {q, k, v, window, scale}}."""
    calls, original = [], modded_model.attend

    def record(q, k, v, mask, cu_seqlens, window, shift, scale, backend, temperature=None, max_seqlen=None,
               window_unit=1):
        calls.append(dict(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(),
                          window=window * window_unit, scale=scale))  # in positions
        return original(q, k, v, mask, cu_seqlens, window, shift, scale, backend, temperature, max_seqlen,
                        window_unit)

    modded_model.attend = record
    try:
        with torch.no_grad():
            model(inputs, inputs, short, long, torch.tensor([1.0]), 1.0)
    finally:
        modded_model.attend = original
    return dict(zip(model.attn_layers, calls, strict=True))


@pytest.fixture(scope="module")
def default_model():
    """GPT(ModelConfig()) with a small vocabulary (the layer lists and sizes are the defaults)."""
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=1024, bos_id=0))


def test_default_layers_are_the_published_ones(default_model):
    """Long windows on layers 3 and 10, value embeddings on 0, 1, 8, 9, 10, paired heads on 0, 2, 5, 9, no
    attention on 6: as the forward of a default-size model uses them (long window 3 blocks, short 1)."""
    c = ModelConfig()
    assert c.long_window_layers == [3, 10] and c.value_embed_layers == [0, 1, 8, 9, 10]
    assert c.paired_head_layers == [0, 2, 5, 9] and c.attention_skip_layers == [6]
    model = default_model
    assert model.value_embeds.shape == (5, 1024, 768)
    with_ve, original = [], model.attention

    def attention(x, layer, ve, ctx, gains):
        if ve is not None:
            with_ve.append(layer)
        return original(x, layer, ve, ctx, gains)

    model.attention = attention
    try:
        inputs = packed_tokens(T=128, doc_lengths=(128,))[0]
        calls = attend_calls(model, inputs, short=1, long=3)
    finally:
        del model.attention
    assert with_ve == [0, 1, 8, 9, 10]
    assert sorted(calls) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert [layer for layer, call in calls.items() if call["window"] == 3 * BLOCK] == [3, 10]
    assert all(call["window"] == BLOCK for layer, call in calls.items() if layer not in (3, 10))
    # a paired layer attends a (2T, H/2, D) stream: 6 heads of 128 become 3 streams of 256 positions
    assert [layer for layer, call in calls.items() if call["q"].shape == (256, 3, 128)] == [0, 2, 5, 9]


def test_default_initialization_is_the_published_one(default_model):
    """Every parameter of a default-size model (dim 768, 11 layers): Q, K, V, O and MLP up uniform with std
    0.5/sqrt(768) = 0.018 (|w| <= sqrt(3) * 0.018 = 1/32), MLP down 0, head N(0, 0.005) and the embedding its
    copy, tables, gates and x0 lambdas 0; scalars residual 1.1, gains 0.5 and 1.0, bigram 0.1, smear 0,
    backout 0.5, skip logit -1.5."""
    model = default_model
    std, bound = 0.5 / math.sqrt(768), 1 / 32
    assert std == pytest.approx(0.018042, rel=1e-4) and bound == pytest.approx(math.sqrt(3) * std)
    assert {n for n, _ in model.named_parameters()} == {
        "attn_bank", "mlp_bank", "lm_head_t", "embed", "attn_gate", "value_embeds", "ve_gate", "bigram_embed",
        "smear_gate", "skip_gate", "scalars", "x0_lambdas"}

    def uniform_with_std(w):
        assert w.std().item() == pytest.approx(std, rel=0.01)
        assert abs(w.mean().item()) < 1e-4
        assert bound * 0.999 < w.abs().max().item() <= bound

    assert model.attn_bank.shape == (10, 4 * 768, 768)
    for i in range(4):  # q, k, v, o
        uniform_with_std(model.attn_bank[:, i * 768:(i + 1) * 768])
    assert model.mlp_bank.shape == (12, 2, 3072, 768)  # 11 layers in 12 slots
    uniform_with_std(model.mlp_bank[:11, 0])
    assert (model.mlp_bank[:, 1] == 0).all() and (model.mlp_bank[11] == 0).all()
    assert model.lm_head_t.std().item() == pytest.approx(0.005, rel=0.01)
    assert abs(model.lm_head_t.mean().item()) < 5e-5
    assert torch.equal(model.embed, model.lm_head_t.T)
    for name in ("value_embeds", "bigram_embed", "attn_gate", "ve_gate", "smear_gate", "skip_gate", "x0_lambdas"):
        assert (getattr(model, name) == 0).all(), name
    assert model.x0_lambdas.shape == (11,) and model.skip_gate.shape == (1, 12)
    assert model.scalar_index == {"residual": slice(0, 11), "sa_qkv": slice(11, 22), "sa_o": slice(22, 33),
                                  "bigram": slice(33, 44), "smear": 44, "backout": 45, "skip": 46}
    want = torch.tensor([1.1] * 11 + [0.5] * 11 + [1.0] * 11 + [0.1] * 11 + [0.0, 0.5, -1.5])
    torch.testing.assert_close(model.scalars.detach(), want, rtol=0, atol=1e-7)


def test_attention_scale_follows_the_yarn_schedule():
    """Softmax scale 0.1 at the start; the long window 3 -> 7 -> 11 -> 13 blocks multiplies it by
    0.2 ln(new/old) + 1 each time; the same or a smaller window changes nothing; the final validation's 20 blocks
    (no set_long_window) keeps the last scale. Every layer attends with it."""
    model = randomized(GPT(tiny_config()))
    inputs, _ = packed_tokens()

    def scales(long=2):
        return [call["scale"] for call in attend_calls(model, inputs, long=long).values()]

    assert model.config.attn_scale == 0.1 and model.config.yarn_attn_factor == 0.2
    assert scales() == [pytest.approx(0.1)] * 3
    model.set_long_window(3)  # the first window: nothing to rescale
    assert scales() == [pytest.approx(0.1)] * 3
    want = 0.1
    for old, new, literal in ((3, 7, 0.116946), (7, 11, 0.127518), (11, 13, 0.131778)):
        model.set_long_window(new)
        want *= 0.2 * math.log(new / old) + 1
        assert want == pytest.approx(literal, abs=1e-6)
        assert scales() == [pytest.approx(want, rel=1e-6)] * 3
        assert model.temperature == pytest.approx(want / 0.1, rel=1e-6)
    freqs = model.rotary_freqs.clone()
    for blocks in (13, 11, 3):
        model.set_long_window(blocks)
        assert torch.equal(model.rotary_freqs, freqs) and model.temperature == pytest.approx(1.317780, abs=1e-6)
    assert scales(long=20) == [pytest.approx(0.131778, abs=1e-6)] * 3


def paired_config(**changes) -> ModelConfig:
    """One attention layer with paired heads (T x 4 heads of 8 dims), every other feature off."""
    return tiny_config(**{**ALL_OFF, "num_layers": 1, "model_dim": 32, "num_heads": 4, "head_dim": 8,
                          "attention_skip_layers": [], "long_window_layers": [], "paired_head_layers": [0],
                          "value_embed_layers": [], **changes})


def rotated(x, positions, freqs):
    """x (..., D) rotated by angle positions * freqs, pairs (i, i + D/2); positions shaped like x[..., 0]."""
    angles = positions[..., None].float() * freqs
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * angles.cos() + b * angles.sin(), b * angles.cos() - a * angles.sin()], dim=-1)


def test_paired_heads_rotate_head_h_at_token_t_by_position_2t_plus_h_mod_2():
    """A paired layer attends with q/k = the projection of each head h at token t rotated by (2t + h % 2) * freq,
    laid out (T, H, D) -> (2T, H/2, D) (heads h and h + H/2 at rows 2t and 2t + 1 of one stream)."""
    T, H, D = 16, 4, 8
    model = randomized(GPT(paired_config()))
    inputs, _ = packed_tokens(T=T, doc_lengths=(T,))
    call = attend_calls(model, inputs)[0]
    x0 = norm(model.lm_head_t.T[inputs])
    h = norm(model.scalars[0] * x0 + model.x0_lambdas[0] * x0)  # layer 0's attention input
    positions = 2 * torch.arange(T)[:, None] + torch.arange(H)[None] % 2
    assert positions[3].tolist() == [6, 7, 6, 7]
    for name, i in (("q", 0), ("k", 1)):
        projected = (h @ model.attn_bank[0, i * H * D:(i + 1) * H * D].T).view(T, H, D)
        want = rotated(projected, positions, model.rotary_freqs).reshape(2 * T, H // 2, D)
        assert call[name].shape == (2 * T, H // 2, D)
        torch.testing.assert_close(call[name], want.detach(), rtol=1e-5, atol=1e-6)
        # the stream's row 2t + 1 holds head h + H/2 of token t
        assert torch.equal(call[name][2 * 5 + 1, 0], call[name].view(T, H, D)[5, 2])


def test_paired_head_scores_depend_on_twice_the_token_distance():
    """Every token the same (one document): the score of query head 1 at token t with key head 1, and with its
    stream partner head 3, at token t' is q1 . R(2 (t - t') freq) k, a function of 2 (t - t') only."""
    T, H, D = 16, 4, 8
    model = randomized(GPT(paired_config()))
    inputs = torch.full((T,), 5)
    call = attend_calls(model, inputs)[0]
    q, k = call["q"].view(T, H, D), call["k"].view(T, H, D)
    h = norm(model.lm_head_t.T[5])  # the same input row at every token (residual scaling cancels in norm)
    q1 = (h @ model.attn_bank[0, :H * D].T).view(H, D)[1].detach()
    k_all = (h @ model.attn_bank[0, H * D:2 * H * D].T).view(H, D).detach()
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    for key_head in (1, 3):
        scores = q[:, 1] @ k[:, key_head].T  # (t, t')
        want = rotated(q1.expand(T, T, D), 2 * distance, model.rotary_freqs) @ k_all[key_head]
        torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
        once = rotated(q1.expand(T, T, D), distance, model.rotary_freqs) @ k_all[key_head]
        assert not torch.allclose(scores, once, rtol=1e-3, atol=1e-3)  # not the token distance itself


def test_key_offset_only_on_long_window_layers_without_paired_heads():
    """Toggling key_offset changes the keys of the long-window unpaired layer 1, not those of the long-window
    paired layer 0; layer 1's queries stay (the offset moves keys only)."""
    changes = dict(long_window_layers=[0, 1], paired_head_layers=[0], value_embed_layers=[0])
    model = randomized(GPT(tiny_config(**changes)))
    without = GPT(tiny_config(**changes, key_offset=False))
    without.load_state_dict(model.state_dict())
    inputs, _ = packed_tokens()
    with_offset, plain = attend_calls(model, inputs), attend_calls(without, inputs)
    assert torch.equal(with_offset[0]["k"], plain[0]["k"])
    assert not torch.allclose(with_offset[1]["k"], plain[1]["k"])
    assert torch.equal(with_offset[1]["q"], plain[1]["q"])


@pytest.mark.parametrize("window", [0, 1, 2, 5])
def test_a_window_admits_window_plus_one_positions(window):
    """Inside one long document, attend with attention_mask(..., "sdpa") gives query t the mean of exactly the
    values of keys t - window .. t (zero queries: equal weights; one-hot values), a plain stream or a paired
    one (window + 1 positions: (window + 1) / 2 tokens)."""
    P = 32
    q = torch.zeros(P, 1, P)
    v = torch.eye(P)[:, None, :]  # key j's value is the j-th unit vector
    for doc in (torch.zeros(P, dtype=torch.long), torch.zeros(P // 2, dtype=torch.long).repeat_interleave(2)):
        out = attend(q, q, v, attention_mask(doc, window, "sdpa"), None, window, 0, 0.1, "sdpa")[:, 0]
        for t in range(P):
            first = max(0, t - window)
            want = torch.zeros(P)
            want[first:t + 1] = 1 / (t + 1 - first)
            torch.testing.assert_close(out[t], want)
    assert keys_of(dense_mask(torch.zeros(16, dtype=torch.long).repeat_interleave(2), 2)[11]) == [9, 10, 11]


def test_forward_windows_are_blocks_of_128_positions():
    """The forward hands attend short and long windows of blocks * 128 positions, in paired layers too (where
    they cover half as many tokens)."""
    model = GPT(tiny_config())
    calls = attend_calls(model, packed_tokens()[0], short=1, long=2)
    assert {layer: call["window"] for layer, call in calls.items()} == {0: 128, 1: 256, 3: 256}
    assert calls[0]["q"].shape[0] == 2 * 256  # layer 0 is paired: 2 positions per token


def skip_model(**changes) -> GPT:
    return randomized(GPT(tiny_config(**{**ALL_OFF, "skip_connections": True, **changes})))


def test_skip_gate_starts_at_sigmoid_of_minus_1_5():
    """At init (W = 0, logit -1.5) the skip adds 0.1824 * skip for every token: the plain reference with that
    constant; skip_gate=False with the same weights is the same (2 sigmoid(0) = 1). A random W makes the gate
    per token: no longer that constant, and no longer the scalar gate."""
    gated = skip_model(skip_gate=True)
    scalar = GPT(tiny_config(**{**ALL_OFF, "skip_connections": True, "skip_gate": False}))
    inputs, targets = packed_tokens(T=256, doc_lengths=(180, 76))
    with torch.no_grad():
        gated.skip_gate.zero_()
        gated.scalars[gated.scalar_index["skip"]] = -1.5
    assert set(scalar.load_state_dict(gated.state_dict(), strict=False).unexpected_keys) == {"skip_gate"}
    constant = plain_reference_loss(gated, inputs, targets, 1, 1, skip_weight=lambda x0: 0.182426)
    torch.testing.assert_close(loss_of(gated, inputs, targets, 1, 1), constant, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss_of(scalar, inputs, targets, 1, 1), constant, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        gated.skip_gate.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    per_token = loss_of(gated, inputs, targets, 1, 1)
    assert not torch.allclose(per_token, constant, rtol=1e-3)
    assert not torch.allclose(per_token, loss_of(scalar, inputs, targets, 1, 1), rtol=1e-3)


def test_attention_gains_scale_the_weights():
    """sa_lambdas with gains (1, 1) is the model without them (same weights); gains (0.5, 1.0) are not; the
    gains get gradients on attention layers, none on the layer without attention (2)."""
    with_gains = randomized(GPT(tiny_config()))
    without = GPT(tiny_config(sa_lambdas=False))
    without.load_state_dict(with_gains.state_dict())
    qkv, o = with_gains.scalar_index["sa_qkv"], with_gains.scalar_index["sa_o"]
    inputs, targets = packed_tokens()
    with torch.no_grad():
        with_gains.scalars[qkv], with_gains.scalars[o] = 1.0, 1.0
    reference = loss_of(without, inputs, targets)
    torch.testing.assert_close(loss_of(with_gains, inputs, targets), reference, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        with_gains.scalars[qkv], with_gains.scalars[o] = 0.5, 1.0
    loss = loss_of(with_gains, inputs, targets)
    assert not torch.allclose(loss, reference, rtol=1e-5, atol=0)  # q, k are normed: only v's gain shows
    loss.backward()
    grad = with_gains.scalars.grad
    for gains in (grad[qkv], grad[o]):
        assert (gains[[0, 1, 3]] != 0).all() and gains[2] == 0


def test_eval_mode_loss():
    """model.eval(): the head in chunks of rows (fewer rows than tokens) gives the one-chunk loss, the train-mode
    loss (CPU: no fp8) and, without softcap, cross-entropy of x @ lm_head_t; a second MTP weight raises."""
    for softcap in (True, False):
        model = randomized(GPT(tiny_config(softcap=softcap)))
        inputs, targets = packed_tokens()
        x = final_states(model, inputs, targets)
        train = loss_of(model, inputs, targets)
        model.eval()
        evaluated = loss_of(model, inputs, targets)
        chunked = model.eval_loss(x, targets, torch.tensor([1.0]), 2.0, rows_per_chunk=100)  # 100 + 100 + 56 rows
        whole = model.eval_loss(x, targets, torch.tensor([1.0]), 2.0, rows_per_chunk=EVAL_HEAD_ROWS)
        torch.testing.assert_close(evaluated, train, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(2 * chunked, evaluated, rtol=1e-6, atol=1e-5)
        if not softcap:
            plain = F.cross_entropy(x @ model.lm_head_t.detach(), targets, reduction="sum")
            torch.testing.assert_close(evaluated, plain)
        with pytest.raises(ValueError, match="next token only"):
            loss_of(model, inputs, targets, mtp=(1.0, 0.5))


def counted_compile(model):
    """torch.compile(model) as the trainer compiles it (fullgraph, static shapes) with AOT autograd and no
    codegen (no C++ compiler needed), and the list each new graph is appended to: (compiled, graphs)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(
            gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, dynamic=False, backend=counting_backend), graphs


def fa4_loss_and_grads(model, fn, inputs, targets, short, long, cu):
    model.zero_grad(set_to_none=True)
    loss = fn(inputs, targets, short, long, torch.tensor([1.0, 0.5]), 1.0, cu)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fa4_compiled_graph_serves_every_window_and_temperature(fa4_on_cpu):
    """FA4 takes the windows and the YaRN temperature as 0-d CPU tensors, read on the host when the op runs: one
    compiled graph (fullgraph, static shapes) serves every window and temperature of a shape, where ints and a
    Python-float scale compiled one graph per value. Each call equals the sdpa model (windows in blocks of 128
    positions, paired heads' cu_seqlens doubled, the temperature in the scale), forward and backward, and the
    kernel gets the window and scale of that call."""
    from modded_nanogpt.train_gpt import window_inputs

    T = 512
    model = randomized(GPT(tiny_config()))
    inputs, targets = packed_tokens(T=T, doc_lengths=(150, 40, 200, 122))
    cu = torch.cat([torch.nonzero(inputs == BOS).flatten(), torch.tensor([T])]).to(torch.int32)
    cu = F.pad(cu, (0, 7), value=T)  # padded with empty documents, as train_gpt.flash_boundaries pads

    compiled, graphs = counted_compile(model)
    for short, long in ((1, 2), (1, 3), (2, 3)):
        model.set_long_window(long)  # from the second window on, YaRN changes the temperature
        model.attention_backend = "fa4"
        short_t, long_t = window_inputs(model, short, long, torch.device("cpu"))
        assert short_t.device.type == "cpu" and short_t.ndim == 0 and int(long_t) == long
        fa4_on_cpu.clear()
        got = fa4_loss_and_grads(model, compiled, inputs, targets, short_t, long_t, cu)
        layers = len(model.attn_layers)
        scale = model.config.attn_scale * model.temperature
        want_windows = [(long if layer in model.config.long_window_layers else short) * BLOCK
                        for layer in model.attn_layers]
        assert [w for _, w in fa4_on_cpu[:layers]] == want_windows  # the forwards, in layer order
        assert len(fa4_on_cpu) == 2 * layers and all(s == pytest.approx(scale, rel=1e-6) for s, _ in fa4_on_cpu)
        model.attention_backend = "sdpa"
        want = fa4_loss_and_grads(model, model, inputs, targets, short, long, None)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert got[1].keys() == want[1].keys()
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-5, msg=name)
    assert model.temperature != 1.0
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for one shape"
    torch._dynamo.reset()


def test_fa4_takes_windows_only_as_ints_or_cpu_scalars(fa4_on_cpu):
    """A window on another device (or not 0-d) would make the op wait for the GPU or mean nothing: refused."""
    q = k = v = torch.randn(8, 1, 4)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    for window in (3, torch.tensor(3)):
        attend(q, k, v, None, cu, window, 0, 0.5, "fa4", window_unit=2)
        assert fa4_on_cpu[-1] == (0.5, 6)
    with pytest.raises(ValueError, match=r"0-d CPU tensors, got a tensor of shape \(2,\) on cpu"):
        attend(q, k, v, None, cu, torch.tensor([3, 4]), 0, 0.5, "fa4")
    with pytest.raises(ValueError, match="0-d CPU tensors, got a tensor of shape"):
        attend(q, k, v, None, cu, 3, 0, 0.5, "fa4", temperature=torch.ones((), device="meta"))


def test_fa4_precompile_child_calls_the_forward_and_backward_ops_once(fa4_on_cpu, monkeypatch):
    """The precompile process's body: one forward and one backward through the model's ops, with the trainer's
    padded cu_seqlens as the parent passed them (JSON), the window one block, the model's scale."""
    import json

    import flash_attn.cute.interface as interface

    cu = F.pad(torch.tensor([0, 64, 128], dtype=torch.int32), (0, 13), value=128)  # padded, as the trainer pads
    seen = []
    forward = interface._flash_attn_fwd

    def recording_forward(q, k, v, **kwargs):
        seen.append((q.shape, q.dtype, kwargs["cu_seqlens_q"].tolist(), kwargs["max_seqlen_q"]))
        assert modded_model.FA4_LOCK.locked()  # the ops launch under the lock
        return forward(q, k, v, **kwargs)

    monkeypatch.setattr(interface, "_flash_attn_fwd", recording_forward)
    command, env = modded_model.fa4_precompile_command(cu, 64, num_heads=2, head_dim=8, scale=0.5, window_unit=BLOCK)
    assert json.loads(command[-1])["device"] is None  # a CPU tensor: no CUDA device for the child
    modded_model.fa4_precompile_child(command[-1])
    assert seen == [(torch.Size([128, 2, 8]), torch.bfloat16, cu.tolist(), 64)]
    assert fa4_on_cpu == [(0.5, BLOCK), (0.5, BLOCK)]  # a forward, then a backward: window 1 block, the scale


STAND_IN_FA4 = """
import json, os, torch
def _log(kind, **kwargs):
    with open(os.environ["FA4_STAND_IN_LOG"], "a") as f:
        f.write(json.dumps({"kind": kind, "cache": os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"), **kwargs}) + "\\n")
def _flash_attn_fwd(q, k, v, **kw):
    _log("forward", shape=list(q.shape), cu=kw["cu_seqlens_q"].tolist(), window=kw["window_size_left"],
         scale=kw["softmax_scale"])
    return torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0])
def _flash_attn_bwd(q, k, v, out, dout, lse, scale, causal, softcap, **kw):
    _log("backward", shape=list(q.shape), window=kw["window_size_left"])
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
"""


def test_fa4_precompile_runs_the_calls_in_a_child_process_that_finds_this_process_imports(tmp_path, monkeypatch):
    """fa4_precompile starts a child process (this interpreter, this process's import path, its environment:
    FA4's cache settings reach it) that makes the two calls; the thread reports how long it took, no error."""
    stand_in = tmp_path / "site" / "flash_attn" / "cute"
    stand_in.mkdir(parents=True)
    (stand_in.parent / "__init__.py").write_text("")
    (stand_in / "__init__.py").write_text("")
    (stand_in / "interface.py").write_text(STAND_IN_FA4)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # only sys.path: the child gets it as PYTHONPATH
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FA4_STAND_IN_LOG", str(log))
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(tmp_path / "cache"))
    cu = F.pad(torch.tensor([0, 64, 128], dtype=torch.int32), (0, 5), value=128)
    thread = fa4_precompile(cu, 64, num_heads=2, head_dim=8, scale=0.5, window_unit=BLOCK)
    thread.join(timeout=300)
    assert not thread.is_alive() and thread.error is None and thread.seconds > 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [{"kind": "forward", "cache": str(tmp_path / "cache"), "shape": [128, 2, 8], "cu": cu.tolist(),
                      "window": BLOCK, "scale": 0.5},
                     {"kind": "backward", "cache": str(tmp_path / "cache"), "shape": [128, 2, 8], "window": BLOCK}]


def test_fa4_precompile_holds_the_lock_until_the_child_exits_and_reports_its_failure(tmp_path, monkeypatch):
    """The model's FA4 calls wait (FA4_LOCK) while the child compiles, so they load its kernels rather than
    compile them again; a child that fails is reported on the thread with its last stderr line, not raised,
    and the lock is released (the model's first call then compiles the kernels)."""
    started, release = tmp_path / "started", tmp_path / "release"
    waiting = (f"import pathlib, time; pathlib.Path({str(started)!r}).touch()\n"
               f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.02)")
    monkeypatch.setattr(modded_model, "fa4_precompile_command",
                        lambda *args: ([sys.executable, "-c", waiting], dict(os.environ)))
    cu = torch.tensor([0, 64], dtype=torch.int32)
    thread = fa4_precompile(cu, 64, num_heads=2, head_dim=8, scale=0.5, window_unit=BLOCK)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists() and thread.is_alive()
    assert not modded_model.FA4_LOCK.acquire(blocking=False)  # the child runs: FA4 calls wait
    release.touch()
    thread.join(timeout=120)
    assert not thread.is_alive() and thread.error is None
    assert modded_model.FA4_LOCK.acquire(blocking=False)
    modded_model.FA4_LOCK.release()

    failing = "import sys; print('compiling', file=sys.stderr); sys.exit('no sm90 here')"
    monkeypatch.setattr(modded_model, "fa4_precompile_command",
                        lambda *args: ([sys.executable, "-c", failing], dict(os.environ)))
    thread = fa4_precompile(cu, 64, num_heads=2, head_dim=8, scale=0.5, window_unit=BLOCK)
    thread.join(timeout=120)
    assert thread.error == "RuntimeError: the precompile process failed: no sm90 here" and thread.seconds > 0
    assert modded_model.FA4_LOCK.acquire(blocking=False)  # released after the failure
    modded_model.FA4_LOCK.release()


def test_tied_and_untied_steps_share_one_compiled_graph():
    """With gathered rows (the trainer's --embedding_grads=scatter) the forward takes the token rows as an input
    tied or untied, so one compiled graph (fullgraph, static shapes) serves both; where the graph read the head
    itself, the tie compiled a second graph per shape. The tied step's head gradient is the tied weight's (the
    head's use plus the embedding's, as a graph reading the head for both gives it), and an untied step after
    equals the eager model."""
    from torch.func import functional_call

    model = randomized(GPT(tiny_config()))
    inputs, targets = packed_tokens()
    mtp = torch.tensor([1.0, 0.5])
    compiled, graphs = counted_compile(model)
    # The tied weight's gradient by autograd alone: the head's values as the embedding, in one graph.
    want = torch.autograd.grad(functional_call(model, {"embed": model.lm_head_t.T}, (inputs, targets, 1, 2, mtp, 1.0)),
                               model.lm_head_t)[0]
    for tied in (True, False):
        if not tied:
            model.untie()
        model.zero_grad(set_to_none=True)
        rows, scatter = model.gather_rows(inputs)
        loss = compiled(inputs, targets, 1, 2, mtp, 1.0, None, rows)
        loss.backward()
        model.add_row_grads(scatter)
        model.tie_gradients()
        if tied:
            assert model.embed.grad is None
            torch.testing.assert_close(model.lm_head_t.grad, want, rtol=1e-5, atol=1e-6)
        else:
            assert model.embed.grad is not None
            torch.testing.assert_close(loss, loss_of(model, inputs, targets, mtp=(1.0, 0.5)), rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1, f"{len(graphs)} graphs for tied and untied"
    torch._dynamo.reset()


def test_tied_rows_follow_the_head_whatever_writes_it():
    """The tied token rows are the head's current values even after a write no version counter sees (the
    fused Adam writes the head through a raw pointer): embed is refreshed from the head at every gather."""
    model = randomized(GPT(tiny_config()))
    inputs, _ = packed_tokens()
    model.gather_rows(inputs)
    model.lm_head_t.data.mul_(2.0)  # behind autograd's back
    rows, _ = model.gather_rows(inputs)
    torch.testing.assert_close(rows["token"], model.lm_head_t.T[inputs.long()].float())
