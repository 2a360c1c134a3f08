"""The speedrun model on CPU: masks, rotary/YaRN, every flag, and the all-off model against a plain reference."""

import dataclasses
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from modded_nanogpt.model import (
    BLOCK,
    GPT,
    ModelConfig,
    _ordered_lists_op,
    attend,
    attention_mask,
    block_classes,
    dense_mask,
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
    for name in ("attn_bank", "mlp_bank", "lm_head_t", "scalars", "value_embeds", "bigram_embed", "attn_gate"):
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


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("window", [1, 100, 128, 200, 1000])
def test_block_classes_agree_with_the_dense_mask(shift, window):
    g = torch.Generator().manual_seed(window + shift)
    P = 1024
    starts = torch.zeros(P >> shift, dtype=torch.bool)
    starts[0] = True
    starts[torch.randint(1, P >> shift, (6,), generator=g)] = True
    doc = torch.cumsum(starts.int(), 0).repeat_interleave(1 << shift)
    dense = dense_mask(doc, window, shift)
    partial, full = block_classes(doc, window, shift)
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


def test_dense_mask_rules():
    doc = torch.tensor([1, 1, 1, 2, 2, 2, 2, 2])
    mask = dense_mask(doc, 2, 0)
    assert mask[2, 0].item() is False  # outside the window of 2 tokens
    assert mask[2, 1].item() and mask[2, 2].item()
    assert not mask[3, 2]  # another document
    assert not mask[4, 5]  # the future
    paired = dense_mask(doc.repeat_interleave(2), 2, 1)  # positions 2t, 2t+1 belong to token t
    assert paired[5, 4] and not paired[4, 5]  # within a token: slot 1 sees slot 0, not the reverse
    assert paired[5, 2] and not paired[5, 1]  # token 2 sees token 1 (distance 1 < 2), not token 0


def test_attention_respects_documents_and_windows():
    g = torch.Generator().manual_seed(0)
    T, H, D = 64, 2, 16
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    doc = torch.tensor([0] * 20 + [1] * 44)
    mask = attention_mask(doc, 8, 0, "sdpa")
    out = attend(q, k, v, mask, None, 8, 0, 0.25, "sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[:20], v2[:20] = torch.randn(20, H, D), torch.randn(20, H, D)  # change document 0 only
    k2[21:30], v2[21:30] = torch.randn(9, H, D), torch.randn(9, H, D)  # and keys far behind query 50
    out2 = attend(q, k2, v2, mask, None, 8, 0, 0.25, "sdpa")
    assert torch.equal(out[40:], out2[40:])  # queries >= 38 see only keys 31.. of their own document
    assert not torch.allclose(out[20:30], out2[20:30])
    # The reference: softmax over the allowed keys only, one query at a time.
    for t in (0, 20, 27, 63):
        keys = [j for j in range(T) if doc[j] == doc[t] and 0 <= t - j < 8]
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
        per_layer = attention_mask(layer_doc, window, int(paired), backend)
        for built in (masks, tensor_masks):
            mask = built[long_layer, paired]
            if backend == "sdpa":
                assert torch.equal(mask, per_layer) and torch.equal(mask, dense_mask(layer_doc, window, int(paired)))
            else:
                assert same_block_lists(mask, per_layer)
                # the mask_mod agrees with the dense mask on every pair (checks the captured window)
                pos = torch.arange(layer_doc.numel())
                assert torch.equal(mask.mask_mod(0, 0, pos[:, None], pos[None, :]),
                                   dense_mask(layer_doc, window, int(paired)))


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
        plain = flex_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], block_mask=flex_block_mask(doc, window, 0))
        paired = flex_attention(q, k, v, block_mask=flex_block_mask(paired_doc, window, 1))
        return plain, paired

    window = 2 * BLOCK - 50  # a window that ends inside a block: partial blocks on both edges
    plain, paired = torch.compile(attend_both, fullgraph=True)(q, k, v, doc, doc.repeat_interleave(2),
                                                               torch.tensor(window))
    for out, positions_doc, shift, n in ((plain, doc, 0, T), (paired, doc.repeat_interleave(2), 1, 2 * T)):
        want = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n],
                                              attn_mask=dense_mask(positions_doc, window, shift))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_lists_equal_those_flex_derives_itself():
    """The per-key-block lists built here from the transposed classes equal FlexAttention's own
    transposition of the per-query-block lists (which sorts)."""
    from torch.nn.attention.flex_attention import BlockMask

    doc = torch.cumsum((packed_tokens(T=1024, doc_lengths=(300, 50, 500))[0] == BOS).int(), 0)
    for shift, window in ((0, 2 * BLOCK), (1, 3 * BLOCK), (0, 1)):
        positions_doc = doc.repeat_interleave(1 << shift)
        ours = flex_block_mask(positions_doc, window, shift)
        theirs = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                          ours.full_kv_indices, BLOCK_SIZE=BLOCK, mask_mod=ours.mask_mod)
        assert same_block_lists(ours, theirs)


