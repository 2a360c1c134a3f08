"""attention_inputs: an attention layer's q, k, v from its input: the QKV projection, q/k RMSNorm +
half-truncated rotary, the key offset and the value-embedding mix.

The plain version is attention_inputs_reference (tensor code that Inductor fuses; --qkv_kernel=torch, and
wherever attention_inputs_supported says no). Profiled on an H200 at a
stage-3 micro-step, its q/k kernels took 162-181 us forward and 219 us backward per attention layer, about
twice the bytes they move (read q, k; write them: 302 MB forward, 453 MB backward). This op does the
projection through cuBLAS and everything after it in one pass each way: q, k and v leave the forward
contiguous (T, H, D) (the paired-head reshape is then a view), and the backward writes the whole (T, 3 H D)
gradient of the projection's output, so the two products that follow read it as one tensor. Selected by
--qkv_kernel=triton (the default; model.GPT.attention). Measured on an H200 (modded_nanogpt.bench.profile,
stage 3): ~131 us forward and ~168 us backward per layer and micro-step for q, k and v together, and a stage-3
step 684.9 -> 669.3 ms against the plain version.
"""

import torch
import torch.nn.functional as F

from modded_nanogpt.kernels import common
from modded_nanogpt.kernels.common import tl, triton

_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps for its float32 computation


