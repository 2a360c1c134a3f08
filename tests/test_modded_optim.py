"""CPU tests of the speedrun's matrix optimizer (modded_nanogpt/optim.py).

Measured band: the five published Polar Express polynomials map every normalized
singular value in [1e-3, 1] into [0.8589, 1.1411] (dense scalar sweep, float64), the
minimax error of the composition: the coefficients aim for speed in bf16, not exactness.
The relative Frobenius error to the exact polar factor is the RMS of (f(s) - 1) over the
singular values, so it is at most 0.1411 when all of them lie in that interval; measured
0.099-0.102 on Gaussian rectangular matrices, 0.13-0.15 on square ones, whose smallest
singular values fall below 1e-3 * ||G||_F and are only partly lifted.
"""

import math

import pytest
import torch

from modded_nanogpt.optim import POLAR_EXPRESS_COEFFS, NorMuon, polar_express

BAND = (0.85, 1.15)
RECT_SHAPES = [(128, 32), (32, 128), (4, 48, 96), (3, 96, 40)]


def exact_polar(G):
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh, U, S, Vh


def rel_error(X, P):
    return ((X.double() - P).norm(dim=(-2, -1)) / P.norm(dim=(-2, -1))).max().item()


def test_composed_polynomial_band_on_target_interval():
    x = torch.logspace(-3, 0, 100001, dtype=torch.float64)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        x = a * x + b * x**3 + c * x**5
    assert BAND[0] < x.min().item() and x.max().item() < BAND[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", RECT_SHAPES)
def test_polar_express_rectangular(shape, dtype):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = polar_express(G.to(dtype))
    assert X.dtype == dtype and X.shape == G.shape
    s = torch.linalg.svdvals(X.double())
    assert BAND[0] < s.min().item() and s.max().item() < BAND[1]
    assert rel_error(X, exact_polar(G)[0]) < 0.12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polar_express_square(dtype):
    # Square Gaussian matrices have singular values below the 1e-3 design floor, so
    # check each input direction: U^T X V is diagonal with f(s_i), in the band when
    # s_i >= 1e-3 * 1.02 * ||G||_F and never above the band's top otherwise.
    G = torch.randn(2, 96, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    X = polar_express(G.to(dtype)).double()
    P, U, S, Vh = exact_polar(G)
    f = torch.diagonal(U.mT @ X @ Vh.mT, dim1=-2, dim2=-1)
    covered = S >= 1e-3 * 1.02 * G.norm(dim=(-2, -1), keepdim=True).squeeze(-1)
    assert covered.float().mean() > 0.9
    assert BAND[0] < f[covered].min().item() and f.max().item() < BAND[1]
    assert f.min().item() > 0
    assert rel_error(X, P) < 0.2


def test_polar_express_scale_invariant():
    G = torch.randn(3, 40, 72, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(polar_express(G), polar_express(10 * G), rtol=1e-5, atol=1e-5)


def test_polar_express_rejects_vectors_and_too_many_steps():
    with pytest.raises(ValueError):
        polar_express(torch.randn(5))
    with pytest.raises(ValueError):
        polar_express(torch.randn(4, 4), steps=len(POLAR_EXPRESS_COEFFS) + 1)


# ---- plain float64 reference of one NorMuon step, written with loops ----

def ref_orthogonalize(M):
    rows, cols = M.shape
    X = M.T.clone() if rows > cols else M.clone()
    X = X / (torch.sqrt((X * X).sum()) * 1.02 + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.T if rows > cols else X


def ref_step(p, g, state, lr, wd, lr_mul=1.0, momentum=0.95, beta2=0.95):
    """One NorMuon step on a single matrix p (float64), in place; state is a dict. The second
    moment is per row when rows >= cols, else per column."""
    rows, cols = p.shape
    per_row = rows >= cols
    buf = state.setdefault("buf", torch.zeros_like(p))
    v = state.setdefault("v", [0.0] * (rows if per_row else cols))
    buf.mul_(momentum).add_((1 - momentum) * g)
    nesterov = (1 - momentum) * g + momentum * buf
    ortho = ref_orthogonalize(nesterov)
    normed = torch.empty_like(ortho)
    for k in range(len(v)):
        line = ortho[k] if per_row else ortho[:, k]
        mean_sq = sum(x * x for x in line.tolist()) / len(line)
        v[k] = beta2 * v[k] + (1 - beta2) * mean_sq
        scaled = line / math.sqrt(max(v[k], 1e-10))
        if per_row:
            normed[k] = scaled
        else:
            normed[:, k] = scaled
    normed *= torch.sqrt((ortho * ortho).sum()) / torch.sqrt((normed * normed).sum())
    lr_eff = lr * max(1.0, rows / cols) ** 0.5 * lr_mul
    for i in range(rows):
        for j in range(cols):
            decay = wd * lr * lr_eff * p[i, j] if normed[i, j] * p[i, j] >= 0 else 0.0
            p[i, j] = p[i, j] - decay - lr_eff * normed[i, j]


@pytest.mark.parametrize("shape, lr_muls", [((12, 7), None), ((6, 10), None), ((7, 7), None),
                                            ((2, 8, 5), (1.0, 2.0)), ((3, 4, 9), (0.5, 1.0, 2.0))])
def test_normuon_matches_reference(shape, lr_muls):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
    p_ref = p.detach().clone().reshape(-1, *shape[-2:])
    states = [{} for _ in range(p_ref.shape[0])]
    muls = lr_muls or (1.0,) * p_ref.shape[0]
    lr_mul = 1.0 if lr_muls is None else torch.tensor(lr_muls, dtype=torch.float64).view(-1, 1, 1)
    opt = NorMuon([p], lr=0.05, weight_decay=0.5, lr_mul=lr_mul)
    for _ in range(4):
        g = torch.randn(*shape, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        for k, g_k in enumerate(g.reshape(-1, *shape[-2:])):
            ref_step(p_ref[k], g_k, states[k], lr=0.05, wd=0.5, lr_mul=muls[k])
    torch.testing.assert_close(p.detach(), p_ref.reshape(shape), rtol=1e-10, atol=1e-12)
    rows, cols = shape[-2:]
    moment_shape = (*shape[:-1], 1) if rows >= cols else (*shape[:-2], 1, cols)
    assert opt.state[p]["second_moment"].shape == moment_shape


def test_cautious_weight_decay_where_signs_agree_or_the_update_is_zero():
    # A positive diagonal gradient has polar factor I, so the update is c * I with c > 0
    # and exactly zero off the diagonal: the mask (N * p) >= 0 holds on the positive
    # diagonal entries and everywhere off the diagonal.
    n, lr, wd = 6, 0.1, 1.2
    p0 = torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    p0.diagonal().copy_(torch.tensor([1.0, -2.0, 0.5, -0.3, 3.0, -1.0]))
    grad = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64))
    results = {}
    for decay in (wd, 0.0):
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        NorMuon([p], lr=lr, weight_decay=decay).step()
        results[decay] = p.detach()
    update = (p0 - results[0.0]) / lr
    assert torch.all(update.diagonal() > 0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    assert torch.all(update[off_diagonal] == 0)
    expected_mask = off_diagonal | (p0 > 0)
    decay_applied = results[0.0] - results[wd]
    torch.testing.assert_close(decay_applied, lr * lr * wd * p0 * expected_mask, rtol=1e-12, atol=1e-15)


def decay_factor(shape, lr_mul, lr=0.023, wd=1.2):
    """The part of one NorMuon step proportional to p, per entry, for a p whose signs agree with the
    update everywhere. The update does not depend on p, so a first step from p = 0 gives it."""
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    after = {}
    for name, p0 in (("zero", torch.zeros(*shape, dtype=torch.float64)), ("agreeing", None)):
        if p0 is None:  # N = -step / lr_eff, so p of the opposite sign to the step has N * p >= 0
            gen = torch.Generator().manual_seed(8)
            magnitude = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.5
            p0 = torch.where(after["zero"] <= 0, magnitude, -magnitude)
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        NorMuon([p], lr=lr, weight_decay=wd, lr_mul=lr_mul).step()
        after[name] = p.detach()
    return (p0 + after["zero"] - after["agreeing"]) / p0


@pytest.mark.parametrize("kind, shape, lr_mul, published", [
    ("attention 768x768", (16, 16), 1.0, "6.3e-04"),
    ("MLP up 3072x768", (32, 8), 1.0, "1.3e-03"),
    ("MLP down 3072x768 stored", (32, 8), 2.0, "2.5e-03"),
])
def test_published_decay_factors(kind, shape, lr_mul, published):
    """The record's decay per step at schedule multiplier 1 (lr 0.023, wd 1.2): wd * lr * lr_eff,
    lr_eff = lr * max(1, rows / cols) ** 0.5 * lr_mul. Small shapes of the same aspect ratio."""
    factor = decay_factor(shape, lr_mul)
    exact = 1.2 * 0.023 * 0.023 * max(1.0, shape[0] / shape[1]) ** 0.5 * lr_mul
    torch.testing.assert_close(factor, torch.full(shape, exact, dtype=torch.float64), rtol=1e-9, atol=0)
    assert f"{exact:.1e}" == published, kind


def test_bank_lr_mul_per_matrix_matches_separate_groups():
    """A (2, rows, cols) bank with lr_mul (1, 2) per matrix steps as two matrices in groups of lr_mul 1
    and 2."""
    gen = torch.Generator().manual_seed(9)
    bank = torch.nn.Parameter(torch.randn(2, 32, 8, generator=gen, dtype=torch.float64))
    up, down = (torch.nn.Parameter(bank.detach()[k].clone()) for k in range(2))
    opt_bank = NorMuon([bank], lr=0.023, lr_mul=torch.tensor([1.0, 2.0], dtype=torch.float64).view(2, 1, 1))
    opt_split = NorMuon([{"params": [up]}, {"params": [down], "lr_mul": 2.0}], lr=0.023)
    for _ in range(3):
        g = torch.randn(2, 32, 8, generator=gen, dtype=torch.float64)
        bank.grad, up.grad, down.grad = g.clone(), g[0].clone(), g[1].clone()
        opt_bank.step()
        opt_split.step()
    split = torch.stack([up.detach(), down.detach()])
    torch.testing.assert_close(bank.detach(), split, rtol=1e-12, atol=1e-14)


def test_zero_gradient_only_decays():
    """A zero gradient gives O = 0 and v = 0: the floor on v keeps N finite (zero), and the >= mask
    decays every entry by wd * lr * lr_eff."""
    p0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    p.grad = torch.zeros_like(p)
    NorMuon([p], lr=0.02, weight_decay=1.2).step()
    torch.testing.assert_close(p.detach(), p0 * (1 - 1.2 * 0.02 * 0.02 * 2**0.5), rtol=1e-14, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 1.2])
def test_normuon_lowers_least_squares_loss(weight_decay):
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(256, 32, generator=gen)
    targets = inputs @ torch.randn(16, 32, generator=gen).T * 0.3
    weight = torch.nn.Parameter(0.01 * torch.randn(16, 32, generator=gen))
    opt = NorMuon([weight], lr=0.02, weight_decay=weight_decay)

    def loss_fn():
        return ((inputs @ weight.T - targets) ** 2).mean()

    initial = loss_fn().item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    final = loss_fn().item()
    print(f"wd={weight_decay}: loss {initial:.4f} -> {final:.4f}")
    assert final < 0.05 * initial


def test_normuon_rejects_vector_params():
    with pytest.raises(ValueError):
        NorMuon([torch.nn.Parameter(torch.randn(4))])


def test_polar_express_bfloat16_compute():
    # The GPU path's dtype, run on CPU: bf16 rounding widens the band slightly
    # (measured [0.857, 1.145] for this input).
    G = torch.randn(4, 48, 96, generator=torch.Generator().manual_seed(6))
    X = polar_express(G, dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert 0.8 < s.min().item() and s.max().item() < 1.2
    assert rel_error(X, exact_polar(G)[0]) < 0.12
