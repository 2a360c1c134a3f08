"""CPU tests of the speedrun's matrix optimizer (modded_nanogpt/optim.py).

Measured band: the five published Polar Express polynomials map every normalized
singular value in [1e-3, 1] into [0.8589, 1.1411] (dense scalar sweep, float64), the
minimax error of the composition: the coefficients aim for speed in bf16, not exactness.
The relative Frobenius error to the exact polar factor is the RMS of (f(s) - 1) over the
singular values, so it is at most 0.1411 when all of them lie in that interval; measured
0.099-0.102 on Gaussian rectangular matrices, 0.13-0.15 on square ones, whose smallest
singular values fall below 1e-3 * ||G||_F and are only partly lifted.
"""

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


def ref_step(p, g, state, lr, wd, momentum=0.95, beta2=0.95, eps=1e-8):
    """One NorMuon step on a single matrix p (float64), in place; state is a dict."""
    rows, cols = p.shape
    buf = state.setdefault("buf", torch.zeros_like(p))
    v = state.setdefault("v", [0.0] * rows)
    buf.mul_(momentum).add_((1 - momentum) * g)
    nesterov = (1 - momentum) * g + momentum * buf
    ortho = ref_orthogonalize(nesterov)
    normed = torch.empty_like(ortho)
    for i in range(rows):
        row_mean_sq = sum(ortho[i, j].item() ** 2 for j in range(cols)) / cols
        v[i] = beta2 * v[i] + (1 - beta2) * row_mean_sq
        normed[i] = ortho[i] / (v[i] ** 0.5 + eps)
    normed *= torch.sqrt((ortho * ortho).sum()) / torch.sqrt((normed * normed).sum())
    normed *= max(1.0, rows / cols) ** 0.5
    for i in range(rows):
        for j in range(cols):
            if normed[i, j] * p[i, j] > 0:
                p[i, j] -= lr * wd * p[i, j]
            p[i, j] -= lr * normed[i, j]


@pytest.mark.parametrize("shape", [(12, 7), (6, 10), (2, 8, 5)])
def test_normuon_matches_reference(shape):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
    p_ref = p.detach().clone().reshape(-1, *shape[-2:])
    states = [{} for _ in range(p_ref.shape[0])]
    opt = NorMuon([p], lr=0.05, weight_decay=0.5)
    for _ in range(4):
        g = torch.randn(*shape, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        for k, g_k in enumerate(g.reshape(-1, *shape[-2:])):
            ref_step(p_ref[k], g_k, states[k], lr=0.05, wd=0.5)
    torch.testing.assert_close(p.detach(), p_ref.reshape(shape), rtol=1e-10, atol=1e-12)


def test_cautious_weight_decay_only_where_signs_agree():
    # A positive diagonal gradient has polar factor I, so the update is c * I with c > 0
    # and exactly zero off the diagonal: only positive diagonal entries may decay.
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
    expected_mask = torch.eye(n, dtype=torch.bool) & (p0 > 0)
    decay_applied = results[0.0] - results[wd]
    torch.testing.assert_close(decay_applied, lr * wd * p0 * expected_mask, rtol=1e-12, atol=1e-15)


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