def attention_inputs_supported(x: torch.Tensor, head_dim: int) -> bool:
    """Where attention_inputs can run: the fused path's device and dtype (bf16), and a power-of-two head_dim
    (the kernels take a head's halves as tiles of head_dim / 2 columns)."""
    return common.use_triton(x) and x.dtype == torch.bfloat16 and head_dim >= 4 and head_dim & (head_dim - 1) == 0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos/sin: (T, D // 2), or (T, H, D // 2) for a position per head. Rotates pairs (i, i + D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


def paired_rotary(table: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(T, H, D // 2) rows of a (2 T, D // 2) table for a paired-head layer: head h at token t takes position
    2 t + (h % 2), as the published code rotates its (T, H / 2, 2 D) view (a head pair's two halves at 2 t and
    2 t + 1) before it reads the same memory as the (2 T, H / 2, D) stream in which heads h and h + H / 2
    share a stream (rows 2 t and 2 t + 1)."""
    parity = torch.arange(num_heads, device=table.device) % 2
    return table.view(-1, 2, table.size(-1))[:, parity]


def attention_inputs_reference(x, w_qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads: int, qk_norm: bool,
                               key_offset: bool, paired: bool = False):
    """q, k, v (T, H, D) of an attention layer from its normalized input x (T, dim): the projection, RMSNorm
    on q and k, the rotation, the key offset, and the value embeddings mixed into v with their gate (T, H).
    paired: cos/sin have 2 T rows, head h at token t rotates by row 2 t + (h % 2) (paired_rotary).
    Plain tensor code for Inductor; attention_inputs is the same in one Triton kernel each way."""
    T, H = x.size(0), num_heads
    D = w_qkv.size(0) // (3 * H)
    q, k, v = (x @ w_qkv.T).view(T, 3, H, D).unbind(1)
    if qk_norm:
        q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
    if paired:
        cos, sin = paired_rotary(cos, H), paired_rotary(sin, H)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if key_offset:
        # Stationary dims of a key carry the previous token's content: a query can match "the token
        # after X" in one layer (induction). Nothing is carried across a document start.
        stationary = k[..., D // 4 : D // 2], k[..., 3 * D // 4 :]
        shifted = [torch.cat([s[:1] * 0, s[:-1]]) * not_doc_start[:, None, None] for s in stationary]
        k = torch.cat([k[..., : D // 4], shifted[0], k[..., D // 2 : 3 * D // 4], shifted[1]], dim=-1)
    if ve is not None:
        v = v + ve_gate[..., None] * ve.view(T, H, D)
    return q, k, v


def attention_inputs(x, w_qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads: int, qk_norm: bool,
                     key_offset: bool, paired: bool = False):
    """q, k, v (T, H, D) of one attention layer from its normalized input x (T, dim) and w_qkv (3 H D, dim),
    as attention_inputs_reference computes them, where attention_inputs_supported says so.
    paired: cos/sin have 2 T rows and head h at token t rotates by row 2 t + (h % 2)."""
    return _AttentionInputs.apply(x, w_qkv, cos, sin, not_doc_start, ve,
                                  None if ve_gate is None else ve_gate.contiguous(), num_heads, qk_norm, key_offset,
                                  paired)


class _AttentionInputs(torch.autograd.Function):
    """The projection (cuBLAS) and the fused kernels; the projection's output is kept for the backward."""

    @staticmethod
    def forward(ctx, x, w_qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads, qk_norm, key_offset, paired):
        qkv = x @ w_qkv.T
        q, k, v = torch.ops.modded_nanogpt.attention_inputs_forward(qkv, cos, sin, not_doc_start, ve, ve_gate,
                                                                    num_heads, qk_norm, key_offset, paired)
        ctx.save_for_backward(x, w_qkv, qkv, cos, sin, not_doc_start, ve, ve_gate)
        ctx.flags = (num_heads, qk_norm, key_offset, paired)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        x, w_qkv, qkv, cos, sin, not_doc_start, ve, ve_gate = ctx.saved_tensors
        grad_qkv, grad_ve, grad_gate = torch.ops.modded_nanogpt.attention_inputs_backward(
            grad_q, grad_k, grad_v, qkv, cos, sin, not_doc_start, ve, ve_gate, *ctx.flags)
        has_ve = ve is not None
        return (grad_qkv @ w_qkv, grad_qkv.T @ x, None, None, None, grad_ve if has_ve else None,
                grad_gate if has_ve else None, None, None, None, None)


def _ve_launch_args(ve, ve_gate, placeholder):
    """(ve, gate, ve row stride, gate row stride) for the kernels; without value embeddings a placeholder
    pointer (never read: HAS_VE is off) and zero strides."""
    if ve is None:
        return placeholder, placeholder, 0, 0
    return ve, ve_gate, ve.stride(0), ve_gate.stride(0)


@torch.library.custom_op("modded_nanogpt::attention_inputs_forward", mutates_args=())
def _attention_inputs_forward_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, not_doc_start: torch.Tensor,
                                 ve: torch.Tensor | None, ve_gate: torch.Tensor | None, num_heads: int, qk_norm: bool,
                                 key_offset: bool, paired: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = qkv.shape[0]
    head_dim = qkv.shape[1] // (3 * num_heads)
    q, k, v = (torch.empty((T, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    ve_arg, gate_arg, ve_stride, gate_stride = _ve_launch_args(ve, ve_gate, qkv)
    _attention_inputs_kernel[(num_heads, triton.cdiv(T, 32))](
        qkv, cos, sin, not_doc_start, ve_arg, gate_arg, q, k, v, T, qkv.stride(0), cos.stride(0), ve_stride,
        gate_stride, _NORM_EPS, H=num_heads, HALF=head_dim // 2, QK_NORM=qk_norm, KEY_OFFSET=key_offset,
        HAS_VE=ve is not None, PAIRED=paired, BLOCK_T=32, num_warps=4)
    return q, k, v


@_attention_inputs_forward_op.register_fake
def _(qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads, qk_norm, key_offset, paired):
    shape = (qkv.shape[0], num_heads, qkv.shape[1] // (3 * num_heads))
    return tuple(qkv.new_empty(shape) for _ in range(3))


@torch.library.custom_op("modded_nanogpt::attention_inputs_backward", mutates_args=())
def _attention_inputs_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, qkv: torch.Tensor,
                                  cos: torch.Tensor, sin: torch.Tensor, not_doc_start: torch.Tensor,
                                  ve: torch.Tensor | None, ve_gate: torch.Tensor | None, num_heads: int, qk_norm: bool,
                                  key_offset: bool, paired: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of the projection's output (T, 3 H D), grad ve, grad ve_gate); the last two are empty without
    value embeddings."""
    T, H = qkv.shape[0], num_heads
    head_dim = qkv.shape[1] // (3 * H)
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
    grad_qkv = torch.empty_like(qkv)
    has_ve = ve is not None
    grad_ve = torch.empty_like(ve) if has_ve else qkv.new_empty(0)
    grad_gate = torch.empty((T, H), dtype=torch.float32, device=qkv.device) if has_ve else qkv.new_empty(0)
    ve_arg, gate_arg, ve_stride, gate_stride = _ve_launch_args(ve, ve_gate, qkv)
    grad_ve_arg, grad_gate_arg, _, _ = _ve_launch_args(grad_ve if has_ve else None, grad_gate, qkv)
    _attention_inputs_backward_kernel[(H, triton.cdiv(T, 32))](
        *grads, qkv, cos, sin, not_doc_start, ve_arg, gate_arg, grad_qkv, grad_ve_arg, grad_gate_arg, T,
        *(g.stride(0) for g in grads), *(g.stride(1) for g in grads), qkv.stride(0), cos.stride(0), ve_stride,
        gate_stride, _NORM_EPS, H=H, HALF=head_dim // 2, QK_NORM=qk_norm, KEY_OFFSET=key_offset, HAS_VE=has_ve,
        PAIRED=paired, BLOCK_T=32, num_warps=4)
    return grad_qkv, grad_ve, grad_gate.to(qkv.dtype) if has_ve else grad_gate


@_attention_inputs_backward_op.register_fake
def _(grad_q, grad_k, grad_v, qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads, qk_norm, key_offset, paired):
    has_ve = ve is not None
    return (torch.empty_like(qkv), torch.empty_like(ve) if has_ve else qkv.new_empty(0),
            qkv.new_empty(ve_gate.shape) if has_ve else qkv.new_empty(0))


# ---------------------------------------------------------------------------------------------
# Triton kernels (defined only where triton imports)
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_half_rows(ptr, rows, row_stride, cols, mask):
        return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _rms_scale(lo, hi, HALF: tl.constexpr, eps):
        """1 / rms of each row of [lo, hi] (float32), as a column."""
        return tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * HALF) + eps)[:, None]

    @triton.jit
    def _normalized_halves(base, rows, row_stride, cols, mask, eps, HALF: tl.constexpr, QK_NORM: tl.constexpr):
        """Both halves of rows of one head, RMS-normalized and rounded to bf16 as F.rms_norm's output is."""
        lo = _load_half_rows(base, rows, row_stride, cols, mask)
        hi = _load_half_rows(base + HALF, rows, row_stride, cols, mask)
        if QK_NORM:
            scale = _rms_scale(lo, hi, HALF, eps)
            lo = (lo * scale).to(tl.bfloat16).to(tl.float32)
            hi = (hi * scale).to(tl.bfloat16).to(tl.float32)
        return lo, hi

    @triton.jit
    def _head_block(cos_ptr, sin_ptr, T, table_stride, HALF: tl.constexpr, PAIRED: tl.constexpr,
                    BLOCK_T: tl.constexpr):
        """This program's head, tokens (int64), half-columns, token mask (1-D and as a column) and cos/sin rows
        (PAIRED: the tables have 2 T rows and head h at token t takes row 2 t + h % 2). Heads vary fastest in
        the grid: the programs of one token block share its cos/sin rows in L2."""
        h = tl.program_id(0)
        ts = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tl.arange(0, HALF)
        t_in = ts < T
        mask = t_in[:, None]
        table_rows = 2 * ts + h % 2 if PAIRED else ts
        cos = tl.load(cos_ptr + table_rows[:, None] * table_stride + cols[None, :], mask=mask, other=1.0)
        sin = tl.load(sin_ptr + table_rows[:, None] * table_stride + cols[None, :], mask=mask, other=0.0)
        return h, ts, cols, t_in, mask, cos, sin

    @triton.jit
    def _attention_inputs_kernel(qkv_ptr, cos_ptr, sin_ptr, nds_ptr, ve_ptr, gate_ptr, q_ptr, k_ptr, v_ptr, T,
                                 qkv_stride, table_stride, ve_stride, gate_stride, eps, H: tl.constexpr,
                                 HALF: tl.constexpr, QK_NORM: tl.constexpr, KEY_OFFSET: tl.constexpr,
                                 HAS_VE: tl.constexpr, PAIRED: tl.constexpr, BLOCK_T: tl.constexpr):
        """Program (head h, token block): q, k, v of BLOCK_T tokens of head h, each as two halves of HALF dims.

        q = rot(norm(q_pre)), k likewise; with KEY_OFFSET the stationary dims of k (the upper half of each
        half: zero frequency) are those of norm(k_pre) one token earlier, times not_doc_start; v = v_pre +
        gate * ve. Outputs (T, H, 2 HALF), contiguous."""
        h, ts, cols, t_in, mask, cos, sin = _head_block(cos_ptr, sin_ptr, T, table_stride, HALF, PAIRED, BLOCK_T)
        out_rows = ((ts * H + h) * (2 * HALF))[:, None]

        q_base = qkv_ptr + h * (2 * HALF)
        lo, hi = _normalized_halves(q_base, ts, qkv_stride, cols, mask, eps, HALF, QK_NORM)
        tl.store(q_ptr + out_rows + cols[None, :], (lo * cos + hi * sin).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_ptr + out_rows + HALF + cols[None, :], (hi * cos - lo * sin).to(q_ptr.dtype.element_ty), mask=mask)

        k_base = qkv_ptr + (H + h) * (2 * HALF)
        lo, hi = _normalized_halves(k_base, ts, qkv_stride, cols, mask, eps, HALF, QK_NORM)
        k_lo, k_hi = lo * cos + hi * sin, hi * cos - lo * sin
        if KEY_OFFSET:
            prev = ts - 1
            prev_lo, prev_hi = _normalized_halves(k_base, prev, qkv_stride, cols, (t_in & (prev >= 0))[:, None], eps,
                                                  HALF, QK_NORM)
            carry = tl.load(nds_ptr + ts, mask=t_in, other=0.0).to(tl.float32)[:, None]
            stationary = (cols >= HALF // 2)[None, :]
            k_lo = tl.where(stationary, prev_lo * carry, k_lo)
            k_hi = tl.where(stationary, prev_hi * carry, k_hi)
        tl.store(k_ptr + out_rows + cols[None, :], k_lo.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_ptr + out_rows + HALF + cols[None, :], k_hi.to(k_ptr.dtype.element_ty), mask=mask)

        dims = tl.arange(0, 2 * HALF)
        v = tl.load(qkv_ptr + ts[:, None] * qkv_stride + (2 * H + h) * (2 * HALF) + dims[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_VE:
            gate = tl.load(gate_ptr + ts * gate_stride + h, mask=t_in, other=0.0).to(tl.float32)[:, None]
            ve = tl.load(ve_ptr + ts[:, None] * ve_stride + h * (2 * HALF) + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            v = v + gate * ve
        tl.store(v_ptr + out_rows + dims[None, :], v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_input_grad(d_lo, d_hi, cos, sin, x_base, ts, qkv_stride, cols, mask, eps, out, HALF: tl.constexpr,
                       QK_NORM: tl.constexpr):
        """Store the gradient of q_pre (or k_pre) given that of the rotated output's halves: the rotation's
        transpose, then the RMSNorm's backward dx = s (g - y mean(g y)), y = x s, recomputed from x."""
        g_lo = d_lo * cos - d_hi * sin
        g_hi = d_lo * sin + d_hi * cos
        if QK_NORM:
            x_lo = _load_half_rows(x_base, ts, qkv_stride, cols, mask)
            x_hi = _load_half_rows(x_base + HALF, ts, qkv_stride, cols, mask)
            scale = _rms_scale(x_lo, x_hi, HALF, eps)
            y_lo, y_hi = x_lo * scale, x_hi * scale
            mean_gy = ((tl.sum(g_lo * y_lo, axis=1) + tl.sum(g_hi * y_hi, axis=1)) / (2 * HALF))[:, None]
            g_lo = scale * (g_lo - y_lo * mean_gy)
            g_hi = scale * (g_hi - y_hi * mean_gy)
        tl.store(out + cols[None, :], g_lo.to(out.dtype.element_ty), mask=mask)
        tl.store(out + HALF + cols[None, :], g_hi.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _attention_inputs_backward_kernel(gq_ptr, gk_ptr, gv_ptr, qkv_ptr, cos_ptr, sin_ptr, nds_ptr, ve_ptr,
                                          gate_ptr, gqkv_ptr, gve_ptr, ggate_ptr, T, gq_t, gk_t, gv_t, gq_h, gk_h,
                                          gv_h, qkv_stride, table_stride, ve_stride, gate_stride, eps,
                                          H: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                                          KEY_OFFSET: tl.constexpr, HAS_VE: tl.constexpr, PAIRED: tl.constexpr,
                                          BLOCK_T: tl.constexpr):
        """The gradient of _attention_inputs_kernel for (head h, token block): of the projection's output (its
        q, k and v parts, one (T, 3 H D) tensor), of ve and of the gate. With KEY_OFFSET, the gradient of k's
        stationary dims at token t comes from the output at token t + 1."""
        h, ts, cols, t_in, mask, cos, sin = _head_block(cos_ptr, sin_ptr, T, table_stride, HALF, PAIRED, BLOCK_T)
        grad_rows = gqkv_ptr + ts[:, None] * qkv_stride

        gq_base = gq_ptr + h * gq_h
        d_lo = _load_half_rows(gq_base, ts, gq_t, cols, mask)
        d_hi = _load_half_rows(gq_base + HALF, ts, gq_t, cols, mask)
        _qk_input_grad(d_lo, d_hi, cos, sin, qkv_ptr + h * (2 * HALF), ts, qkv_stride, cols, mask, eps,
                       grad_rows + h * (2 * HALF), HALF, QK_NORM)

        gk_base = gk_ptr + h * gk_h
        d_lo = _load_half_rows(gk_base, ts, gk_t, cols, mask)
        d_hi = _load_half_rows(gk_base + HALF, ts, gk_t, cols, mask)
        if KEY_OFFSET:
            nxt = ts + 1
            next_in = nxt < T
            carry = tl.load(nds_ptr + nxt, mask=next_in, other=0.0).to(tl.float32)[:, None]
            stationary = (cols >= HALF // 2)[None, :]
            d_lo = tl.where(stationary, _load_half_rows(gk_base, nxt, gk_t, cols, next_in[:, None]) * carry, d_lo)
            d_hi = tl.where(stationary, _load_half_rows(gk_base + HALF, nxt, gk_t, cols, next_in[:, None]) * carry,
                            d_hi)
        _qk_input_grad(d_lo, d_hi, cos, sin, qkv_ptr + (H + h) * (2 * HALF), ts, qkv_stride, cols, mask, eps,
                       grad_rows + (H + h) * (2 * HALF), HALF, QK_NORM)

        dims = tl.arange(0, 2 * HALF)
        gv = tl.load(gv_ptr + ts[:, None] * gv_t + h * gv_h + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_rows + (2 * H + h) * (2 * HALF) + dims[None, :], gv.to(gqkv_ptr.dtype.element_ty), mask=mask)
        if HAS_VE:
            gate = tl.load(gate_ptr + ts * gate_stride + h, mask=t_in, other=0.0).to(tl.float32)
            ve = tl.load(ve_ptr + ts[:, None] * ve_stride + h * (2 * HALF) + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            tl.store(gve_ptr + ts[:, None] * ve_stride + h * (2 * HALF) + dims[None, :],
                     (gv * gate[:, None]).to(gve_ptr.dtype.element_ty), mask=mask)
            tl.store(ggate_ptr + ts * H + h, tl.sum(gv * ve, axis=1), mask=t_in)
