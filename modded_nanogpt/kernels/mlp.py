"""relu2_linear and relu2_mlp: the MLP of a block, relu(x @ up.T) ** 2 @ down, with the squared ReLU in the
epilogue of the up projection's Triton matmul and, in relu2_mlp's backward, the gradient through it in the
epilogue of the matmul that makes it. Hopper and later GPUs take a persistent TMA kernel, others (A100) a
pointer-based one. The Triton matmuls take 16-bit inputs (common.TRITON_MATMUL_DTYPES); float32 inputs take
the reference.
"""

import torch

from modded_nanogpt.kernels import common
from modded_nanogpt.kernels.common import TRITON_MATMUL_DTYPES, tl, tma_ready, triton


def relu2_linear_reference(x, weight):
    """relu(x @ weight.T) ** 2 in plain PyTorch, autograd by torch. x (..., K), weight (M, K)."""
    return torch.relu(x @ weight.mT) ** 2


def relu2_linear(x, weight):
    """relu(x @ weight.T) ** 2 for x (..., K) and weight (M, K); differentiable in both.

    weight is cast to x's dtype first (fp32 master weights with bf16 activations). The fused
    path computes the product in one Triton matmul whose epilogue writes both the output and
    the pre-activation; backward multiplies the incoming gradient by 2 relu(pre) in one
    elementwise kernel and leaves the two matmuls of the gradient to cuBLAS.
    """
    if x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"relu2_linear needs x (..., K) and weight (M, K) with the same K, "
                         f"got x shape {tuple(x.shape)} and weight shape {tuple(weight.shape)}")
    weight = weight.to(x.dtype)
    if not (common.use_triton(x) and x.dtype in TRITON_MATMUL_DTYPES):
        return relu2_linear_reference(x, weight)
    post, _ = torch.ops.modded_nanogpt.relu2_linear(x.reshape(-1, x.shape[-1]), weight)
    return post.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("modded_nanogpt::relu2_linear", mutates_args=())
