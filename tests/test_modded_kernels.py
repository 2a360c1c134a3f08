"""Tests of the speedrun's fused ops (modded_nanogpt/kernels/, one module per op).

CPU tier: each reference against an independent float64 computation, routing of CPU tensors
and MODDED_NO_TRITON=1 to the references, and the error messages. GPU tier (`gpu` mark):
each Triton / fp8 path against its reference on fresh random inputs at the trainer's shapes
and at small odd ones, forward and backward, with outputs drawn from NaN-poisoned memory;
the three autograd ops under torch.compile(fullgraph=True); Polar Express with and without
the symmetric kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modded_nanogpt import kernels
from modded_nanogpt.kernels import (
    ba_plus_caa,
    ba_plus_caa_reference,
    common,
    cross_entropy,
    fp8,
    fp8_linear,
    fp8_linear_reference,
    fp8_softcapped_cross_entropy,
    relu2_linear,
    relu2_linear_reference,
    relu2_mlp,
    relu2_mlp_reference,
    softcapped_cross_entropy,
    softcapped_cross_entropy_reference,
    use_triton,
    xxt,
    xxt_reference,
)
from modded_nanogpt.optim import polar_express

REPO_ROOT = Path(__file__).resolve().parents[1]
MTP_WEIGHTS = [(1.0,), (1.0, 0.5), (1.0, 0.5, 0.25)]
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def rel_err(actual, expected):
    """Relative Frobenius error, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- float64 formulas, written independently of the module ----

def fp8_round_trip(t, scale, dtype, bound):
    return (t.double() / scale).clamp(-bound, bound).to(dtype).double() * scale


def softcap64(logits, cap, shift, div):
    return cap * torch.sigmoid((logits.double() + shift) / div)


def ce_float64(logits, targets, weights, cap=23.0, shift=5.0, div=7.5, reduction="sum"):
    capped = softcap64(logits, cap, shift, div)
    lse = torch.logsumexp(capped, dim=-1)
    rows = logits.shape[0]
    loss = torch.zeros((), dtype=torch.float64)
    for t in range(rows):
        for k, w in enumerate(weights):
            if t + k < rows:
                loss += float(w) * (lse[t] - capped[t, targets[t + k]])
    return loss / rows if reduction == "mean" else loss


def ce_grad_float64(logits, targets, weights, cap=23.0, shift=5.0, div=7.5):
    """d loss_sum / d logits = sum_k w_k (softmax(s) - onehot(y_{t+k})) * cap sig (1 - sig) / div."""
    rows, vocab = logits.shape
    sig = torch.sigmoid((logits.double() + shift) / div)
    probs = torch.softmax(cap * sig, dim=-1)
    dloss_dcapped = torch.zeros(rows, vocab, dtype=torch.float64)
    for t in range(rows):
        for k, w in enumerate(weights):
            if t + k < rows:
                dloss_dcapped[t] += float(w) * probs[t]
                dloss_dcapped[t, targets[t + k]] -= float(w)
    return dloss_dcapped * cap * sig * (1 - sig) / div


def ce_inputs(rows, vocab, dtype, seed, device="cpu"):
    g = gen(seed)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[-1], targets[-2 % rows] = vocab - 1, 0  # the last column and the last rows' targets
    return logits.to(device), targets.to(device)


# ---------------------------------------------------------------------------------------------
# CPU tier
# ---------------------------------------------------------------------------------------------

def test_import_needs_no_triton_and_touches_no_cuda():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "import modded_nanogpt.kernels as k\n"
            "assert k.triton is None and not k.use_triton(torch.zeros(1))\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.parametrize("value, fast", [("", True), ("0", True), ("1", False)])
def test_exact_sigmoid_switch_is_read_from_the_environment(value, fast):
    code = ("import torch, modded_nanogpt.kernels as k\n"
            f"assert k.FAST_SIGMOID is {fast}\n"
            f"assert k.common.fast_sigmoid(torch.zeros(2, dtype=torch.bfloat16)) is {fast}\n"
            "assert not k.common.fast_sigmoid(torch.zeros(2))  # float32 logits: always the exact sigmoid\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True,
                   env={**os.environ, "MODDED_EXACT_SIGMOID": value})


def test_use_triton_false_on_cpu_and_when_disabled(monkeypatch):
    assert not use_triton(torch.zeros(2))
    monkeypatch.setenv("MODDED_NO_TRITON", "1")
    assert not use_triton(torch.zeros(2))


def test_switches_set_on_the_package_reach_the_ops(monkeypatch):
    """FAST_SIGMOID and use_triton live in kernels.common, where the op modules read them at call time; the
    package's names read and set those, and monkeypatch's undo restores them."""
    fast_default, use_triton_default = common.FAST_SIGMOID, common.use_triton
    bf16_logits = torch.zeros(2, dtype=torch.bfloat16)
    with monkeypatch.context() as patch:
        for fast in (not fast_default, fast_default):
            patch.setattr(kernels, "FAST_SIGMOID", fast)
            assert common.FAST_SIGMOID is fast and kernels.FAST_SIGMOID is fast
            assert common.fast_sigmoid(bf16_logits) is fast
        patch.setattr(kernels, "use_triton", lambda t: True)
        assert common.use_triton is kernels.use_triton
        assert kernels.attention_inputs_supported(torch.zeros(2, 4, dtype=torch.bfloat16), 128)
    assert common.FAST_SIGMOID is fast_default and kernels.FAST_SIGMOID is fast_default
    assert common.use_triton is use_triton_default and kernels.use_triton is use_triton_default
    assert not kernels.attention_inputs_supported(torch.zeros(2, 4, dtype=torch.bfloat16), 128)


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 1), (33, 17, 65)])
def test_relu2_linear_reference_matches_float64(shape):
    rows, inner, cols = shape
    x = torch.randn(rows, inner, generator=gen(0))
    weight = torch.randn(cols, inner, generator=gen(1))
    expected = torch.relu(x.double() @ weight.double().T) ** 2
    out = relu2_linear_reference(x, weight)
    assert out.dtype == torch.float32 and out.shape == (rows, cols)
    assert rel_err(out, expected) < 1e-6


