"""Compile speedrun Triton kernels for Hopper (sm_90) or A100 (sm_80) without a GPU, and report the machine code.

    pip install triton==3.6.0   # into a scratch target: pip install --no-deps --target /tmp/t triton==3.6.0
    PYTHONPATH=/tmp/t python -m modded_nanogpt.bench.sm90_check [--arch=80]   # 80: A100 (sm_80) instead of sm_90

Without a GPU at hand: Triton's front end, its code generator and the ptxas it ships run on any x86-64
machine, so type errors and unsupported operations show here, and so do the registers, the stack (spills) and the
width of global loads and stores (16-byte `v4.b32` where the strides allow; the persistent TMA kernel, compiled for
sm_90 only, counts its bulk tensor copies instead), per kernel and constexpr variant. The
integer arguments named in `divisible` are marked multiples of 16 as Triton's launcher marks them at run time (the
trainer's strides are). Numbers, not timings: correctness against the references runs in Triton's interpreter
(TRITON_INTERPRET=1) or on a GPU (tests marked gpu).
"""

import argparse
import importlib.util
import itertools
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from modded_nanogpt.kernels import cross_entropy, embedding_rows, mlp, qkv

BF16, F32 = "*bf16", "*fp32"


def cases(arch: int = 90):
    """(name, kernel, argument types, integer args divisible by 16, constexpr variants, num_warps)."""
    fwd = dict(qkv_ptr=BF16, cos_ptr=F32, sin_ptr=F32, nds_ptr=BF16, ve_ptr=BF16, gate_ptr=BF16, q_ptr=BF16,
               k_ptr=BF16, v_ptr=BF16, T="i32", qkv_stride="i32", table_stride="i32", ve_stride="i32",
               gate_stride="i32", eps="fp32")
    bwd = dict(gq_ptr=BF16, gk_ptr=BF16, gv_ptr=BF16, qkv_ptr=BF16, cos_ptr=F32, sin_ptr=F32, nds_ptr=BF16,
               ve_ptr=BF16, gate_ptr=BF16, gqkv_ptr=BF16, gve_ptr=BF16, ggate_ptr=F32, T="i32", gq_t="i32",
               gk_t="i32", gv_t="i32", gq_h="i32", gk_h="i32", gv_h="i32", qkv_stride="i32", table_stride="i32",
               ve_stride="i32", gate_stride="i32", eps="fp32")
    flags = [dict(H=6, HALF=64, QK_NORM=n, KEY_OFFSET=o, HAS_VE=v, PAIRED=p, BLOCK_T=32)
             for n, o, v, p in itertools.product((True, False), repeat=4) if not (o and p)]
    yield ("attention_inputs forward", qkv._attention_inputs_kernel, fwd,
           ["qkv_stride", "table_stride", "ve_stride"], flags, 4)
    yield ("attention_inputs backward", qkv._attention_inputs_backward_kernel, bwd,
           ["gq_t", "gk_t", "gv_t", "gq_h", "gk_h", "gv_h", "qkv_stride", "table_stride", "ve_stride"], flags, 4)
    gather = dict(table_ptr=F32, index_ptr="*i64", out_ptr=BF16, T="i32", V="i32", D="i32")
    yield "gather_rows", embedding_rows._gather_rows_kernel, gather, ["D"], [dict(BLOCK_T=16, BLOCK_D=256)], 4
    scatter = dict(grad_ptr=F32, sorted_ptr="*i32", positions_ptr="*i64", rows_ptr=BF16, T="i32", V="i32", D="i32")
    yield ("scatter_add_rows", embedding_rows._scatter_add_rows_kernel, scatter, ["D"],
           [dict(CHUNK=32, BLOCK_D=256)], 2)
    # The kernels GPUs without TMA (A100) take, each autotuning config as a variant (num_warps/num_stages in it).
    # Unit strides are constants here, as Triton's launcher specializes an integer argument equal to 1.
    matmul = dict(x_ptr=BF16, w_ptr=BF16, pre_ptr=BF16, post_ptr=BF16, M="i32", N="i32", K="i32", stride_xm="i32",
                  stride_xk="i32", stride_wn="i32", stride_wk="i32", stride_om="i32", stride_on="i32")
    unit = dict(stride_xk=1, stride_wk=1, stride_on=1)
    yield ("relu2_matmul (pointer)", mlp._relu2_matmul_kernel, matmul, ["N", "K", "stride_xm", "stride_wn", "stride_om"],
           [dict(c.kwargs, **unit, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in mlp._relu2_matmul_kernel.configs], 4)
    if arch >= 90:  # the persistent TMA kernel Hopper takes, per autotuning config (its descriptors' block shapes)
        for c in mlp._relu2_tma_persistent_kernel.configs:
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            store = f"tensordesc<bf16[{bm},{bn // 2 if c.kwargs['SUBTILE'] else bn}]>"
            tma = dict(a_desc=f"tensordesc<bf16[{bm},{bk}]>", b_desc=f"tensordesc<bf16[{bn},{bk}]>", pre_desc=store,
                       out_desc=store, post_desc=store, M="i32", N="i32", K="i32")
            yield ("relu2 (persistent TMA)", mlp._relu2_tma_persistent_kernel, tma, ["N", "K"],
                   [dict(c.kwargs, BACKWARD=b, POST_ONLY=p, NUM_SMS=132, num_warps=c.num_warps,
                         num_stages=c.num_stages) for b, p in itertools.product((False, True), repeat=2)], 8)
    grad = dict(grad_post_ptr=BF16, saved_ptr=BF16, grad_pre_ptr=BF16, numel="i32")
    yield "relu2_grad", mlp._relu2_grad_kernel, grad, ["numel"], [dict(FROM_POST=f, BLOCK=4096) for f in (0, 1)], 8
    ce = dict(logits_ptr=BF16, stride_row="i32", targets_ptr="*i64", weights_ptr=F32, row_loss_ptr=F32,
              row_lse_ptr=F32, row_next_ptr=F32, N="i32", V="i32", cap="fp32", shift="fp32", inv_div="fp32",
              N_MTP="i32")
    ce_variants = [dict(c.kwargs, FAST=fast, num_warps=c.num_warps) for c in cross_entropy._ROW_CONFIGS
                   for fast in (0, 1)]
    yield "softcapped_ce forward", cross_entropy._softcapped_ce_forward_kernel, ce, ["stride_row", "V"], ce_variants, 4
    ce_bwd = dict(grad_rows_ptr=F32, grad_rows_stride="i32", logits_ptr=BF16, stride_row="i32", grad_ptr=BF16,
                  grad_stride_row="i32", targets_ptr="*i64", weights_ptr=F32, row_lse_ptr=F32, N="i32", V="i32",
                  cap="fp32", shift="fp32", inv_div="fp32", N_MTP="i32")
    yield ("softcapped_ce backward", cross_entropy._softcapped_ce_backward_kernel, ce_bwd,
           ["stride_row", "grad_stride_row", "V"], ce_variants, 4)
    if arch >= 90:  # the FP8 head's CE-gradient + e5m2 kernel (fp8 tensor cores only): the default tile and walks
        ce_fp8 = dict(grad_rows_ptr=F32, grad_rows_stride="i32", logits_ptr=BF16, stride_r="i32", stride_c="i32",
                      q_ptr="*fp8e5", q_t_ptr="*fp8e5", targets_ptr="*i64", weights_ptr=F32, N_MTP="i32",
                      row_lse_ptr=F32, N="i32", V="i32", cap="fp32", shift="fp32", inv_div="fp32", scale="fp32")
        yield ("softcapped_ce grad e5m2", cross_entropy._softcapped_ce_grad_fp8_kernel, ce_fp8, ["stride_r", "N", "V"],
               [dict(stride_c=1, BLOCK_R=r, BLOCK_C=c, COL_TILES=t, FAST=1, PREFETCH=p, num_warps=4)
                for r, c, t, p in ((32, 128, 16, 1), (64, 64, 1, 0), (64, 64, 4, 0), (64, 64, 16, 0), (64, 64, 4, 1),
                                   (64, 64, 16, 1))], 4)
        ce_tma = dict(grad_rows_ptr=F32, grad_rows_stride="i32", logits_desc="tensordesc<bf16[64,64]>",
                      q_desc="tensordesc<fp8e5[64,64]>", q_t_desc="tensordesc<fp8e5[64,64]>", targets_ptr="*i64",
                      weights_ptr=F32, N_MTP="i32", row_lse_ptr=F32, N="i32", V="i32", cap="fp32", shift="fp32",
                      inv_div="fp32", scale="fp32")
        yield ("softcapped_ce grad e5m2 (target logits)", cross_entropy._softcapped_ce_grad_fp8_targets_kernel, ce_fp8,
               ["stride_r", "N", "V"], [dict(stride_c=1, BLOCK=128, FAST=1, num_warps=4)], 4)
        yield ("softcapped_ce grad e5m2 (TMA)", cross_entropy._softcapped_ce_grad_fp8_tma_kernel, ce_tma, ["N", "V"],
               [dict(BLOCK_R=64, BLOCK_C=64, COL_TILES=t, FAST=1, STAGES=st, num_warps=4)
                for t, st in ((1, 1), (16, 1), (16, 2), (16, 3))], 4)


def compile_sm90(kernel, types, divisible, constexprs, num_warps, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuned kernel: its JIT function
    constexprs = dict(constexprs)
    options = {"num_warps": constexprs.pop("num_warps", num_warps)}
    if "num_stages" in constexprs:
        options["num_stages"] = constexprs.pop("num_stages")
    names = kernel.arg_names
    signature = {a: ("constexpr" if a in constexprs else types[a]) for a in names}
    marked = [a for a, t in types.items() if t.startswith("*")] + divisible
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(a),): [["tt.divisibility", 16]] for a in marked})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(cubin: bytes) -> str:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+", text))


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.sm90_check",
                                description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--arch", type=int, default=90, choices=(80, 90), help="90: Hopper (sm_90); 80: A100 (sm_80)")
    arch = p.parse_args(argv).arch
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("modded_nanogpt.bench.sm90_check: needs triton (pip install --no-deps --target /tmp/t "
                         "triton==3.6.0, then PYTHONPATH=/tmp/t); it is not importable here")
    failed = 0
    for name, kernel, types, divisible, variants, warps in cases(arch):
        for constexprs in variants:
            flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
            try:
                compiled = compile_sm90(kernel, types, divisible, constexprs, warps, arch)
            except Exception as e:  # noqa: BLE001 - report every variant, then fail
                failed += 1
                print(f"{name} [{flags}]: FAILED {type(e).__name__}: {str(e)[:600]}")
                continue
            ptx = compiled.asm["ptx"]
            loads = Counter(re.findall(r"ld\.global[.\w]*", ptx))
            # Not the "red.global" inside cp.async's "shared.global"
            stores = Counter(re.findall(r"(?<![\w.])(?:st|red|atom)\.global[.\w]*", ptx))
            # TMA kernels move their tiles with bulk tensor copies: global -> shared loads, shared -> global stores
            # (cp.async.bulk.tensor.2d.DESTINATION.SOURCE...)
            tma = Counter("store" if ".global.shared" in op else "load"
                          for op in re.findall(r"cp\.async\.bulk\.tensor\.[\w.:]+", ptx))
            print(f"{name} [{flags}]: {resource_usage(compiled.asm['cubin'])} | loads {dict(loads)} | "
                  f"stores {dict(stores)}" + (f" | TMA copies {dict(sorted(tma.items()))}" if tma else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