def _relu2_linear_op(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(post, pre) for 2-D x and weight; pre is kept only for the backward pass."""
    pre = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    post = torch.empty_like(pre)
    if tma_ready(x, weight, pre):
        _relu2_tma(x, weight, pre, pre, post, backward=False)
    else:
        _relu2_pointer(x, weight, pre, post)
    return post, pre


def _relu2_pointer(x, weight, pre, post):
    """Launch the pointer-based kernel (any strides, any GPU): pre = x @ weight^T, post = relu(pre)^2."""
    rows, inner = x.shape
    cols = weight.shape[0]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)
    _relu2_matmul_kernel[grid](
        x, weight, pre, post, rows, cols, inner,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), pre.stride(0), pre.stride(1),
    )


def _relu2_tma(a, b, pre, out, post, backward: bool, post_only: bool = False, config=None):
    """Launch the persistent TMA kernel: a (M, K) @ b (N, K)^T with the squared ReLU's epilogue.
    config: a triton.Config from _relu2_tma_config to run instead of autotuning (benchmarks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    # Block shapes are placeholders here; each autotuned config's pre_hook sets its own.
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (a, b, pre, out, post)]
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = lambda meta: (min(sms * meta["CTAS"], triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
    if config is None:
        return _relu2_tma_persistent_kernel[grid](*descs, M, N, K, BACKWARD=backward, POST_ONLY=post_only,
                                                  NUM_SMS=sms)
    config.pre_hook(dict(zip(("a_desc", "b_desc", "pre_desc", "out_desc", "post_desc"), descs, strict=True)))
    return _relu2_tma_persistent_kernel.fn[grid(config.kwargs)](
        *descs, M, N, K, BACKWARD=backward, POST_ONLY=post_only, NUM_SMS=sms, **config.kwargs,
        num_warps=config.num_warps, num_stages=config.num_stages)


@_relu2_linear_op.register_fake
def _(x, weight):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return out, torch.empty_like(out)


@torch.library.custom_op("modded_nanogpt::relu2_grad", mutates_args=())
def _relu2_grad_op(grad_post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad_post * 2 relu(pre): the gradient through the squared ReLU, in one pass."""
    return _relu2_grad(grad_post.contiguous(), pre.contiguous(), torch.empty_like(pre), from_post=False)


def _relu2_grad(grad_post, saved, grad_pre, from_post: bool):
    """Launch the elementwise kernel: grad_pre = grad_post * 2 relu(pre), saved being pre or (from_post)
    post = relu(pre)^2; all three contiguous and of one shape."""
    numel = saved.numel()
    _relu2_grad_kernel[(triton.cdiv(numel, 4096),)](grad_post, saved, grad_pre, numel, FROM_POST=from_post,
                                                      BLOCK=4096, num_warps=8)
    return grad_pre


@_relu2_grad_op.register_fake
def _(grad_post, pre):
    return torch.empty_like(pre)


def _relu2_linear_setup_context(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight, output[1])


def _relu2_linear_backward(ctx, grad_post, _grad_pre):
    x, weight, pre = ctx.saved_tensors
    grad_pre = torch.ops.modded_nanogpt.relu2_grad(grad_post, pre)
    return grad_pre @ weight, grad_pre.mT @ x


_relu2_linear_op.register_autograd(_relu2_linear_backward, setup_context=_relu2_linear_setup_context)


def relu2_mlp_reference(x, up, down):
    """relu(x @ up.T) ** 2 @ down in plain PyTorch: the MLP of a block. up and down are (hidden, dim)."""
    return relu2_linear_reference(x, up) @ down


def relu2_mlp(x, up, down):
    """relu(x @ up.T) ** 2 @ down for x (..., dim), up and down (hidden, dim); differentiable in all three.

    Weights are cast to x's dtype. On the fused path the up projection is the Triton kernel of
    relu2_linear, the down projection cuBLAS, and the backward's gradient through the squared ReLU
    is the epilogue of the matmul that makes it (grad_y @ down^T, then times 2 relu(pre) before the
    store): the (rows, hidden) gradient of the activation never goes through memory.

    Only post = relu(pre)^2 is stored (the down projection needs it); the backward takes relu(pre) as
    sqrt(post). That saves the forward a (rows, hidden) store (H100, 49,152 x 768 -> 3072: 436 -> 360 us;
    the backward's square root costs ~10 us) and the activation memory of pre. It is as accurate as
    storing pre in 16 bits: sqrt halves post's relative rounding error, so relu(pre) comes back within
    ~2^-10 relative where a stored bf16 pre is within 2^-9.
    """
    if x.ndim < 1 or up.ndim != 2 or up.shape != down.shape or x.shape[-1] != up.shape[1]:
        raise ValueError(f"relu2_mlp needs x (..., dim) and up, down (hidden, dim), got x shape {tuple(x.shape)}, "
                         f"up {tuple(up.shape)}, down {tuple(down.shape)}")
    up, down = up.to(x.dtype), down.to(x.dtype)
    if not (common.use_triton(x) and x.dtype in TRITON_MATMUL_DTYPES):
        return relu2_mlp_reference(x, up, down)
    y = torch.ops.modded_nanogpt.relu2_mlp(x.reshape(-1, x.shape[-1]), up, down)[0]
    return y.reshape(x.shape)


@torch.library.custom_op("modded_nanogpt::relu2_mlp", mutates_args=())
def _relu2_mlp_op(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, post); post is kept for the backward pass (which recovers relu(pre) from it)."""
    if tma_ready(x, up):
        post = torch.empty((x.shape[0], up.shape[0]), dtype=x.dtype, device=x.device)
        _relu2_tma(x, up, post, post, post, backward=False, post_only=True)
    else:  # GPUs without TMA: the pointer kernel, which also writes pre (unused here)
        post = torch.ops.modded_nanogpt.relu2_linear(x, up)[0]
    return post @ down, post


@_relu2_mlp_op.register_fake
def _(x, up, down):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], up.shape[0]))


@torch.library.custom_op("modded_nanogpt::relu2_mlp_grad_pre", mutates_args=())
def _relu2_mlp_grad_pre_op(grad_y: torch.Tensor, down: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """(grad_y @ down^T) * 2 sqrt(post): the gradient of the up projection's output, in one kernel."""
    grad_y, down, post = grad_y.contiguous(), down.contiguous(), post.contiguous()
    grad_pre = torch.empty_like(post)
    if tma_ready(grad_y, down, post):
        _relu2_tma(grad_y, down, post, grad_pre, grad_pre, backward=True, post_only=True)
    else:
        _relu2_grad(grad_y @ down.T, post, grad_pre, from_post=True)
    return grad_pre


@_relu2_mlp_grad_pre_op.register_fake
def _(grad_y, down, post):
    return torch.empty_like(post)


def _relu2_mlp_setup_context(ctx, inputs, output):
    x, up, down = inputs
    ctx.save_for_backward(x, up, down, output[1])


def _relu2_mlp_backward(ctx, grad_y, _grad_post):
    x, up, down, post = ctx.saved_tensors
    grad_pre = torch.ops.modded_nanogpt.relu2_mlp_grad_pre(grad_y, down, post)
    return grad_pre @ up, grad_pre.mT @ x, post.mT @ grad_y


_relu2_mlp_op.register_autograd(_relu2_mlp_backward, setup_context=_relu2_mlp_setup_context)


# ---------------------------------------------------------------------------------------------
# Triton kernels (defined only where triton imports)
# ---------------------------------------------------------------------------------------------

if triton is not None:
    from modded_nanogpt.kernels.tma_tiles import tile_matmul, tile_offsets

    def _matmul_configs(block_m_n_k_warps_stages):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in block_m_n_k_warps_stages]

    # Measured on H100 at 6144 x 768 -> 3072: (128, 128, 64, 8 warps, 3 stages) 76 us, about cuBLAS's
    # 48 us matmul plus an elementwise relu^2 pass; deeper pipelines or wider tiles were slower (88-92 us).
    @triton.autotune(
        configs=_matmul_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3)]),
        key=["M", "N", "K"],
    )
    @triton.jit
    def _relu2_matmul_kernel(x_ptr, w_ptr, pre_ptr, post_ptr, M, N, K,
                             stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
        """pre = x @ w^T (M x N, inner K), post = relu(pre)^2; one (BLOCK_M, BLOCK_N) tile per program."""
        # Programs run in groups of GROUP_M row-tiles sweeping the columns together, so the
        # weight tiles they share are read from L2 instead of HBM.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        programs_per_group = GROUP_M * tiles_n
        first_tile_m = (pid // programs_per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
        tile_m = first_tile_m + (pid % programs_per_group) % group_rows
        tile_n = (pid % programs_per_group) // group_rows

        rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_tile_ptr = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_tile_ptr = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # w^T tile, (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_in = (k0 + ks) < K
            x_tile = tl.load(x_tile_ptr, mask=(rows[:, None] < M) & k_in[None, :], other=0.0)
            w_tile = tl.load(w_tile_ptr, mask=k_in[:, None] & (cols[None, :] < N), other=0.0)
            acc = tl.dot(x_tile, w_tile, acc)
            x_tile_ptr += BLOCK_K * stride_xk
            w_tile_ptr += BLOCK_K * stride_wk

        out_offsets = rows[:, None] * stride_om + cols[None, :] * stride_on
        out_mask = (rows[:, None] < M) & (cols[None, :] < N)
        relu = tl.maximum(acc, 0.0)
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(post_ptr + out_offsets, (relu * relu).to(post_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _relu2_epilogue(acc, pre_desc, out_desc, post_desc, off_m, off_n, BACKWARD: tl.constexpr,
                        POST_ONLY: tl.constexpr):
        dtype = out_desc.dtype
        if BACKWARD:
            saved = pre_desc.load([off_m, off_n]).to(tl.float32)
            relu = tl.sqrt(tl.maximum(saved, 0.0)) if POST_ONLY else tl.maximum(saved, 0.0)
            out_desc.store([off_m, off_n], (acc * 2.0 * relu).to(dtype))
        else:
            if not POST_ONLY:
                out_desc.store([off_m, off_n], acc.to(dtype))
            relu = tl.maximum(acc, 0.0)
            post_desc.store([off_m, off_n], (relu * relu).to(dtype))

    def _relu2_tma_config(bm, bn, bk, warps, stages, subtile, ctas=1, warp_specialize=False):
        def set_block_shapes(nargs):
            nargs["a_desc"].block_shape = [bm, bk]
            nargs["b_desc"].block_shape = [bn, bk]
            for name in ("pre_desc", "out_desc", "post_desc"):
                nargs[name].block_shape = [bm, bn // 2 if subtile else bn]
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SUBTILE": subtile,
                              "CTAS": ctas, "WARP_SPECIALIZE": warp_specialize}, num_warps=warps,
                             num_stages=stages, pre_hook=set_block_shapes)

    def _relu2_tma_configs():
        config = _relu2_tma_config
        # Measured on an H200 at 49,152 x 768 -> 3072 (modded_nanogpt/bench/mlp.py): forward 410 us with
        # (128, 256, 64, 8 warps, 4 stages, subtiled stores) against 586 us for the pointer kernel below and
        # 474 us for cuBLAS + Inductor's relu^2; backward 453 us with 3 stages (4 do not fit in shared
        # memory there) against 538 us for cuBLAS + the elementwise gradient kernel.
        return [config(128, 256, 64, 8, 4, True), config(128, 256, 64, 8, 3, True), config(128, 128, 64, 8, 4, False)]

    @triton.autotune(configs=_relu2_tma_configs(), key=["M", "N", "K", "BACKWARD", "POST_ONLY"])
    @triton.jit
    def _relu2_tma_persistent_kernel(a_desc, b_desc, pre_desc, out_desc, post_desc, M, N, K,
                                     BACKWARD: tl.constexpr, POST_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                     NUM_SMS: tl.constexpr, CTAS: tl.constexpr, SUBTILE: tl.constexpr,
                                     WARP_SPECIALIZE: tl.constexpr):
        """acc = a @ b^T (a (M, K), b (N, K), through TMA tiles), then the squared ReLU's epilogue.
        Forward (BACKWARD=0): out = pre = acc, post = relu(acc)^2. Backward: a is the gradient of the
        down projection's output, b the down weight, so acc is the gradient of post; out = acc * 2 relu(pre).
        One program per SM walks the tiles (the walk: tma_tiles), so the loads of a tile overlap the epilogue of
        the one before; SUBTILE stores the epilogue in two column halves (less shared memory for the stores); CTAS
        programs share an SM, so one's epilogue can run while another's matmul does. POST_ONLY: the forward stores
        no pre (only post), and the backward's saved tensor is post, with relu(pre) = sqrt(post)."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        programs_per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS * CTAS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            off_m, off_n = tile_offsets(tile, tiles_m, programs_per_group, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tile_matmul(a_desc, b_desc, off_m, off_n, k_tiles, BLOCK_M, BLOCK_N, BLOCK_K)
            if SUBTILE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _relu2_epilogue(left, pre_desc, out_desc, post_desc, off_m, off_n, BACKWARD, POST_ONLY)
                _relu2_epilogue(right, pre_desc, out_desc, post_desc, off_m, off_n + BLOCK_N // 2, BACKWARD,
                                POST_ONLY)
            else:
                _relu2_epilogue(acc, pre_desc, out_desc, post_desc, off_m, off_n, BACKWARD, POST_ONLY)

    @triton.jit
    def _relu2_grad_kernel(grad_post_ptr, saved_ptr, grad_pre_ptr, numel, FROM_POST: tl.constexpr,
                           BLOCK: tl.constexpr):
        """grad_post * 2 relu(pre), where saved is pre, or post = relu(pre)^2 (FROM_POST)."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        grad_post = tl.load(grad_post_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        saved = tl.maximum(tl.load(saved_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), 0.0)
        grad_pre = 2.0 * grad_post * (tl.sqrt(saved) if FROM_POST else saved)
        tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=in_range)