def test_flex_block_mask_of_a_tensor_window_equals_that_of_an_int():
    doc = torch.cumsum((packed_tokens(T=1024, doc_lengths=(300, 50, 500))[0] == BOS).int(), 0)
    for shift in (0, 1):
        positions_doc = doc.repeat_interleave(1 << shift)
        a, b = (flex_block_mask(positions_doc, w, shift) for w in (2 * BLOCK, torch.tensor(2 * BLOCK)))
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
    parameter, also rows no token read: zero); the losses are identical. While tied the token rows stay in
    the graph (the head's gradient is dense anyway)."""
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
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
        if scatter:
            assert (rows["token"] is None) == tied
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
    assert temperature == pytest.approx(0.1 * math.log(s) + 1)
    model = GPT(tiny_config())
    model.set_long_window(3)
    before = model.rotary_freqs.clone()
    model.set_long_window(3)
    assert torch.equal(model.rotary_freqs, before)  # no growth, no change
    model.set_long_window(7)
    assert model.temperature == pytest.approx(0.1 * math.log(7 / 3) + 1)
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
        (7 * BLOCK, pytest.approx(0.1 * math.log(7 / 3) + 1), False)
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


FLAGS = ["value_embeds", "bigram_embeds", "skip_connections", "smear", "backout", "key_offset", "softcap", "qk_norm"]


@pytest.mark.parametrize("flag", FLAGS)
def test_each_off_switch_changes_the_model(flag):
    torch.manual_seed(0)
    on = randomized(GPT(tiny_config()))
    off = GPT(tiny_config(**{flag: False}))
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing
    inputs, targets = packed_tokens()
    assert not torch.allclose(loss_of(on, inputs, targets), loss_of(off, inputs, targets))
    removed = {"value_embeds": {"value_embeds", "ve_gate"}, "bigram_embeds": {"bigram_embed"}, "smear": {"smear_gate"}}
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


def plain_reference_loss(model: GPT, inputs, targets, short, long):
    """The all-features-off model written out plainly: x0 mixing, pre-norm attention with half-truncated
    RoPE over each document's sliding window, ReLU^2 MLP, RMSNorm, tied head, cross-entropy."""
    c = model.config
    T, H, D = inputs.numel(), c.num_heads, c.head_dim
    hd = H * D
    doc = torch.cumsum((inputs == c.bos_id).int(), 0)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * model.rotary_freqs[None]
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # (T, H, D): pairs (i, i + D/2)
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * cos[:, None] + b * sin[:, None], b * cos[:, None] - a * sin[:, None]], -1)

    x = x0 = norm(model.lm_head_t.T[inputs])
    for layer in range(c.num_layers):
        x = model.scalars[layer] * x + model.scalars[c.num_layers + layer] * x0
        if layer not in c.attention_skip_layers:
            w = model.attn_bank[model.attn_slot[layer]]
            h = norm(x)
            q, k, v = (h @ w[i * hd:(i + 1) * hd].T for i in range(3))
            q, k, v = rope(q.view(T, H, D)), rope(k.view(T, H, D)), v.view(T, H, D)
            window = (long if layer in c.long_window_layers else short) * BLOCK
            y = torch.empty(T, H, D)
            for t in range(T):
                keys = [j for j in range(t + 1) if doc[j] == doc[t] and t - j < window]
                p = (torch.einsum("hd,jhd->hj", q[t], k[keys]) * c.attn_scale).softmax(-1)
                y[t] = torch.einsum("hj,jhd->hd", p, v[keys])
            gate = torch.sigmoid(h[:, :12] @ model.attn_gate[model.attn_slot[layer]].T)
            x = x + (y * gate[..., None]).reshape(T, hd) @ w[3 * hd:]
        up, down = model.mlp_bank[layer]
        x = x + F.relu(norm(x) @ up.T).square() @ down
    logits = norm(x) @ model.lm_head_t
    return F.cross_entropy(logits, targets, reduction="sum")


def test_all_features_off_is_the_plain_model():
    off = dict(paired_head_layers=[], value_embeds=False, bigram_embeds=False, skip_connections=False, smear=False,
               backout=False, key_offset=False, softcap=False, qk_norm=False)
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config(**off)))
    assert {n for n, _ in model.named_parameters()} == {"attn_bank", "mlp_bank", "lm_head_t", "embed", "attn_gate", "scalars"}
    inputs, targets = packed_tokens(T=256, doc_lengths=(180, 76))
    # a window of 1 block: the first document (180 tokens) is longer than the window (128 tokens)
    got = loss_of(model, inputs, targets, short=1, long=1)
    expected = plain_reference_loss(model, inputs, targets, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


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
    (qkv_kernel=triton runs its fused op on GPUs only: elsewhere the model computes attention_inputs)."""
    torch.manual_seed(0)
    a = randomized(GPT(tiny_config()))
    b = GPT(tiny_config(**{flag: other}))
    b.load_state_dict(a.state_dict())
    inputs, targets = packed_tokens()
    torch.testing.assert_close(loss_of(a, inputs, targets), loss_of(b, inputs, targets), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=f"{flag} must be triton or torch, got '{bad}'"):
        validate_config(tiny_config(**{flag: bad}))