@pytest.mark.parametrize("no_triton", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_linear_on_cpu_is_the_reference(monkeypatch, no_triton, dtype):
    monkeypatch.setenv("MODDED_NO_TRITON", no_triton)
    x = torch.randn(2, 5, 12, generator=gen(2)).to(dtype)
    weight = torch.randn(9, 12, generator=gen(3)).to(dtype)
    grad = torch.randn(2, 5, 9, generator=gen(4)).to(dtype)
    results = []
    for fn in (relu2_linear, relu2_linear_reference):
        x_, w_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(x_, w_)
        out.backward(grad)
        results.append((out, x_.grad, w_.grad))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_relu2_linear_gradient_matches_float64():
    x = torch.randn(6, 10, generator=gen(5), dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 10, generator=gen(6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu2_linear, (x, weight))


def test_relu2_linear_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"x shape \(4, 8\) and weight shape \(16, 9\)"):
        relu2_linear(torch.zeros(4, 8), torch.zeros(16, 9))


def test_relu2_mlp_reference_and_cpu_path_match_float64():
    x = torch.randn(7, 12, generator=gen(30), dtype=torch.float64, requires_grad=True)
    up = torch.randn(20, 12, generator=gen(31), dtype=torch.float64, requires_grad=True)
    down = torch.randn(20, 12, generator=gen(32), dtype=torch.float64, requires_grad=True)
    expected = (torch.relu(x @ up.T) ** 2) @ down
    assert torch.equal(relu2_mlp_reference(x, up, down), expected)
    assert torch.equal(relu2_mlp(x, up, down), expected)
    assert torch.autograd.gradcheck(relu2_mlp, (x, up, down))


def test_relu2_mlp_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"x shape \(4, 8\), up \(16, 8\), down \(16, 9\)"):
        relu2_mlp(torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(16, 9))


def test_fp8_reference_quantization_within_e4m3_bound():
    # Identity weights with w_scale 1 (1.0 is exact in e4m3): the output is x after the e4m3
    # round trip, then bf16 rounding. e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for
    # normal values; below 2^-6 * scale, subnormal spacing 2^-9 * scale bounds it absolutely.
    x = torch.randn(64, 48, generator=gen(7)) * torch.logspace(-4, 1, 48)
    x_scale = x.abs().max().item() / E4M3_MAX
    out = fp8_linear_reference(x, torch.eye(48), x_scale, 1.0, 1.0)
    assert out.dtype == torch.bfloat16
    err = (out.double() - x.double()).abs()
    bound = 2**-4 * x.abs().double() + 2**-10 * x_scale + 2**-8 * out.double().abs()
    assert (err <= bound * (1 + 1e-6)).all()
    relative = err / x.abs().double()
    assert 1e-3 < relative[x.abs() > 2**-6 * x_scale].mean() < 2**-4  # quantized, but not too much


def test_fp8_reference_saturates_instead_of_nan():
    x = torch.tensor([[1e6, -1e6, 1.0, 0.0]])
    out = fp8_linear_reference(x, torch.eye(4), 0.5, 1.0, 1.0)
    assert out.tolist() == [[E4M3_MAX * 0.5, -E4M3_MAX * 0.5, 1.0, 0.0]]


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_fp8_reference_matches_float64_formula(w_dtype):
    x = torch.randn(6, 32, generator=gen(8), requires_grad=True)
    weight_t = (0.2 * torch.randn(32, 48, generator=gen(9))).to(w_dtype).requires_grad_()
    grad = (1e-3 * torch.randn(6, 48, generator=gen(10))).bfloat16()
    x_scale, w_scale, grad_scale = 3.0 / E4M3_MAX, 0.6 / E4M3_MAX, 3e-3 / E5M2_MAX
    out = fp8_linear_reference(x, weight_t, x_scale, w_scale, grad_scale)
    out.backward(grad)
    x_q = fp8_round_trip(x.detach(), x_scale, torch.float8_e4m3fn, E4M3_MAX)
    w_q = fp8_round_trip(weight_t.detach(), w_scale, torch.float8_e4m3fn, E4M3_MAX)
    g_q = fp8_round_trip(grad, grad_scale, torch.float8_e5m2, E5M2_MAX)
    assert rel_err(out, x_q @ w_q) < 4e-3  # bf16 output
    assert x.grad.dtype == torch.float32 and weight_t.grad.dtype == w_dtype
    assert rel_err(x.grad, g_q @ w_q.T) < 1e-5
    assert rel_err(weight_t.grad, x_q.T @ g_q) < (1e-5 if w_dtype == torch.float32 else 4e-3)
    # and the quantization is real: the product differs from the exact one
    assert rel_err(out, x.detach().double() @ weight_t.detach().double()) > 1e-3


def test_fp8_linear_on_cpu_is_the_reference():
    x = torch.randn(3, 4, 16, generator=gen(11)).bfloat16()
    weight_t = torch.randn(16, 24, generator=gen(12))
    grad = torch.randn(3, 4, 24, generator=gen(13)).bfloat16()
    results = []
    for fn in (fp8_linear, fp8_linear_reference):
        x_, w_ = x.clone().requires_grad_(), weight_t.clone().requires_grad_()
        out = fn(x_, w_, 4 / E4M3_MAX, 3 / E4M3_MAX, 4 / E5M2_MAX)
        out.backward(grad)
        results.append((out, x_.grad, w_.grad))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    assert results[0][0].shape == (3, 4, 24) and results[0][2].dtype == torch.float32


