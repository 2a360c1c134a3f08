"""The baseline's fused lm_head + cross-entropy (nanogpt/fused_loss.py) and its switch, --fused_loss.

CPU tier: the reference and the op's own CPU path against an independent float64 formula (loss
and both gradients, with ignored rows and an upstream gradient other than 1), the op's fake
function and autograd under torch.compile (aot_eager), the model's loss and gradients identical
under either setting (the flag's parsing: tests/test_train.py). GPU tier (`gpu` mark): the Triton kernel against
float64 computed from the same 16-bit inputs at the trainer's shape and at odd ones, eager and
compiled, and a small model trained a few steps with and without it.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogpt import fused_loss
from nanogpt.fused_loss import linear_cross_entropy, linear_cross_entropy_reference
from nanogpt.model import GPT, GPTConfig
from tests.fixtures import small_gpt_losses

REPO_ROOT = Path(__file__).resolve().parents[1]


def rel_err(actual, expected):
    """Relative Frobenius error, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def float64_loss_and_grads(x, weight, targets, grad_loss=1.0, ignore_index=-1):
    """Mean cross-entropy of x @ weight.T over non-ignored rows, and its gradients, written out in float64."""
    x, weight = x.double(), weight.double()
    logits = x @ weight.T
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=1)
    n_valid = valid.sum().item()
    loss = ((lse - logits[torch.arange(len(targets), device=x.device), safe]) * valid).sum() / n_valid
    grad_logits = torch.softmax(logits, dim=1)
    grad_logits[torch.arange(len(targets), device=x.device), safe] -= 1.0
    grad_logits *= valid[:, None].double() * (grad_loss / n_valid)
    return loss, grad_logits @ weight, grad_logits.T @ x


