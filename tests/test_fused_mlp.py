"""The baseline's fused GELU MLP (nanogpt/fused_mlp.py) and its switch, --fused_mlp.

CPU tier: the GELU formulas of the epilogues against torch's tanh GELU and its autograd derivative in
float64; the op's own CPU path (the kernels' formulas in PyTorch) against the plain reference, forward
and all five gradients, with and without biases; opcheck (fake function, autograd registration);
tracing under torch.compile (aot_eager); shape errors; the model's outputs and gradients identical
under either setting on CPU; which widths the kernels take (the flag's parsing: tests/test_train.py). GPU tier (`gpu` mark, Hopper): the Triton kernels
against float64 computed from the same 16-bit inputs at the trainer's shape and at odd ones, eager and
compiled, and a small model trained a few steps with and without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanogpt import fused_mlp
from nanogpt.fused_mlp import gelu_and_slope, gelu_mlp, gelu_mlp_reference
from nanogpt.model import GPT, GPTConfig
from tests.fixtures import small_gpt_losses

REPO_ROOT = Path(__file__).resolve().parents[1]


def rel_err(actual, expected):
    """Relative Frobenius error, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def mlp_inputs(rows, width, dtype, device="cpu", seed=0, bias=True, hidden=None):
    """x ~ N(0, 1) and GPT-2-like weights (std 0.02 scaled up so the GELU sees both signs and its bend)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = hidden or 4 * width
    x = torch.randn(rows, width, generator=g, device=device).to(dtype)
    w_fc = (width**-0.5 * torch.randn(hidden, width, generator=g, device=device)).to(dtype)
    w_proj = (hidden**-0.5 * torch.randn(width, hidden, generator=g, device=device)).to(dtype)
    b_fc = (0.5 * torch.randn(hidden, generator=g, device=device)).to(dtype) if bias else None
    b_proj = (0.1 * torch.randn(width, generator=g, device=device)).to(dtype) if bias else None
    return x, w_fc, b_fc, w_proj, b_proj


def output_and_grads(fn, tensors, grad_y):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(grad_y)
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def op_output(x, w_fc, b_fc, w_proj, b_proj):
    return torch.ops.nanogpt.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)[0]


# ---------------------------------------------------------------------------------------------
# CPU tier
# ---------------------------------------------------------------------------------------------

def test_import_needs_no_triton_and_touches_no_cuda():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, nanogpt.model, nanogpt.fused_mlp as f\n"
            "assert f.triton is None and not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize("value, approx", [("", True), ("0", True), ("1", False)])
def test_exact_gelu_switch_is_read_from_the_environment(value, approx):
    code = f"import nanogpt.fused_mlp as f; assert f.APPROX_TANH is {approx}"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env={**os.environ, "NANOGPT_GELU_EXACT": value})


def test_gelu_formulas_match_torch_tanh_gelu_and_its_derivative():
    z = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    want = F.gelu(z, approximate="tanh")
    (want_slope,) = torch.autograd.grad(want.sum(), z)
    value, slope = gelu_and_slope(z.detach())
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slope, want_slope, rtol=1e-12, atol=1e-12)
    # 16-bit inputs are computed in float32, as the kernels do
    assert gelu_and_slope(z.detach().bfloat16())[0].dtype == torch.float32


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_op_cpu_path_matches_the_reference_in_float64(bias):
    tensors = mlp_inputs(37, 16, torch.float64, seed=1, bias=bias)
    grad_y = torch.randn(37, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = output_and_grads(op_output, tensors, grad_y)
    want = output_and_grads(gelu_mlp_reference, tensors, grad_y)
    assert len(ours) == 6
    for name, a, b in zip(("y", "x", "w_fc", "b_fc", "w_proj", "b_proj"), ours, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_op_cpu_path_rounds_like_the_kernels_in_16_bits():
    """pre and h are stored in the input dtype, h computed from the rounded pre, as the epilogue does."""
    x, w_fc, b_fc, w_proj, b_proj = mlp_inputs(20, 8, torch.bfloat16, seed=3)
    y, pre, h = torch.ops.nanogpt.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)
    assert pre.dtype == h.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(h, F.gelu(pre.float(), approximate="tanh").bfloat16(), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(y, F.linear(h, w_proj, b_proj), rtol=0, atol=0)


def test_op_traces_under_compile():
    tensors = mlp_inputs(24, 8, torch.float32, seed=4)
    grad_y = torch.randn(24, 8, generator=torch.Generator().manual_seed(5))
    eager = output_and_grads(op_output, tensors, grad_y)
    compiled = output_and_grads(torch.compile(op_output, backend="aot_eager", fullgraph=True), tensors, grad_y)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_op_passes_torch_library_opcheck(bias):
    x, w_fc, b_fc, w_proj, b_proj = mlp_inputs(9, 8, torch.float32, seed=6, bias=bias)
    args = (x, w_fc.requires_grad_(), b_fc if b_fc is None else b_fc.requires_grad_(), w_proj.requires_grad_(),
            b_proj if b_proj is None else b_proj.requires_grad_())
    torch.library.opcheck(torch.ops.nanogpt.gelu_mlp, args)
    torch.library.opcheck(torch.ops.nanogpt.gelu_mlp_grad_pre, (torch.randn(9, 8), w_proj.detach(),
                                                                torch.randn(9, 32), bias))


@pytest.mark.parametrize("bad", ["x_width", "w_proj_shape", "b_fc_shape", "b_proj_shape"])
def test_shape_errors_name_the_shapes(bad):
    x, w_fc, b_fc, w_proj, b_proj = mlp_inputs(4, 8, torch.float32)
    if bad == "x_width":
        x = torch.randn(4, 9)
    elif bad == "w_proj_shape":
        w_proj = torch.randn(32, 8)
    elif bad == "b_fc_shape":
        b_fc = torch.randn(8)
    else:
        b_proj = torch.randn(32)
    with pytest.raises(ValueError, match=r"gelu_mlp needs .* shapes \[\(4, (8|9)\)"):
        gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)


def test_widths_the_tma_kernels_cannot_take_go_to_the_reference():
    """Rows must be 16-byte multiples for TMA: GPT-2's widths pass, a width of 36 (72-byte rows) or a hidden
    width of 100 does not, and fused_path then sends the MLP to the reference instead of failing."""
    assert fused_mlp.tma_widths(768, 3072, 2) and fused_mlp.tma_widths(64, 328, 2)
    assert not fused_mlp.tma_widths(36, 144, 2)
    assert not fused_mlp.tma_widths(64, 100, 2)
    assert fused_mlp.tma_widths(36, 144, 4)  # (fp32 never takes the kernels: fused_path checks the dtype too)


def test_fused_path_is_off_on_cpu_and_for_float32():
    x, w_fc, b_fc, w_proj, b_proj = mlp_inputs(4, 8, torch.bfloat16)
    assert not fused_mlp.fused_path(x, w_fc, b_fc, w_proj, b_proj)
    y = gelu_mlp(x.reshape(2, 2, 8), w_fc, b_fc, w_proj, b_proj)  # the reference, any leading shape
    assert y.shape == (2, 2, 8)
    torch.testing.assert_close(y.reshape(4, 8), gelu_mlp_reference(x, w_fc, b_fc, w_proj, b_proj))


def test_model_outputs_and_gradients_do_not_depend_on_the_flag_on_cpu():
    def run(flag):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, fused_mlp=flag))
        idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
        _, loss = model(idx, idx)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    on, off = run(True), run(False)
    assert torch.equal(on[0], off[0])
    assert all(torch.equal(a, b) for a, b in zip(on[1], off[1], strict=True))


# ---------------------------------------------------------------------------------------------
# GPU tier (Hopper: the kernels need TMA)
# ---------------------------------------------------------------------------------------------

def hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


needs_hopper = pytest.mark.skipif(not hopper(), reason="the fused MLP kernels need a GPU with TMA (H100/H200)")


def float64_from(tensors, grad_y):
    """Output and gradients of the MLP in float64 from the same 16-bit values."""
    wide = [None if t is None else t.double() for t in tensors]
    return output_and_grads(gelu_mlp_reference, wide, grad_y.double())


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("rows, width, hidden, bias", [
    (4096, 768, 3072, True),  # the trainer's shape, 4 sequences of 1024
    (1000 + 3, 64, 256, True),  # rows not a multiple of 128: the TMA edge
    (77, 128, 328, False),  # hidden not a multiple of the tile width (328 = 256 + 72), no biases
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_matches_float64(rows, width, hidden, bias, dtype):
    tensors = mlp_inputs(rows, width, dtype, device="cuda", seed=rows, bias=bias, hidden=hidden)
    grad_y = torch.randn(rows, width, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7)).to(dtype)
    assert fused_mlp.fused_path(*tensors)
    ours = output_and_grads(gelu_mlp, tensors, grad_y)
    want = float64_from(tensors, grad_y)
    unfused = output_and_grads(gelu_mlp_reference, tensors, grad_y)  # today's path, 16-bit matmuls
    for name, a, w, u in zip(("y", "x", "w_fc", "b_fc", "w_proj", "b_proj"), ours, want, unfused, strict=True):
        if w is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        # no worse than the unfused 16-bit path but for one more rounding of the stored pre-activation
        # or gradient (2^-8 relative)
        assert rel_err(a, w) <= rel_err(u, w) + 2**-8, (name, rel_err(a, w), rel_err(u, w))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("approx", [True, False], ids=["tanh_approx", "exact"])
def test_gpu_kernel_epilogues_per_element(approx, monkeypatch):
    """pre = x @ w_fc^T + b_fc and h = gelu(pre) per element; grad_pre = (grad_y @ w_proj) gelu'(pre).

    Bounds: one 16-bit rounding of the result, plus with tanh.approx.f32 (relative error <= 2^-10.99 in
    tanh) its effect: <= 0.5 |z| 2^-10.5 on gelu and <= 2^-8 |grad_y @ w_proj| on the gradient (the
    slope's error is at most ~2.6e-3 for |z| <= 4)."""
    monkeypatch.setattr(fused_mlp, "APPROX_TANH", approx)
    x, w_fc, b_fc, w_proj, b_proj = mlp_inputs(300, 128, torch.bfloat16, device="cuda", seed=11)
    y, pre, h = torch.ops.nanogpt.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)
    want_pre = x.double() @ w_fc.double().T + b_fc.double()
    torch.testing.assert_close(pre.double(), want_pre, rtol=2**-8, atol=1e-5)
    z = pre.double()
    want_h = gelu_and_slope(z)[0]
    slack = (0.5 * z.abs() * 2**-10.5) if approx else 0.0
    assert ((h.double() - want_h).abs() <= 2**-8 * want_h.abs() + slack + 1e-5).all()
    grad_y = torch.randn_like(y)
    grad_pre, bias_sums = torch.ops.nanogpt.gelu_mlp_grad_pre(grad_y, w_proj, pre, True)
    acc = grad_y.double() @ w_proj.double()
    want_grad = acc * gelu_and_slope(z)[1]
    slack = (2**-8 * acc.abs()) if approx else 0.0
    assert ((grad_pre.double() - want_grad).abs() <= 2**-7 * want_grad.abs() + slack + 1e-4).all()
    torch.testing.assert_close(bias_sums.double(), grad_pre.double().sum(0), rtol=1e-5, atol=1e-4)
    none_pre, no_sums = torch.ops.nanogpt.gelu_mlp_grad_pre(grad_y, w_proj, pre, False)
    assert no_sums.numel() == 0 and torch.equal(none_pre, grad_pre)