@pytest.mark.parametrize("mtp_as_tensor", [False, True])
def test_fp8_softcapped_ce_on_cpu_is_the_two_references(mtp_as_tensor):
    """The fused head + loss is, off fp8 GPUs, exactly the loss of the fp8 head's logits."""
    x = torch.randn(12, 16, generator=gen(30)).bfloat16()
    weight_t = torch.randn(16, 40, generator=gen(31))
    targets = torch.randint(0, 40, (12,), generator=gen(32))
    weights = torch.tensor([1.0, 0.5, 0.25]) if mtp_as_tensor else (1.0, 0.5, 0.25)
    scales = (4 / E4M3_MAX, 3 / E4M3_MAX, 1e-3 / E5M2_MAX)
    results = []
    for fused in (True, False):
        x_, w_ = x.clone().requires_grad_(), weight_t.clone().requires_grad_()
        if fused:
            loss = fp8_softcapped_cross_entropy(x_, w_, targets, weights, *scales)
        else:
            loss = softcapped_cross_entropy_reference(fp8_linear_reference(x_, w_, *scales), targets, weights)
        loss.backward()
        results.append((loss, x_.grad, w_.grad))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_fp8_linear_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"x shape \(4, 8\) and weight_t shape \(9, 16\)"):
        fp8_linear(torch.zeros(4, 8), torch.zeros(9, 16), 1.0, 1.0, 1.0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", MTP_WEIGHTS)
def test_softcapped_ce_reference_matches_float64(weights, dtype, reduction):
    logits, targets = ce_inputs(9, 37, dtype, seed=len(weights))
    loss = softcapped_cross_entropy_reference(logits, targets, weights, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    expected = ce_float64(logits, targets, weights, reduction=reduction)
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_softcapped_ce_reference_other_softcap_and_fewer_rows_than_weights():
    logits, targets = ce_inputs(2, 11, torch.float32, seed=14)
    kwargs = dict(cap=15.0, shift=1.0, div=3.0)
    loss = softcapped_cross_entropy_reference(logits, targets, (1.0, 0.5, 0.25), **kwargs)
    expected = ce_float64(logits, targets, (1.0, 0.5, 0.25), **kwargs)  # k = 2 reaches no row
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_softcapped_ce_weights_as_tensor_equal_weights_as_floats():
    logits, targets = ce_inputs(7, 13, torch.float32, seed=15)
    as_floats = softcapped_cross_entropy(logits, targets, (1.0, 0.5))
    as_tensor = softcapped_cross_entropy(logits, targets, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(as_floats, as_tensor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_softcapped_ce_with_next_token_returns_the_unweighted_first_term(reduction):
    """with_next_token: the loss unchanged, plus CE(s_t, targets[t]) alone (what the trainer logs), no gradient."""
    logits, targets = ce_inputs(9, 17, torch.float32, seed=18)
    logits.requires_grad_()
    weights = (0.8, 0.5, 0.25)  # a first weight other than 1: the logged loss is unweighted
    loss, next_token = softcapped_cross_entropy(logits, targets, weights, reduction=reduction, with_next_token=True)
    assert torch.equal(loss, softcapped_cross_entropy(logits, targets, weights, reduction=reduction))
    expected = ce_float64(logits.detach(), targets, (1.0,), reduction=reduction)
    assert abs(next_token.item() - expected.item()) <= 1e-5 * expected.item()
    assert not next_token.requires_grad and loss.requires_grad


def test_softcapped_ce_reference_gradcheck():
    logits, targets = ce_inputs(4, 6, torch.float64, seed=16)
    logits.requires_grad_()
    fn = lambda z: softcapped_cross_entropy_reference(z, targets, (1.0, 0.5, 0.25), cap=5.0, reduction="mean")
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_ce_gradient_matches_float64_formula(dtype):
    # The formula the fused backward kernel implements.
    logits, targets = ce_inputs(7, 19, dtype, seed=17)
    logits.requires_grad_()
    softcapped_cross_entropy_reference(logits, targets, (1.0, 0.5, 0.25)).backward()
    assert logits.grad.dtype == dtype
    expected = ce_grad_float64(logits.detach(), targets, (1.0, 0.5, 0.25))
    assert rel_err(logits.grad, expected) < (1e-5 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("no_triton", ["0", "1"])
def test_softcapped_ce_on_cpu_is_the_reference(monkeypatch, no_triton):
    monkeypatch.setenv("MODDED_NO_TRITON", no_triton)
    logits, targets = ce_inputs(8, 21, torch.bfloat16, seed=18)
    results = []
    for fn in (softcapped_cross_entropy, softcapped_cross_entropy_reference):
        z = logits.clone().requires_grad_()
        loss = fn(z, targets, (1.0, 0.5), reduction="mean")
        loss.backward()
        results.append((loss, z.grad))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_softcapped_ce_errors_are_clear():
    logits, targets = ce_inputs(4, 10, torch.float32, seed=19)
    with pytest.raises(ValueError, match="at least one weight"):
        softcapped_cross_entropy(logits, targets, ())
    with pytest.raises(ValueError, match="at least one weight"):
        softcapped_cross_entropy(logits, targets, torch.zeros(0))
    with pytest.raises(ValueError, match=r"reduction must be 'sum' or 'mean', got 'none'"):
        softcapped_cross_entropy(logits, targets, (1.0,), reduction="none")
    with pytest.raises(ValueError, match=r"logits shape \(4, 10\) and targets shape \(5,\)"):
        softcapped_cross_entropy(logits, torch.zeros(5, dtype=torch.long), (1.0,))
    with pytest.raises(ValueError, match="integer token ids"):
        softcapped_cross_entropy(logits, targets.float(), (1.0,))
    for cap in (0.0, -1.0, 80.5):  # the forward kernel sums exp(capped - cap): a normal float32 up to cap 80
        with pytest.raises(ValueError, match=rf"cap must be in \(0, 80.0\], got {cap}"):
            softcapped_cross_entropy(logits, targets, (1.0,), cap=cap)
    assert softcapped_cross_entropy(logits, targets, (1.0,), cap=80.0).isfinite()


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 9), (2, 33, 17)])
def test_xxt_reference_matches_float64(shape):
    X = torch.randn(*shape, generator=gen(20))
    out = xxt_reference(X)
    assert out.shape == (*shape[:-1], shape[-2])
    assert rel_err(out, X.double() @ X.double().mT) < 1e-6
    assert torch.equal(xxt(X), out)


@pytest.mark.parametrize("shape", [(5, 5), (3, 9, 9)])
def test_ba_plus_caa_reference_matches_float64(shape):
    X = torch.randn(*shape, generator=gen(21))
    A = X + X.mT
    alpha, beta = 15.878769915207462, -22.48329292557795
    expected = alpha * (A.double() @ A.double()) + beta * A.double()
    assert rel_err(ba_plus_caa_reference(A, alpha, beta), expected) < 1e-6
    assert torch.equal(ba_plus_caa(A, alpha, beta), ba_plus_caa_reference(A, alpha, beta))


def test_symmetric_products_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        xxt(torch.zeros(5))
    with pytest.raises(ValueError, match=r"square A .* got shape \(3, 4\)"):
        ba_plus_caa(torch.zeros(3, 4), 1.0, 1.0)


def rows_inputs(tables, vocab, dim, tokens, seed, device="cpu"):
    """A table ((vocab, dim) when tables is None, else (tables, vocab, dim)) and an index with runs of
    duplicates (a frequent id, as real tokens have) and the first and last rows."""
    g = gen(seed)
    shape = (vocab, dim) if tables is None else (tables, vocab, dim)
    table = torch.randn(*shape, generator=g)
    index = torch.randint(0, vocab, (tokens,), generator=g)
    index[: tokens // 3] = 3  # a third of the tokens are one id
    index[-1], index[0] = vocab - 1, 0
    index = index[torch.randperm(tokens, generator=g)]
    return table.to(device), index.to(device)


@pytest.mark.parametrize("tables", [None, 5])
def test_embedding_rows_references_match_float64(tables):
    table, index = rows_inputs(tables, 40, 24, 100, seed=30)
    rows = kernels.gather_rows_reference(table, index, torch.bfloat16)
    want = table.double()[..., index, :]
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, want.to(torch.bfloat16))
    assert torch.equal(kernels.gather_rows(table, index, torch.float32), table[..., index, :])  # CPU: the reference
    grad_rows = torch.randn(rows.shape, generator=gen(31)).bfloat16()
    grad = torch.randn(table.shape, generator=gen(32))
    want = grad.double().clone()
    for t in range(index.numel()):  # one row at a time, duplicates summed
        want[..., index[t], :] += grad_rows.double()[..., t, :]
    kernels.scatter_add_rows(grad, index, grad_rows)
    assert rel_err(grad, want) < 1e-6


def test_attention_inputs_fused_path_only_where_it_can_run(monkeypatch):
    """The fused attention inputs need the Triton path (CUDA), bf16 and a power-of-two head_dim; CPU tensors
    and MODDED_NO_TRITON=1 take kernels.attention_inputs_reference."""
    assert not kernels.attention_inputs_supported(torch.zeros(2, 4, dtype=torch.bfloat16), 128)
    monkeypatch.setattr(common, "use_triton", lambda t: True)
    assert kernels.attention_inputs_supported(torch.zeros(2, 4, dtype=torch.bfloat16), 128)
    assert not kernels.attention_inputs_supported(torch.zeros(2, 4, dtype=torch.bfloat16), 96)
    assert not kernels.attention_inputs_supported(torch.zeros(2, 4, dtype=torch.float32), 128)


def test_embedding_rows_bad_shapes_name_them():
    table, index = rows_inputs(5, 40, 24, 100, seed=33)
    with pytest.raises(ValueError, match=r"\(V, D\) or \(N, V, D\) table, got shape \(40,\)"):
        kernels.gather_rows(table[0, :, 0], index, torch.float32)
    with pytest.raises(ValueError, match=r"1-D index, got shape \(10, 10\)"):
        kernels.gather_rows(table, index.view(10, 10), torch.float32)
    with pytest.raises(ValueError, match=r"rows of shape \(5, 99, 24\) do not match a gradient of shape \(5, 40, 24\)"):
        kernels.scatter_add_rows(torch.zeros_like(table), index, torch.zeros(5, 99, 24))


# ---------------------------------------------------------------------------------------------
# GPU tier: the fused paths against their references
# ---------------------------------------------------------------------------------------------

def cuda_randn(*shape, seed, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)


def poison_cuda_cache(nbytes):
    """Fill freed blocks of the caching allocator with NaN, so outputs a kernel fails to write show up."""
    blocks = [torch.full((nbytes // 4 + 1,), float("nan"), device="cuda") for _ in range(4)]
    del blocks


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), "NaN/inf: an output element was not written, or overflowed"


def autograd_outputs(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.gpu
def test_gpu_import_touches_no_cuda():
    code = "import torch, modded_nanogpt.kernels as k\nassert k.triton is not None and not torch.cuda.is_initialized()\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.gpu
def test_gpu_use_triton_switch(monkeypatch):
    t = torch.zeros(1, device="cuda")
    assert use_triton(t)
    monkeypatch.setenv("MODDED_NO_TRITON", "1")
    assert not use_triton(t)
    x, weight = cuda_randn(37, 64, seed=0), cuda_randn(48, 64, seed=1)
    assert torch.equal(relu2_linear(x, weight), relu2_linear_reference(x, weight))
    logits, targets = ce_inputs(9, 50, torch.bfloat16, seed=2, device="cuda")
    assert torch.equal(softcapped_cross_entropy(logits, targets, (1.0, 0.5)),
                       softcapped_cross_entropy_reference(logits, targets, (1.0, 0.5)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 768, 3072), (2048, 768, 3072), (37, 45, 53), (1, 72, 130)])
def test_gpu_relu2_linear_matches_reference(shape):
    rows, inner, cols = shape
    x = cuda_randn(rows, inner, seed=3)
    weight = cuda_randn(cols, inner, seed=4, scale=inner**-0.5)
    grad = cuda_randn(rows, cols, seed=5)
    poison_cuda_cache(rows * cols * 2)
    out, grad_x, grad_w = autograd_outputs(relu2_linear, (x, weight), grad)
    assert out.dtype == grad_x.dtype == grad_w.dtype == torch.bfloat16
    assert_finite(out, grad_x, grad_w)
    ref = autograd_outputs(relu2_linear_reference, (x.float(), weight.float()), grad.float())
    for got, want in zip((out, grad_x, grad_w), ref, strict=True):
        assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 768, 3072), (2048 + 64, 768, 3072), (37, 45, 53), (1, 72, 136)])
def test_gpu_relu2_mlp_matches_reference(shape):
    """The whole MLP, fused backward included: the TMA kernels at the trainer's shapes (and at a row count
    that is no multiple of the tiles), the pointer kernel and the cuBLAS fallback at odd ones."""
    rows, dim, hidden = shape
    x = cuda_randn(rows, dim, seed=40)
    up = cuda_randn(hidden, dim, seed=41, scale=dim**-0.5)
    down = cuda_randn(hidden, dim, seed=42, scale=hidden**-0.5)
    grad = cuda_randn(rows, dim, seed=43)
    poison_cuda_cache(rows * hidden * 2 * 3)
    got = autograd_outputs(relu2_mlp, (x, up, down), grad)
    assert all(t.dtype == torch.bfloat16 for t in got)
    assert_finite(*got)
    want = autograd_outputs(relu2_mlp_reference, (x.double(), up.double(), down.double()), grad.double())
    for name, g, w in zip(("y", "grad_x", "grad_up", "grad_down"), got, want, strict=True):
        assert rel_err(g, w) < 1e-2, name


@pytest.mark.gpu
def test_gpu_relu2_mlp_under_torch_compile_fullgraph():
    x = cuda_randn(4096, 768, seed=44)
    up = cuda_randn(3072, 768, seed=45, scale=768**-0.5, dtype=torch.float32)
    down = cuda_randn(3072, 768, seed=46, scale=3072**-0.5, dtype=torch.float32)
    grad = cuda_randn(4096, 768, seed=47)
    eager = autograd_outputs(relu2_mlp, (x, up, down), grad)
    compiled = autograd_outputs(torch.compile(relu2_mlp, fullgraph=True), (x, up, down), grad)
    assert eager[2].dtype == torch.float32  # fp32 master weights get fp32 gradients
    for got, want in zip(compiled, eager, strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_relu2_linear_batched_input_and_fp32_master_weight():
    x = cuda_randn(2, 48, 64, seed=6)
    weight = cuda_randn(96, 64, seed=7, scale=0.125, dtype=torch.float32)
    grad = cuda_randn(2, 48, 96, seed=8)
    out, grad_x, grad_w = autograd_outputs(relu2_linear, (x, weight), grad)
    assert out.shape == (2, 48, 96) and grad_w.dtype == torch.float32
    ref = autograd_outputs(relu2_linear_reference, (x.float(), weight), grad.float())
    for got, want in zip((out, grad_x, grad_w), ref, strict=True):
        assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(768, 50304), (6144, 768), (37, 45), (1, 130)])
