"""The speedrun's matrix optimizer: Polar Express orthogonalization and NorMuon.

`polar_express(G)` approximates the polar factor U V^T of G (G = U S V^T) with five odd
quintic polynomial iterations; `NorMuon` is Muon (Nesterov momentum, then
orthogonalization) with NorMuon's per-neuron second-moment normalization and cautious
weight decay, as the modded-nanogpt record computes them. Both run on CPU in float32/float64
for tests and in bf16 on GPU.
"""

import torch

from modded_nanogpt.kernels import ba_plus_caa, use_triton, xxt

# Per-iteration (a, b, c) for X <- a X + b (X X^T) X + c (X X^T)^2 X, five iterations.
# Source: the Polar Express coefficients of the modded-nanogpt speedrun (train_gpt.py),
# computed by the method of Amsel, Persson, Musco, Gower 2025, "The Polar Express"
# (arXiv:2505.16932): per-iteration minimax odd quintics, starting interval [1e-3, 1].
# Measured here: their composition maps [1e-3, 1] into [0.8589, 1.1411].
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G, steps=5, dtype=None, safety=1.02, eps=1e-7):
    """Approximate the polar factor of G, shape (..., m, n), batched over leading dims.

    dtype is the computation dtype: None means bf16 on CUDA and G's own dtype elsewhere.
    The result stays in that dtype. Its singular values approximate 1 wherever G's
    singular values exceed about 1e-3 * ||G||_F (the interval the coefficients target).
    safety=1.02 follows the speedrun: dividing by a slightly inflated Frobenius norm
    keeps bf16 rounding from pushing the top singular value past 1.
    """
    if G.ndim < 2:
        raise ValueError(f"polar_express needs a matrix or a bank of matrices, got shape {tuple(G.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {steps}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else G.dtype
    X = G.to(dtype)
    # Work on the short side: X X^T is then min(m, n) square, the cheaper Gram matrix.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + eps)
    # On GPU the two symmetric products go to kernels that compute only their upper
    # triangles, and a X + B X to one cuBLAS call with the addition in its epilogue.
    fused = use_triton(X) and X.ndim in (2, 3)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if fused:
            B = ba_plus_caa(xxt(X), alpha=c, beta=b)  # b gram + c gram^2, gram = X X^T
            X = torch.baddbmm(X, B, X, beta=a) if X.ndim == 3 else torch.addmm(X, B, X, beta=a)
        else:
            gram = X @ X.mT
            X = a * X + (b * gram + c * (gram @ gram)) @ X
    return X.mT if transposed else X


class NorMuon(torch.optim.Optimizer):
    """Muon with neuron-wise normalization (NorMuon) and cautious weight decay, as in the speedrun.

    For parameters of shape (rows, cols) or banks (..., rows, cols); a row is one output
    neuron of an nn.Linear-style weight. One step, per matrix:

        buf  <- lerp(buf, g, 1 - momentum)             # EMA momentum
        u    <- lerp(g, buf, momentum)                 # Nesterov look-ahead
        O    <- polar_express(u)
        v    <- lerp(v, mean_d(O * O), 1 - beta2)      # d: cols if rows >= cols, else rows
        N    <- O * rsqrt(max(v, eps))
        N    <- N * ||O||_F / ||N||_F                  # keep Muon's update norm
        lr'  <- lr * max(1, rows / cols) ** 0.5 * lr_mul
        mask <- (N * p) >= 0                           # cautious: decay only where the
        p    <- p - wd * lr * lr' * p * mask - lr' * N #   update also shrinks |p|

    The second moment is kept along the longer side (one per row of a tall matrix, one per
    column of a wide one). NorMuon (Li et al. 2025, arXiv:2510.05491) rescales by
    0.2 * sqrt(m n) / ||N||_F to match Adam's update RMS; here, as in the speedrun, the norm
    is matched to the orthogonalized update instead so Muon's learning rates carry over. No
    bias correction on v: it would scale every row alike, which the norm matching undoes.
    The decay scales with lr * lr', so it shrinks with the square of the schedule. It uses p
    before the step; since the update is subtracted, update and p having the same sign means
    the update moves p toward zero, and decay agrees with it. lr_mul is a group setting: a
    float, or a tensor broadcastable to (..., 1, 1) for one multiplier per matrix of a bank.
    """

    def __init__(self, params, lr=0.023, momentum=0.95, beta2=0.95, weight_decay=1.2,
                 nesterov=True, ns_steps=5, eps=1e-10, ortho_dtype=None, lr_mul=1.0):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr}, {weight_decay}")
        if not 0 <= momentum < 1 or not 0 <= beta2 < 1:
            raise ValueError(f"momentum and beta2 must be in [0, 1), got {momentum}, {beta2}")
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                        nesterov=nesterov, ns_steps=ns_steps, eps=eps, ortho_dtype=ortho_dtype,
                        lr_mul=lr_mul)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"NorMuon takes matrices or banks of them, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p, group):
        normuon_update(p, p.grad, self.state[p], lr=group["lr"], momentum=group["momentum"], beta2=group["beta2"],
                       weight_decay=group["weight_decay"], nesterov=group["nesterov"], ns_steps=group["ns_steps"],
                       eps=group["eps"], ortho_dtype=group["ortho_dtype"], lr_mul=group["lr_mul"])


def normuon_update(p, grad, state, lr, momentum, beta2, weight_decay, nesterov=True, ns_steps=5,
                   eps=1e-10, ortho_dtype=None, lr_mul=1.0):
    """One NorMuon step of p (matrices (..., rows, cols)) in place with `grad`, keeping its moments in
    `state`; see NorMuon for the math (eps is the floor of the second moment). lr_mul: a float, or a
    tensor broadcastable to (..., 1, 1), one multiplier per matrix. The sharded optimizer
    (dist_optim.py) calls it on each rank's slice."""
    rows, cols = p.shape[-2], p.shape[-1]
    # One second moment per row of a tall (or square) matrix, per column of a wide one.
    reduce_dim = -1 if rows >= cols else -2
    if not state:
        # At least float32: bf16 moments would round away the small EMA increments.
        state_dtype = torch.promote_types(p.dtype, torch.float32)
        moment_shape = (*p.shape[:-1], 1) if reduce_dim == -1 else (*p.shape[:-2], 1, cols)
        state["momentum_buffer"] = torch.zeros(p.shape, dtype=state_dtype, device=p.device)
        state["second_moment"] = torch.zeros(moment_shape, dtype=state_dtype, device=p.device)
    buf, second_moment = state["momentum_buffer"], state["second_moment"]

    grad = grad.to(buf.dtype)
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if nesterov else buf
    ortho = polar_express(update, ns_steps, dtype=ortho_dtype).to(buf.dtype)

    second_moment.lerp_(ortho.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    normed = ortho * second_moment.clamp_min(eps).rsqrt()
    ortho_norm = ortho.norm(dim=(-2, -1), keepdim=True)
    normed.mul_(ortho_norm / normed.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))

    lr_eff = lr * max(1.0, rows / cols) ** 0.5 * lr_mul
    # Cautious: decay only where the update also shrinks |p| (p before the step, as in the update).
    decayed = None
    if weight_decay != 0:
        decayed = torch.where((normed * p) >= 0, p, 0) * (weight_decay * lr * lr_eff)
    step = normed.mul_(lr_eff)
    if decayed is not None:
        step.add_(decayed)
    p.sub_(step.to(p.dtype))