def inputs(rows, vocab, width, dtype, device="cpu", seed=0, ignored_every=7):
    """x ~ N(0, 1), weight with logits of std ~1.4, targets with every `ignored_every`-th row ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, width, generator=g, device=device).to(dtype)
    weight = (1.4 * width**-0.5 * torch.randn(vocab, width, generator=g, device=device)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g, device=device)
    targets[::ignored_every] = -1
    targets[1], targets[2] = 0, vocab - 1  # the first and the last column
    return x, weight, targets


def loss_and_grads(fn, x, weight, targets, grad_loss=1.0):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(x, weight, targets)
    (loss * grad_loss).backward()
    return loss.detach(), x.grad, weight.grad


def fused_op(x, weight, targets):
    return torch.ops.nanogpt.linear_cross_entropy(x, weight, targets, -1, True)[0]


# ---------------------------------------------------------------------------------------------
# CPU tier
# ---------------------------------------------------------------------------------------------

def test_import_needs_no_triton_and_touches_no_cuda():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "import nanogpt.model, nanogpt.fused_loss as f\n"
            "assert f.triton is None and not f.fused_path(torch.zeros(1, 1), torch.zeros(1, 1))\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.parametrize("fn", [linear_cross_entropy, fused_op], ids=["public_on_cpu", "op_cpu_path"])
def test_matches_float64_formula_with_ignored_rows(fn):
    x, weight, targets = inputs(29, 53, 16, torch.float64)
    expected = float64_loss_and_grads(x, weight, targets, grad_loss=2.5)
    got = loss_and_grads(fn, x, weight, targets, grad_loss=2.5)
    assert got[0].dtype == torch.float64
    for actual, want in zip(got, expected, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-10, atol=1e-12)
    # ...and F.cross_entropy (the reference path) agrees
    reference = loss_and_grads(linear_cross_entropy_reference, x, weight, targets, grad_loss=2.5)
    for actual, want in zip(got, reference, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-10, atol=1e-12)


def test_reference_computes_the_loss_in_float32_from_16_bit_logits():
    x, weight, targets = inputs(8, 20, 4, torch.bfloat16)
    loss = linear_cross_entropy(x, weight, targets)  # CPU: the reference path
    assert loss.dtype == torch.float32
    logits = (x @ weight.T).float()
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1))


def test_op_without_gradient_returns_no_buffer_and_the_same_loss():
    x, weight, targets = inputs(11, 13, 5, torch.float64)
    loss, grad_logits = torch.ops.nanogpt.linear_cross_entropy(x, weight, targets, -1, False)
    assert grad_logits.shape == (0, 13)
    torch.testing.assert_close(loss, float64_loss_and_grads(x, weight, targets)[0], rtol=1e-12, atol=0)


def test_op_traces_under_compile():
    """Fake function and autograd formula under AOTAutograd, on CPU (backend aot_eager: no codegen)."""
    x, weight, targets = inputs(19, 37, 8, torch.float64)
    compiled = torch.compile(fused_op, backend="aot_eager", fullgraph=True)
    expected = float64_loss_and_grads(x, weight, targets, grad_loss=0.5)
    for actual, want in zip(loss_and_grads(compiled, x, weight, targets, grad_loss=0.5), expected, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-10, atol=1e-12)


def test_op_passes_torch_library_opcheck():
    x, weight, targets = inputs(6, 9, 4, torch.float64)
    torch.library.opcheck(torch.ops.nanogpt.linear_cross_entropy.default,
                          (x.requires_grad_(), weight.requires_grad_(), targets, -1, True))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"x \(3, 4\), weight \(5, 6\)"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets \(2,\)"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


def model_loss_and_grads(fused: bool):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, fused_loss=fused))
    x, y = torch.randint(0, 97, (2, 3, 16), generator=torch.Generator().manual_seed(1))
    y[0, :5] = -1  # ignored positions
    _, loss = model(x, y, return_logits=False)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_model_loss_and_gradients_do_not_depend_on_the_flag_on_cpu():
    loss_fused, grads_fused = model_loss_and_grads(True)
    loss_plain, grads_plain = model_loss_and_grads(False)
    assert torch.equal(loss_fused, loss_plain)
    assert grads_fused.keys() == grads_plain.keys()
    assert all(torch.equal(grads_fused[k], grads_plain[k]) for k in grads_plain)


# ---------------------------------------------------------------------------------------------
# GPU tier: the Triton kernel against float64 from the same 16-bit inputs
# ---------------------------------------------------------------------------------------------

# bf16 rounds the logits, their gradient and the two products each to 2^-9 relative, so the
# gradients land ~0.3% (Frobenius) from float64; a kernel off by a factor, or missing the 1/n_valid
# (here ~3500), is off by far more. The loss is a mean of thousands of rows: rounding averages out.
GRAD_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.gpu
def test_gpu_import_touches_no_cuda():
    code = "import torch, nanogpt.fused_loss as f\nassert f.triton is not None and not torch.cuda.is_initialized()\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, vocab, width", [(4096 + 17, 50304, 768), (33, 50257, 64), (7, 300, 32), (5, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_matches_float64(rows, vocab, width, dtype):
    x, weight, targets = inputs(rows, vocab, width, dtype, device="cuda", seed=rows)
    assert fused_loss.fused_path(x, weight)
    expected = float64_loss_and_grads(x, weight, targets, grad_loss=3.0)
    loss, grad_x, grad_weight = loss_and_grads(linear_cross_entropy, x, weight, targets, grad_loss=3.0)
    assert loss.dtype == torch.float32 and grad_x.dtype == dtype and grad_weight.dtype == dtype
    # rounding the logits to 16 bits moves a row's loss by ~3e-3: 1e-3 of the mean needs many rows
    assert abs(loss.item() - expected[0].item()) <= (1e-3 if rows > 1000 else 1e-2) * abs(expected[0].item())
    assert rel_err(grad_x, expected[1]) < GRAD_TOLERANCE[dtype]
    assert rel_err(grad_weight, expected[2]) < GRAD_TOLERANCE[dtype]
    # no worse than today's path (bf16 logits, F.cross_entropy in float32) on the same inputs but for one
    # more 16-bit rounding (the scale grad_loss / n_valid is applied to the matmul outputs): at most 2^-8
    # relative (measured on an H100 at 5 x 16: 4.5e-3 against today's 1.9e-3)
    today = loss_and_grads(linear_cross_entropy_reference, x, weight, targets, grad_loss=3.0)
    for ours, theirs, want in zip((grad_x, grad_weight), today[1:], expected[1:], strict=True):
        assert rel_err(ours, want) <= rel_err(theirs, want) + 2**-8


@pytest.mark.gpu
def test_gpu_kernel_gradient_buffer_per_element():
    """G = softmax - onehot on valid rows (within bf16 rounding), exactly zero on ignored ones."""
    x, weight, targets = inputs(300, 50304, 128, torch.bfloat16, device="cuda", seed=5)
    loss, grad_logits = torch.ops.nanogpt.linear_cross_entropy(x, weight, targets, -1, True)
    logits = (x @ weight.T).double()  # the bf16 logits the kernel saw, in float64
    want = torch.softmax(logits, dim=1)
    valid = targets != -1
    want[torch.arange(300, device="cuda"), targets.clamp(min=0)] -= 1.0
    want[~valid] = 0
    assert torch.equal(grad_logits[~valid], torch.zeros_like(grad_logits[~valid]))
    torch.testing.assert_close(grad_logits.double(), want, rtol=2**-7, atol=1e-6)
    lse = torch.logsumexp(logits, dim=1)
    row_losses = (lse - logits[torch.arange(300, device="cuda"), targets.clamp(min=0)])[valid]
    torch.testing.assert_close(loss.double(), row_losses.mean(), rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_gpu_compiled_equals_eager_and_no_grad_skips_the_gradient():
    x, weight, targets = inputs(2048 + 5, 50304, 256, torch.bfloat16, device="cuda", seed=9)
    eager = loss_and_grads(linear_cross_entropy, x, weight, targets, grad_loss=2.0)
    compiled_fn = torch.compile(linear_cross_entropy, fullgraph=True)
    compiled = loss_and_grads(compiled_fn, x, weight, targets, grad_loss=2.0)
    assert abs(compiled[0].item() - eager[0].item()) <= 1e-6 * abs(eager[0].item())
    for a, b in zip(compiled[1:], eager[1:], strict=True):
        # Inductor may fuse the scaling of the matmul outputs into fp32 before their last rounding: the two
        # differ by up to one bf16 rounding (measured on an H100: 1.1e-3)
        assert rel_err(a, b) < 2**-8
    with torch.no_grad():
        assert abs(linear_cross_entropy(x, weight, targets).item() - eager[0].item()) <= 1e-5 * eager[0].item()
        assert abs(compiled_fn(x, weight, targets).item() - eager[0].item()) <= 1e-5 * eager[0].item()


@pytest.mark.gpu
def test_gpu_model_trains_the_same_with_and_without_the_fused_loss():
    """A few AdamW steps under bf16 autocast: fused (eager and compiled) against --fused_loss=False."""
    def train(fused, compile_model):
        return small_gpt_losses("cuda", compile_model=compile_model, ignore_prefix=3, fused_loss=fused)

    plain = train(False, False)
    assert plain[-1] < plain[0] - 0.5, plain
    for compile_model in (False, True):
        fused = train(True, compile_model)
        assert fused == pytest.approx(plain, abs=2e-2), (compile_model, fused, plain)