def test_gpu_fp8_quantization_kernel_matches_torch(shape, src_dtype, fp8_dtype):
    """The fused cast writes q and q^T; its codes are torch's, but for a rare tie of the division."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores (needs sm_89 or later)")
    t = cuda_randn(*shape, seed=22, dtype=src_dtype)
    scale = t.abs().max().item() / torch.finfo(fp8_dtype).max * 0.9  # a few values saturate
    poison_cuda_cache(t.numel() * 4)
    q, q_t = fp8._quantize_both_layouts(t, scale, fp8_dtype)
    assert q.shape == shape and q_t.shape == shape[::-1] and q.is_contiguous() and q_t.is_contiguous()
    assert_finite(q.float(), q_t.float())
    assert torch.equal(q_t.view(torch.uint8), q.mT.contiguous().view(torch.uint8))
    codes, torch_codes = q.view(torch.uint8).int(), fp8._quantize(t, scale, fp8_dtype).view(torch.uint8).int()
    assert (codes - torch_codes).abs().max() <= 1  # one step at most (a tie rounded the other way)
    assert (codes != torch_codes).float().mean() < 1e-4


def fp8_case(rows, inner, vocab, w_dtype=torch.bfloat16):
    x = cuda_randn(rows, inner, seed=9)
    weight_t = cuda_randn(inner, vocab, seed=10, scale=inner**-0.5, dtype=w_dtype)
    grad = cuda_randn(rows, vocab, seed=11, scale=1e-4)
    scales = (x.abs().max().item() / E4M3_MAX, weight_t.abs().max().item() / E4M3_MAX,
              grad.abs().max().item() / E5M2_MAX)
    return x, weight_t, grad, scales


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 768, 50304), (256, 128, 512), (37, 48, 80)])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_gpu_fp8_linear_matches_reference(shape, w_dtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores (needs sm_89 or later)")
    x, weight_t, grad, scales = fp8_case(*shape, w_dtype=w_dtype)
    poison_cuda_cache(shape[0] * shape[2] * 4)
    fused = autograd_outputs(lambda a, b: fp8_linear(a, b, *scales), (x, weight_t), grad)
    out, grad_x, grad_w = fused
    assert out.dtype == torch.bfloat16 and grad_x.dtype == torch.bfloat16 and grad_w.dtype == w_dtype
    assert_finite(*fused)
    ref = autograd_outputs(lambda a, b: fp8_linear_reference(a, b, *scales), (x, weight_t), grad)
    for got, want in zip(fused, ref, strict=True):
        assert rel_err(got, want) < 1e-2  # same quantization: only accumulation and rounding differ
    exact = autograd_outputs(lambda a, b: a @ b, (x.float(), weight_t.float()), grad.float())
    for got, want in zip(fused, exact, strict=True):
        assert rel_err(got, want) < 0.15  # fp8's own error: 3 (e4m3) or 2 (e5m2) mantissa bits


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["fast_sigmoid", "exact_sigmoid"])
@pytest.mark.parametrize("weights", MTP_WEIGHTS)
@pytest.mark.parametrize("shape", [(6144, 50304), (37, 1000), (2, 77)])
def test_gpu_softcapped_ce_matches_reference(shape, weights, fast, monkeypatch):
    monkeypatch.setattr(common, "FAST_SIGMOID", fast)
    logits, targets = ce_inputs(*shape, torch.bfloat16, seed=12, device="cuda")
    poison_cuda_cache(logits.numel() * 2)
    loss, grad = autograd_outputs(lambda z: softcapped_cross_entropy(z, targets, weights), (logits,), None)
    assert grad.dtype == torch.bfloat16
    assert_finite(loss, grad)
    ref_loss, ref_grad = autograd_outputs(
        lambda z: softcapped_cross_entropy_reference(z, targets, weights), (logits,), None)
    # tanh.approx.f32 (relative error <= 2^-10.99) moves a capped logit by at most cap * 2^-11.99, a row's
    # loss (its log-sum-exp and its target terms) by at most twice that per unit of MTP weight
    slack = 2 * 23.0 * 2**-11.99 * shape[0] * sum(weights) if fast else 0.0
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item()) + slack
    assert rel_err(grad, ref_grad) < 1e-2
    with torch.no_grad():  # the next-token loss the kernel writes beside the weighted one
        fused, next_token = softcapped_cross_entropy(logits, targets, weights, with_next_token=True)
        ref_next = softcapped_cross_entropy_reference(logits, targets, (1.0,))
    assert torch.equal(fused, loss)
    assert abs(next_token.item() - ref_next.item()) <= 1e-4 * ref_next.item() + slack / sum(weights)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpu_softcapped_ce_fp32_tensor_weights_other_softcap(reduction):
    logits, targets = ce_inputs(515, 3001, torch.float32, seed=13, device="cuda")
    weights = torch.tensor([1.0, 0.7, 0.3], device="cuda")
    kwargs = dict(cap=15.0, shift=1.0, div=3.0, reduction=reduction)
    loss, grad = autograd_outputs(lambda z: softcapped_cross_entropy(z, targets, weights, **kwargs), (logits,), None)
    ref_loss, ref_grad = autograd_outputs(
        lambda z: softcapped_cross_entropy_reference(z, targets, weights, **kwargs), (logits,), None)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("weights", MTP_WEIGHTS)
@pytest.mark.parametrize("shape, few_targets", [((6144, 50304), False), ((37, 1000), False), ((130, 77), False),
                                                ((144, 1008), False), ((144, 1008), True)])
def test_gpu_ce_grad_fp8_kernel_matches_the_two_kernels(shape, few_targets, weights):
    """The fused CE-gradient + e5m2 kernels give the codes of the CE backward followed by the quantizer. The
    tile kernels leave the target logits to a second kernel; with targets among three columns (few_targets), a
    row's MTP targets often share one logit, which must carry every term."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores (needs sm_89 or later)")
    logits, targets = ce_inputs(*shape, torch.bfloat16, seed=40, device="cuda")
    if few_targets:
        targets = targets % 3
    weight_tensor = torch.tensor(weights, device="cuda")
    _, row_lse, _ = cross_entropy._softcapped_ce_forward(logits, targets, weight_tensor, [], 23.0, 5.0, 7.5)
    grad_rows = torch.full((1,), 1.0 / shape[0], device="cuda").expand(shape[0])  # a sum's gradient, stride 0
    grad = cross_entropy._softcapped_ce_backward_op(grad_rows, logits, targets, weight_tensor, [], row_lse, 23.0,
                                                    5.0, 7.5)
    scale = grad.float().abs().max().item() / E5M2_MAX
    want, want_t = fp8._quantize_both_layouts(grad, scale, torch.float8_e5m2)
    poison_cuda_cache(logits.numel() * 2)
    q, q_t = cross_entropy._softcapped_ce_grad_fp8(grad_rows, logits, targets, weight_tensor, [], row_lse, 23.0,
                                                   5.0, 7.5, scale)
    assert q.shape == shape and q_t.shape == shape[::-1] and q.is_contiguous() and q_t.is_contiguous()
    assert_finite(q.float(), q_t.float())
    assert torch.equal(q_t.view(torch.uint8), q.mT.contiguous().view(torch.uint8))
    codes, want_codes = q.view(torch.uint8).int(), want.view(torch.uint8).int()
    assert (codes - want_codes).abs().max() <= 1  # a one-ulp difference of the fp32 arithmetic at most
    assert (codes != want_codes).float().mean() < 1e-4
    # Programs walking one tile, or a number that leaves a ragged last walk, loading each tile before the one
    # before it is computed or not: the same codes.
    variants = [dict(tma=False, col_tiles=t, prefetch=p) for t, p in ((1, False), (3, False), (1, True), (3, True),
                                                                      (16, True))]
    variants.append(dict(tma=False, block_r=64, block_c=64, col_tiles=16, prefetch=True))  # another tile shape
    if shape[0] % 16 == 0 and shape[1] % 16 == 0:  # TMA descriptors: rows of q and q^T 16-byte aligned
        variants += [dict(tma=True, col_tiles=t, stages=s) for t, s in ((1, 1), (3, 1), (16, 2), (16, 3))]
    for variant in variants:
        walked = cross_entropy._softcapped_ce_grad_fp8(grad_rows, logits, targets, weight_tensor, [], row_lse, 23.0,
                                                        5.0, 7.5, scale, **variant)
        same = [torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(walked, (q, q_t), strict=True)]
        assert all(same), variant