@pytest.mark.gpu
@needs_hopper
def test_gpu_compiled_equals_eager():
    tensors = mlp_inputs(2048 + 64, 256, torch.bfloat16, device="cuda", seed=13)
    grad_y = torch.randn(2048 + 64, 256, device="cuda", dtype=torch.bfloat16)
    eager = output_and_grads(gelu_mlp, tensors, grad_y)
    compiled = output_and_grads(torch.compile(gelu_mlp, fullgraph=True), tensors, grad_y)
    for a, b in zip(compiled, eager, strict=True):
        # the same kernels and matmuls; Inductor may sum the c_proj bias gradient in another order
        assert rel_err(a, b) < 1e-3


@pytest.mark.gpu
@needs_hopper
def test_gpu_model_trains_the_same_with_and_without_the_fused_mlp():
    """A few AdamW steps under bf16 autocast: fused (eager and compiled) against --fused_mlp=False."""
    def train(fused, compile_model):
        return small_gpt_losses("cuda", compile_model=compile_model, fused_mlp=fused)

    plain = train(False, False)
    assert plain[-1] < plain[0] - 0.5, plain
    for compile_model in (False, True):
        fused = train(True, compile_model)
        assert fused == pytest.approx(plain, abs=2e-2), (compile_model, fused, plain)