@pytest.mark.gpu
@pytest.mark.parametrize("weights", MTP_WEIGHTS)
@pytest.mark.parametrize("shape", [(6144, 768, 50304), (37, 48, 80)])
def test_gpu_fp8_softcapped_ce_matches_the_two_ops(shape, weights):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores (needs sm_89 or later)")
    rows, inner, vocab = shape
    x, weight_t, _, _ = fp8_case(rows, inner, vocab, w_dtype=torch.float32)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    scales = (x.abs().max().item() / E4M3_MAX, weight_t.abs().max().item() / E4M3_MAX, 2.0**-10 / rows)
    poison_cuda_cache(rows * vocab * 4)
    fused = autograd_outputs(lambda a, b: fp8_softcapped_cross_entropy(a, b, targets, weights, *scales) / rows,
                             (x, weight_t), None)
    assert fused[1].dtype == torch.bfloat16 and fused[2].dtype == torch.float32
    assert_finite(*fused)
    apart = autograd_outputs(
        lambda a, b: softcapped_cross_entropy(fp8_linear(a, b, *scales), targets, weights) / rows, (x, weight_t), None)
    assert torch.equal(fused[0], apart[0])
    for got, want in zip(fused[1:], apart[1:], strict=True):
        assert rel_err(got, want) < 1e-3  # the same fp8 codes but for rare one-step differences
    with torch.no_grad():
        _, fused_next = fp8_softcapped_cross_entropy(x, weight_t, targets, weights, *scales, with_next_token=True)
        logits = fp8_linear(x, weight_t, *scales)
        _, apart_next = softcapped_cross_entropy(logits, targets, weights, with_next_token=True)
        ref_next = softcapped_cross_entropy_reference(logits, targets, (1.0,))
    assert torch.equal(fused_next, apart_next)
    assert abs(fused_next.item() - ref_next.item()) <= 1e-4 * ref_next.item()


@pytest.mark.gpu
@pytest.mark.parametrize("mtp_as_tensor", [False, True])
def test_gpu_fused_ops_under_torch_compile_fullgraph(mtp_as_tensor):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores (needs sm_89 or later)")
    rows, dim, vocab = 512, 128, 1024
    x = cuda_randn(rows, dim, seed=14)
    w_up = cuda_randn(4 * dim, dim, seed=15, scale=dim**-0.5)
    w_down = cuda_randn(dim, 4 * dim, seed=16, scale=(4 * dim) ** -0.5)
    lm_head_t = cuda_randn(dim, vocab, seed=17, scale=dim**-0.5, dtype=torch.float32)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    mtp = torch.tensor([1.0, 0.5], device="cuda") if mtp_as_tensor else (1.0, 0.5)

    def loss_fn(x, w_up, w_down, lm_head_t):
        h = relu2_linear(x, w_up) @ w_down.T
        logits = fp8_linear(h, lm_head_t, 8 / E4M3_MAX, 0.5 / E4M3_MAX, 0.01 / E5M2_MAX)
        return softcapped_cross_entropy(logits, targets, mtp, reduction="mean")

    inputs = (x, w_up, w_down, lm_head_t)
    eager = autograd_outputs(loss_fn, inputs, None)
    compiled = autograd_outputs(torch.compile(loss_fn, fullgraph=True), inputs, None)
    assert_finite(*compiled)
    for got, want in zip(compiled, eager, strict=True):
        assert rel_err(got, want) < 1e-2


SYMMETRIC_SHAPES = [(40, 768, 768), (24, 768, 3072), (3, 45, 70), (45, 70), (1, 130, 20)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SYMMETRIC_SHAPES)
def test_gpu_xxt_matches_reference(shape):
    X = cuda_randn(*shape, seed=18)
    poison_cuda_cache(X.numel() // X.shape[-1] * X.shape[-2] * 2)
    out = xxt(X)
    assert out.shape == (*shape[:-1], shape[-2]) and out.dtype == torch.bfloat16
    assert_finite(out)
    assert torch.equal(out, out.mT)
    assert rel_err(out, xxt_reference(X.float())) < 1e-2


@pytest.mark.gpu
def test_gpu_xxt_of_transposed_view():
    X = cuda_randn(24, 3072, 768, seed=19).mT  # polar_express's short-side view of a tall bank
    assert rel_err(xxt(X), xxt_reference(X.float())) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SYMMETRIC_SHAPES)
def test_gpu_ba_plus_caa_matches_reference(shape):
    X = cuda_randn(*shape, seed=20)
    X = X / X.float().norm(dim=(-2, -1), keepdim=True).to(X.dtype)
    A = xxt(X)
    alpha, beta = 15.878769915207462, -22.48329292557795
    poison_cuda_cache(A.numel() * 2)
    out = ba_plus_caa(A, alpha, beta)
    assert out.shape == A.shape and out.dtype == torch.bfloat16
    assert_finite(out)
    assert torch.equal(out, out.mT)
    assert rel_err(out, ba_plus_caa_reference(A.float(), alpha, beta)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(40, 768, 768), (24, 3072, 768), (3, 70, 45)])
def test_gpu_polar_express_with_and_without_triton(monkeypatch, shape):
    # Measured on H100 (relative to the float32 result): fused 0.011 at the banks' shapes,
    # 0.019 at (3, 70, 45); the plain bf16 path 0.022 and 0.042. The fused path rounds to bf16
    # less often (b gram + c gram^2 and a X + B X each come out of one fp32 accumulation).
    G = cuda_randn(*shape, seed=21, dtype=torch.float32)
    fused = polar_express(G)
    monkeypatch.setenv("MODDED_NO_TRITON", "1")
    plain = polar_express(G)
    accurate = polar_express(G, dtype=torch.float32)
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert_finite(fused)
    assert rel_err(fused, accurate) < 3e-2
    assert rel_err(fused, accurate) < 1.1 * rel_err(plain, accurate) + 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("tables, vocab, dim, tokens", [(5, 50304, 768, 49152), (None, 50304, 768, 16384),
                                                       (None, 251520, 768, 4096), (3, 70, 300, 333), (None, 9, 5, 1)])
def test_gpu_embedding_rows_match_reference(tables, vocab, dim, tokens):
    """The Triton gather equals index_select + cast bit for bit; the sorted-run scatter-add equals index_add_ up to
    summation order (float32), with the order computed inside or given, on every row: the untouched ones keep
    their value."""
    table, index = rows_inputs(tables, vocab, dim, tokens, seed=34, device="cuda")
    poison_cuda_cache(table.numel() // 5 * 2)
    rows = kernels.gather_rows(table, index, torch.bfloat16)
    assert torch.equal(rows, kernels.gather_rows_reference(table, index, torch.bfloat16))
    grad_rows = torch.randn(rows.shape, device="cuda").bfloat16()
    start = torch.randn_like(table)
    want = start.double().index_add_(table.ndim - 2, index, grad_rows.double())
    for order in (None, kernels.sort_index(index)):
        grad = start.clone()
        kernels.scatter_add_rows(grad, index, grad_rows, order)
        assert_finite(grad)
        assert rel_err(grad, want) < 1e-6
        untouched = torch.ones(table.shape[-2], dtype=torch.bool, device="cuda")
        untouched[index] = False
        assert torch.equal(grad[..., untouched, :], start[..., untouched, :])
    fp32_rows = torch.randn(rows.shape, device="cuda")  # float32 rows are added as they are
    grad = start.clone()
    kernels.scatter_add_rows(grad, index, fp32_rows)
    assert rel_err(grad, start.double().index_add_(table.ndim - 2, index, fp32_rows.double())) < 1e-6


def attention_inputs_case(T, H, D, dim, with_ve, seed, paired=False):
    """Inputs of attention_inputs (x, w, cos, sin, not_doc_start, ve, gate) and output gradients; paired: tables of
    2 T positions, as a paired-head layer takes them."""
    from modded_nanogpt.model import rotary_frequencies, yarn_rescale

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, dim, generator=g, device="cuda").bfloat16()
    w = (dim**-0.5 * torch.randn(3 * H * D, dim, generator=g, device="cuda")).bfloat16()
    freqs = yarn_rescale(rotary_frequencies(D, 1024.0), 384, 1408)[0].cuda()
    positions = 2 * T if paired else T
    angles = torch.arange(positions, device="cuda", dtype=torch.float32)[:, None] * freqs[None, :]
    not_doc_start = (torch.rand(T, generator=g, device="cuda") > 0.02).bfloat16()
    not_doc_start[0] = 0
    ve = torch.randn(T, H * D, generator=g, device="cuda").bfloat16() if with_ve else None
    gate = (2 * torch.sigmoid(torch.randn(T, H, generator=g, device="cuda"))).bfloat16() if with_ve else None
    grads = [torch.randn(T, H, D, generator=g, device="cuda").bfloat16() for _ in range(3)]
    return (x, w, angles.cos(), angles.sin(), not_doc_start, ve, gate), grads


@pytest.mark.gpu
@pytest.mark.parametrize("T, H, D, dim", [(49152, 6, 128, 768), (333, 2, 32, 40)])
@pytest.mark.parametrize("qk_norm, key_offset, with_ve, paired", [
    (True, True, True, False), (True, False, False, False), (False, True, False, False), (True, True, False, False),
    (False, False, True, False), (True, False, True, True), (False, False, False, True)])
def test_gpu_attention_inputs_match_reference(T, H, D, dim, qk_norm, key_offset, with_ve, paired):
    """The fused op against attention_inputs_reference computed in float32 from the same bf16 inputs: q, k, v and the
    gradients of x, w, ve and the gate (bf16 outputs: rel. error ~4e-3; a wrong rotation, norm, shift, carry
    across a document start or paired-head position is far above the bound)."""
    tensors, grads = attention_inputs_case(T, H, D, dim, with_ve, seed=40, paired=paired)
    poison_cuda_cache(T * 3 * H * D * 2)
    leaves = [t.clone().requires_grad_() if t is not None and t.dtype == torch.bfloat16 and i in (0, 1, 5, 6) else t
              for i, t in enumerate(tensors)]
    out = kernels.attention_inputs(*leaves, H, qk_norm, key_offset, paired)
    torch.autograd.backward(out, grads)
    ref_leaves = [t.float().requires_grad_() if t is not None and i in (0, 1, 5, 6) else t
                  for i, t in enumerate(tensors)]
    ref = kernels.attention_inputs_reference(*ref_leaves, H, qk_norm, key_offset, paired)
    torch.autograd.backward(ref, [g.float() for g in grads])
    assert_finite(*out)
    for name, got, want in zip("qkv", out, ref, strict=True):
        assert got.shape == (T, H, D) and got.is_contiguous(), name
        assert rel_err(got, want) < 1.5e-2, (name, rel_err(got, want))
    for i in (0, 1, 5, 6):
        if tensors[i] is None:
            continue
        assert_finite(leaves[i].grad)
        assert rel_err(leaves[i].grad, ref_leaves[i].grad) < 1.5e-2, (i, rel_err(leaves[i].grad, ref_leaves[i].grad))


@pytest.mark.gpu
def test_gpu_attention_inputs_under_torch_compile_fullgraph():
    tensors, grads = attention_inputs_case(4096, 6, 128, 768, True, seed=41)

    def run(fn):
        leaves = [t.clone().requires_grad_() if i in (0, 1, 5, 6) else t for i, t in enumerate(tensors)]
        out = fn(*leaves, 6, True, True)
        torch.autograd.backward(out, grads)
        return [o.detach() for o in out] + [leaves[i].grad for i in (0, 1, 5, 6)]

    compiled = run(torch.compile(kernels.attention_inputs, fullgraph=True))
    eager = run(kernels.attention_inputs)
    for a, b in zip(compiled, eager, strict=True):  # the same kernels; cuBLAS may pick other algorithms when compiled
        assert rel_err(a, b) < 1e-3
    reference = run(kernels.attention_inputs_reference)
    assert all(rel_err(a, b) < 1.5e-2 for a, b in zip(compiled, reference, strict=True))


def test_softcapped_token_losses_are_the_per_row_next_token_terms():
    """Per-row CE of the softcapped logits (what the study probes score), on CPU the reference: its sum is
    softcapped_cross_entropy's next-token loss, and each row is CE(softcap(logits_t), targets[t]) by hand."""
    from modded_nanogpt.kernels import softcapped_token_losses

    logits, targets = ce_inputs(37, 1000, torch.float32, seed=21)
    rows = softcapped_token_losses(logits, targets)
    assert rows.shape == (37,) and rows.dtype == torch.float32
    capped = 23.0 * torch.sigmoid((logits + 5.0) / 7.5)
    by_hand = torch.logsumexp(capped, -1) - capped.gather(1, targets.long()[:, None])[:, 0]
    torch.testing.assert_close(rows, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows.sum(), softcapped_cross_entropy(logits, targets, (1.0,)), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError):
        softcapped_token_losses(logits, targets[:5])


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["fast_sigmoid", "exact_sigmoid"])
@pytest.mark.parametrize("shape", [(6144, 50304), (37, 1000)])
def test_gpu_softcapped_token_losses_match_the_reference(shape, fast, monkeypatch):
    """The fused kernel's per-row next-token term against the reference, row by row (bf16 logits)."""
    from modded_nanogpt.kernels import softcapped_token_losses, softcapped_token_losses_reference

    monkeypatch.setattr(common, "FAST_SIGMOID", fast)
    logits, targets = ce_inputs(*shape, torch.bfloat16, seed=22, device="cuda")
    got = softcapped_token_losses(logits, targets)
    want = softcapped_token_losses_reference(logits, targets)
    slack = 2 * 23.0 * 2**-11.99 if fast else 0.0  # tanh.approx, as in test_gpu_softcapped_ce_matches_reference
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got - want).abs() <= 1e-4 * want.abs() + slack + 1e-5).all()
