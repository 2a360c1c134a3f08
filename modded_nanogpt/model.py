"""The speedrun's GPT: a 124M-class transformer with the modded-nanogpt architecture, every feature a flag.

Reads leaves first: norm -> rotary (half-truncated RoPE + YaRN) -> attention masks and backends ->
attention -> MLP -> the model. One packed sequence per forward: `inputs` is a 1-D stream of whole
documents, each starting with the BOS token (see data/loader.py); attention never crosses a document
boundary and looks back at most a sliding window of 128-token blocks (short or long per layer).

Parameter layout (banks, so the matrix optimizer can shard whole matrices across GPUs):
  attn_bank  (num_attn_layers, 4 * hd, dim): rows [q; k; v; o] of each attention layer, each stored
             (out features, in features) like nn.Linear's weight (hd = num_heads * head_dim = dim);
             viewed as (4 * num_attn_layers, hd, dim) by the optimizer, whose per-row normalization then
             runs over output features for all four.
  mlp_bank   (mlp_slots, 2, hidden, dim): [up; down^T] of each MLP; mlp_slots = num_layers rounded up
             so 2 * mlp_slots divides by 8 (the unused slots stay zero); viewed as (2 * mlp_slots, hidden, dim).
  lm_head_t  (dim, vocab): the output projection, stored transposed (x @ lm_head_t); while the
             embedding is tied, the token embedding reads its rows from lm_head_t.T.
  embed      (vocab, dim): the untied token embedding (a copy of lm_head_t.T from the untie step on).
  value_embeds (num_ve, vocab, dim), bigram_embed (buckets, dim), gates, x0_lambdas (num_layers,), and
             one vector of scalars (residual, attention gains, bigram mixing, smear, backout, skip).

Defaults are the published record #68 (modded-nanogpt, Feb 2026); each feature is a ModelConfig flag.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modded_nanogpt import kernels

BLOCK = 128  # attention windows are counted in blocks of this many tokens (FlexAttention's block size)
EVAL_HEAD_ROWS = 32768  # rows of logits per chunk of the eval-mode head (GPT.eval_loss)
GATE_INPUTS = 12  # gates read the first 12 channels of their (normalized) input


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    bos_id: int = 50256
    num_layers: int = 11
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_ratio: int = 4
    attention_skip_layers: list[int] = field(default_factory=lambda: [6])
    long_window_layers: list[int] = field(default_factory=lambda: [3, 10])
    paired_head_layers: list[int] = field(default_factory=lambda: [0, 2, 5, 9])
    value_embeds: bool = True
    value_embed_layers: list[int] = field(default_factory=lambda: [0, 1, 8, 9, 10])
    bigram_embeds: bool = True
    bigram_table_multiplier: int = 5
    skip_connections: bool = True
    skip_gate: bool = True  # the skip is gated per token by its x0 (sigmoid(W x0[:12])); False: one learned scalar
    skip_from: int = 3
    skip_to: int = 6
    smear: bool = True
    backout: bool = True
    backout_layer: int = 7
    key_offset: bool = True
    softcap: bool = True
    qk_norm: bool = True
    mlp_activation: str = "relu2"
    mlp_kernel: str = "triton"  # relu2 MLP: triton (kernels.relu2_mlp: TMA kernel, fused backward) | torch (Inductor)
    qkv_kernel: str = "triton"  # attention inputs: triton (kernels.attention_inputs, where supported) | torch (its reference, Inductor)
    fp8: bool = True
    attn_scale: float = 0.1  # softmax scale at the start; each YaRN rescale multiplies it (yarn_attn_factor)
    yarn_attn_factor: float = 0.2  # a long window grown by s multiplies the scale by yarn_attn_factor * ln(s) + 1
    sa_lambdas: bool = True  # learned gains on each layer's QKV (start 0.5) and output (start 1.0) weights
    residual_init: float = 1.1  # residual lambdas at the start (layer i's output weighs ~1.1^(layers after it))
    lm_head_init_std: float = 0.005  # the head (and the tied embedding) start at N(0, this)
    rope_min_wavelength_ratio: float = 1024.0  # lowest rotating frequency is 1/1024 rad per token
    attention_backend: str = "auto"  # auto | fa3 | fa4 | flex | sdpa
    fp8_x_scale: float = 100 / 448
    fp8_w_scale: float = 1.6 / 448
    fp8_grad_scale: float = 0.75 / 448  # for a loss of unit scale; divided by the forward's loss_divisor


# ---- rotary embedding: half the head dims rotate, YaRN rescales them when the window grows ----------


def rotary_frequencies(head_dim: int, min_ratio: float) -> torch.Tensor:
    """head_dim // 2 angular frequencies: head_dim // 4 from 1 down to 1/min_ratio rad/token, then zeros.

    Pairs (i, i + head_dim // 2) rotate together; the zero-frequency pairs (half of the head dims)
    are stationary: they carry content that no position shift changes (used by the key offset).
    """
    quarter = head_dim // 4
    rotating = (1.0 / min_ratio) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
    return torch.cat([rotating, torch.zeros(head_dim // 2 - quarter)])


def yarn_rescale(freqs: torch.Tensor, old_window: int, new_window: int, attn_factor: float = 0.2,
                 alpha: float = 1.0, beta: float = 32.0):
    """YaRN (Peng et al. 2023, arXiv:2309.00071) for a context grown from old_window to new_window tokens.

    Frequencies that turn many times within the old window (r > beta turns) are kept; those that turn
    less than alpha times are divided by the growth factor s (interpolated); a linear ramp in between.
    Returns the new frequencies and the attention-scale factor attn_factor * ln(s) + 1 (s > 1; the
    speedrun's 0.2, where the YaRN paper's temperature uses 0.1).
    """
    s = new_window / old_window
    if s <= 1:
        return freqs.clone(), 1.0
    turns = old_window * freqs / (2 * math.pi)
    keep = ((turns - alpha) / (beta - alpha)).clamp(0, 1)
    return freqs * (keep + (1 - keep) / s), attn_factor * math.log(s) + 1


@torch.library.custom_op("modded_nanogpt::rotary_table", mutates_args=())
def rotary_table(freqs: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (length, len(freqs)) each, for positions 0..length-1.

    An opaque op so that a compiled graph stores the table once per forward: as plain tensor code,
    Inductor inlined the arange, the product and both transcendentals into every kernel that reads
    them (the q/k norm + rotary of each attention layer, forward and backward)."""
    angles = torch.arange(length, device=freqs.device, dtype=torch.float32)[:, None] * freqs[None, :].float()
    return angles.cos(), angles.sin()


@rotary_table.register_fake
def _(freqs, length):
    return tuple(freqs.new_empty((length, freqs.numel()), dtype=torch.float32) for _ in range(2))


# ---- attention masks (documents + causal + sliding window) and the three backends ------------------


def allowed(q_pos, k_pos, doc, window):
    """Whether query position q may attend to key position k: causal, the same document (doc holds each
    position's document id) and at most `window` positions back, as FlashAttention's window_size=(window, 0)
    counts (window + 1 keys with the query's own). Paired-head layers count positions of their doubled stream,
    so the same window covers half as many tokens there."""
    return (q_pos >= k_pos) & (doc[q_pos] == doc[k_pos]) & ((q_pos - k_pos) <= window)


def dense_mask(doc: torch.Tensor, window) -> torch.Tensor:
    """The (P, P) boolean mask of `allowed`: the plain reference the block masks are checked against."""
    pos = torch.arange(doc.numel(), device=doc.device)
    return allowed(pos[:, None], pos[None, :], doc, window)


def block_classes(doc: torch.Tensor, window):
    """Per (query block, key block) of BLOCK positions: (partial, full) boolean (nb, nb) matrices.

    full: every pair in the two blocks is allowed (no mask needed); partial: some pairs are. Document
    ids are non-decreasing along the stream, so two blocks share a document iff their id ranges meet.
    """
    P = doc.numel()
    nb = P // BLOCK
    starts = torch.arange(nb, device=doc.device) * BLOCK
    ends = starts + BLOCK - 1
    doc_first, doc_last = doc[starts], doc[ends]
    q, k = torch.arange(nb, device=doc.device)[:, None], torch.arange(nb, device=doc.device)[None, :]
    any_pair = (k <= q) & ((starts[q] - ends[k]) <= window) & (doc_first[q] <= doc_last[k])
    full = (k < q) & ((ends[q] - starts[k]) <= window) & (doc_first[k] == doc_last[q])
    return any_pair & ~full, full


@torch.library.custom_op("modded_nanogpt::ordered_lists", mutates_args=())
def _ordered_lists_op(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The stable descending argsort of a 0/1 row, from prefix sums: a True column's place is the number
    # of True columns before it; a False column's, the row's count plus the False columns before it. One
    # scatter puts each column at its place (a few elementwise kernels, cheaper than a segmented sort).
    ones = blocks.to(torch.int32, memory_format=torch.contiguous_format)  # outputs as the fake's: contiguous
    counts = ones.sum(dim=-1, dtype=torch.int32)
    place = torch.where(blocks, torch.cumsum(ones, dim=-1) - 1, counts[..., None] + torch.cumsum(1 - ones, dim=-1) - 1)
    columns = torch.arange(ones.shape[-1], device=ones.device, dtype=torch.int32).expand_as(ones)
    return counts, torch.empty_like(ones).scatter_(-1, place.long(), columns)


@_ordered_lists_op.register_fake
def _(blocks):
    return blocks.new_empty(blocks.shape[:-1], dtype=torch.int32), blocks.new_empty(blocks.shape, dtype=torch.int32)


def ordered_lists(blocks: torch.Tensor):
    """Row by row of a boolean (n, n) matrix: how many True, and the column order with the True columns
    first, then the others, each ascending (what a stable descending argsort gives), shaped (1, 1, n) and
    (1, 1, n, n) as BlockMask takes them. An opaque op that runs eagerly inside a compiled graph: traced,
    an argsort became Triton sorting networks whose compile time grows steeply with n (at the speedrun's
    128-768 blocks per row they took ~2 minutes of the first compile), and a traced scatter hit an
    Inductor code-generation error (torch 2.11)."""
    counts, order = _ordered_lists_op(blocks)
    return counts[None, None].contiguous(), order[None, None].contiguous()


def flex_block_mask(doc: torch.Tensor, window):
    """A FlexAttention BlockMask built directly from block classes (no dense mask is materialized).
    window: positions, an int or a 0-d tensor (a tensor lets a compiled graph serve every window). The
    backward's per-key-block lists come from the transposed classes, so no sort is traced."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = block_classes(doc, window)
    num, idx = ordered_lists(partial)
    full_num, full_idx = ordered_lists(full)
    q_num, q_idx = ordered_lists(partial.transpose(0, 1))
    full_q_num, full_q_idx = ordered_lists(full.transpose(0, 1))

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx, doc, window)

    length = doc.numel()
    return BlockMask(seq_lengths=(length, length), kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=full_num,
                     full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_idx, BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=mask_mod)


def attention_mask(doc: torch.Tensor, window, backend: str):
    """What `attend` takes as its mask: a BlockMask (flex), the dense boolean mask (sdpa), None (fa3, fa4,
    whose windows and documents are arguments of the kernel). doc: each position's document id."""
    if backend == "flex":
        return flex_block_mask(doc, window)
    if backend == "sdpa":
        return dense_mask(doc, window)
    return None


# FlashAttention 3 from the Hugging Face kernel hub (the `kernels` package downloads a build for this
# torch/CUDA), as the published speedrun loads it; MODDED_FA3_HUB_KERNEL names another hub repository.
FA3_HUB_KERNEL = "kernels-community/flash-attn3"
ATTENTION_BACKENDS = ("auto", "fa3", "fa4", "flex", "sdpa")
FLASH_BACKENDS = ("fa3", "fa4")  # windows and documents are kernel arguments (windows, cu_seqlens), not a mask


@functools.lru_cache(maxsize=1)
def fa3_interface():
    """(module with flash_attn_varlen_func, where it came from) for FlashAttention 3, or (None, why not).

    A built `flash_attn_interface` first (slurm/modded/build_flash_attn.sh), then the hub kernel through
    the `kernels` package where that is installed (it needs the hub or its local cache)."""
    try:
        import flash_attn_interface

        return flash_attn_interface, "flash_attn_interface"
    except ImportError:
        pass
    try:
        from kernels import get_kernel
    except ImportError:
        return None, "neither flash_attn_interface nor the kernels package is importable"
    repo = os.environ.get("MODDED_FA3_HUB_KERNEL", FA3_HUB_KERNEL)
    try:
        module = get_kernel(repo)
    except Exception as e:  # no hub access, no build for this torch/CUDA: report and fall back
        return None, f"kernels.get_kernel({repo!r}) failed: {type(e).__name__}: {e}"
    module = getattr(module, "flash_attn_interface", module)  # some hub builds nest the interface
    if not hasattr(module, "flash_attn_varlen_func"):
        return None, f"the hub kernel {repo} has no flash_attn_varlen_func"
    return module, f"kernels hub {repo}"


def fa3_available() -> bool:
    return fa3_interface()[0] is not None


def fa4_import_error() -> str | None:
    """Why FlashAttention 4's CuTe kernels (pip install flash-attn-4) cannot be imported, or None."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401
    except Exception as e:  # ImportError, or the CuTe DSL failing to load its libraries
        return f"{type(e).__name__}: {e}"
    return None


FA4_ARCHS = (9, 10)  # Hopper (sm90) and Blackwell (sm100): FA4's forward and backward kernels


def cuda_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def select_attention_backend(requested: str, device: torch.device) -> str:
    """auto: FlashAttention 3 where it loads (Hopper), else FlashAttention 4 on sm90/sm100 where flash-attn-4
    is installed, else FlexAttention on CUDA, SDPA on CPU. An explicit backend that cannot run is an error
    that says why."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested in ("fa3", "fa4", "flex") and device.type != "cuda":
        raise ValueError(f"attention_backend={requested} needs CUDA; use sdpa (or auto) on CPU")
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa"
        if fa3_available():
            return "fa3"
        if cuda_major(device) in FA4_ARCHS and fa4_import_error() is None:
            return "fa4"
        return "flex"
    if requested == "fa3" and not fa3_available():
        raise ValueError(f"attention_backend=fa3 but FlashAttention 3 cannot be loaded ({fa3_interface()[1]}); "
                         "build it with slurm/modded/build_flash_attn.sh or install the kernels package")
    if requested == "fa4":
        major = cuda_major(device)
        if major not in FA4_ARCHS:
            raise ValueError(f"attention_backend=fa4 needs a Hopper (sm90) or Blackwell (sm100) GPU, this one is "
                             f"sm{major}x; use flex (or auto)")
        why = fa4_import_error()
        if why is not None:
            raise ValueError(f"attention_backend=fa4 but flash_attn.cute does not import ({why}); install it with "
                             "ATTENTION=fa4 bash setup_env.sh (or pip install flash-attn-4)")
    return requested


def describe_attention_backend(backend: str) -> str:
    """The backend and where its kernels come from, for the log and provenance."""
    if backend == "fa3":
        return f"fa3 ({fa3_interface()[1]})"
    if backend == "fa4":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"fa4 (flash-attn-4 {version('flash-attn-4')})"
        except PackageNotFoundError:
            return "fa4 (flash_attn.cute)"
    return backend


# FA4's kernels compile at their first call. fa4_precompile makes that call in a child process while
# torch.compile builds the first graph (whose own first FA4 call comes after the graph), and holds this lock
# until the child is done; the ops hold it while they launch, so the model's first call waits for the child's
# kernels (on disk) instead of compiling them a second time.
FA4_LOCK = threading.Lock()


# FlashAttention 4 as a custom op: torch.compile(fullgraph=True) cannot trace the CuTe DSL launcher, so the
# compiled graph holds one opaque node per call, with a shape function and its own backward (FA4's).
# The window and the YaRN temperature come in as 0-d CPU tensors, read on the host when the op runs: a
# compiled graph takes them as inputs instead of specializing on their values, so one graph serves every
# window and temperature of a shape (as FlexAttention's tensor windows do), and reading them waits for nothing.
@torch.library.custom_op("modded_nanogpt::fa4_varlen", mutates_args=())
def _fa4_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   scale: float, temperature: torch.Tensor, window: torch.Tensor,
                   window_unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (P, H, D), lse (H, P) fp32) of causal attention within the documents of cu_seqlens, scores
    q.k * scale * temperature, each query seeing keys at most window * window_unit positions back."""
    from flash_attn.cute.interface import _flash_attn_fwd

    with FA4_LOCK:
        out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                       max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                       softmax_scale=scale * float(temperature), causal=True,
                                       window_size_left=int(window) * window_unit, window_size_right=0, return_lse=True)
    return out, lse


@_fa4_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, temperature, window, window_unit):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((q.shape[1], q.shape[0]),
                                                                                  dtype=torch.float32)


@torch.library.custom_op("modded_nanogpt::fa4_varlen_backward", mutates_args=())
def _fa4_varlen_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                            temperature: torch.Tensor, window: torch.Tensor,
                            window_unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    with FA4_LOCK:
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, scale * float(temperature), True, 0.0,
                                     window_size_left=int(window) * window_unit, window_size_right=0,
                                     cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                     max_seqlen_k=max_seqlen)[:3]
    return dq, dk, dv


@_fa4_varlen_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, temperature, window, window_unit):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, temperature, window, window_unit = inputs
    # The host scalars too: the model changes them in place only between steps, never between a forward and
    # its backward (autograd's version check would refuse a backward that saw another value).
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, temperature, window)
    ctx.args = (max_seqlen, scale)
    ctx.window_unit = window_unit


def _fa4_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, temperature, window = ctx.saved_tensors
    dq, dk, dv = torch.ops.modded_nanogpt.fa4_varlen_backward(dout, q, k, v, out, lse, cu_seqlens, *ctx.args,
                                                              temperature, window, ctx.window_unit)
    return dq, dk, dv, None, None, None, None, None, None


_fa4_varlen_op.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def fa4_precompile_child(spec: str) -> None:
    """The precompile process's body (`python -c ...` with the JSON spec of fa4_precompile_command): one forward
    and one backward through the model's FA4 ops on the parent's device, whose kernels FA4's disk cache then
    holds."""
    a = json.loads(spec)
    device = torch.device("cuda", a["device"]) if a["device"] is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cu_seqlens = torch.tensor(a["cu_seqlens"], dtype=torch.int32, device=device)
    max_seqlen, num_heads, head_dim = a["max_seqlen"], a["num_heads"], a["head_dim"]
    scale, window_unit = a["scale"], a["window_unit"]
    tokens = int(cu_seqlens[-1])
    q, k, v = (torch.randn(tokens, num_heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    temperature, window = host_scalar(1.0, torch.float32), host_scalar(1, torch.int64)
    out, lse = torch.ops.modded_nanogpt.fa4_varlen(q, k, v, cu_seqlens, max_seqlen, scale, temperature, window,
                                                   window_unit)
    torch.ops.modded_nanogpt.fa4_varlen_backward(torch.randn_like(out), q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                 scale, temperature, window, window_unit)


def fa4_precompile_command(cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, head_dim: int, scale: float,
                           window_unit: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a precompile process: this interpreter, this process's import path
    (PYTHONPATH), its environment otherwise (FA4's disk cache settings and CUDA_VISIBLE_DEVICES included)."""
    spec = json.dumps({"cu_seqlens": cu_seqlens.tolist(), "device": cu_seqlens.device.index if cu_seqlens.is_cuda
                       else None, "max_seqlen": max_seqlen, "num_heads": num_heads, "head_dim": head_dim,
                       "scale": scale, "window_unit": window_unit})
    code = "import sys; from modded_nanogpt.model import fa4_precompile_child; fa4_precompile_child(sys.argv[1])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    return [sys.executable, "-c", code, spec], env


def fa4_precompile(cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, head_dim: int, scale: float,
                   window_unit: int) -> threading.Thread:
    """Start a thread that compiles FA4's training kernels in a child process: one forward and one backward
    through the model's ops, on random bf16 (P, num_heads, head_dim) inputs, P = cu_seqlens[-1]. cu_seqlens
    must be padded as the trainer pads them: their length picks the kernels' variant; the heads, the window and
    the scale do not. A process, not a thread of this one: FA4's compile is mostly Python and would take turns
    with torch.compile's under one interpreter lock. Its kernels reach this process through FA4's disk cache,
    which must be on (FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 before flash_attn.cute is imported); the thread
    holds FA4_LOCK until the child exits, so this process's first FA4 call waits for it and loads them.
    Join the thread before timing anything. Its `seconds` is how long the child took and its `error` why it
    failed (None if it did not): a failure only leaves the compiling to the model's first call."""
    command, env = fa4_precompile_command(cu_seqlens, max_seqlen, num_heads, head_dim, scale, window_unit)

    def work():
        import subprocess

        t0 = time.perf_counter()
        try:
            with FA4_LOCK:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                raise RuntimeError(f"the precompile process failed: {last}")
        except Exception as e:  # noqa: BLE001 - reported by the caller; the model's first call compiles instead
            thread.error = f"{type(e).__name__}: {e}"
        thread.seconds = time.perf_counter() - t0

    thread = threading.Thread(target=work, name="fa4-precompile", daemon=True)
    thread.error, thread.seconds = None, None
    thread.start()
    return thread


def host_scalar(value, dtype) -> torch.Tensor:
    """value as a 0-d CPU tensor (unchanged if it is one already): how FA4 takes its window and temperature."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.ndim:
            raise ValueError(f"attention_backend=fa4 takes its window and temperature as ints/floats or 0-d CPU "
                             f"tensors, got a tensor of shape {tuple(value.shape)} on {value.device}")
        return value
    return torch.tensor(value, dtype=dtype)


def attend(q, k, v, mask, cu_seqlens, window, shift: int, scale: float, backend: str, temperature=None,
           max_seqlen: int | None = None, window_unit: int = 1):
    """q, k, v: (P, H, D) for P positions; mask from attention_mask. window (keys at most window * window_unit
    positions back), shift (1 when each token has two positions) and max_seqlen (the longest document in tokens,
    None for unknown) are read by FA3/FA4 only; FA4 also takes window as a 0-d CPU tensor. Scores are q.k *
    scale, times temperature where given: a 0-d tensor (flex: on the device, fa4: on the CPU). Returns (P, H, D)."""
    if backend in FLASH_BACKENDS:
        cu = (cu_seqlens << shift).to(torch.int32)
        longest = q.size(0) if max_seqlen is None else min(q.size(0), max_seqlen << shift)
        if backend == "fa4":
            return torch.ops.modded_nanogpt.fa4_varlen(q, k, v, cu, longest, float(scale),
                                                       host_scalar(1.0 if temperature is None else temperature,
                                                                   torch.float32),
                                                       host_scalar(window, torch.int64), window_unit)[0]
        if temperature is not None:
            raise ValueError("attention_backend=fa3 takes the temperature in its scale")
        out = fa3_interface()[0].flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale,
                                                        causal=True, window_size=(int(window) * window_unit, 0))
        return out[0] if isinstance(out, tuple) else out
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, P, D)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if q.size(0) % BLOCK:
            raise ValueError(f"flex attention needs a sequence that is a multiple of {BLOCK} positions, got {q.size(0)}")
        score_mod = None
        if temperature is not None:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score * temperature

        out = flex_attention(qt, kt, vt, score_mod=score_mod, block_mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


# ---- the model --------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        validate_config(c)
        dim, hd = c.model_dim, c.num_heads * c.head_dim
        self.attn_layers = [i for i in range(c.num_layers) if i not in c.attention_skip_layers]
        self.attn_slot = {layer: slot for slot, layer in enumerate(self.attn_layers)}
        self.ve_slot = {layer: slot for slot, layer in enumerate(c.value_embed_layers)} if c.value_embeds else {}
        self.hidden = c.mlp_ratio * dim
        mlp_slots = -(-c.num_layers // 4) * 4  # 2 * slots divisible by 8 (one matrix per GPU shard)

        self.attn_bank = nn.Parameter(torch.empty(len(self.attn_layers), 4 * hd, dim))
        self.mlp_bank = nn.Parameter(torch.zeros(mlp_slots, 2, self.hidden, dim))
        self.lm_head_t = nn.Parameter(torch.empty(dim, c.vocab_size))
        self.embed = nn.Parameter(torch.empty(c.vocab_size, dim))
        self.attn_gate = nn.Parameter(torch.zeros(len(self.attn_layers), c.num_heads, GATE_INPUTS))
        if c.value_embeds:
            self.value_embeds = nn.Parameter(torch.empty(len(c.value_embed_layers), c.vocab_size, dim))
            self.ve_gate = nn.Parameter(torch.zeros(len(c.value_embed_layers), c.num_heads, GATE_INPUTS))
        if c.bigram_embeds:
            self.bigram_embed = nn.Parameter(torch.zeros(c.bigram_table_multiplier * c.vocab_size, dim))
        if c.smear:
            self.smear_gate = nn.Parameter(torch.zeros(1, GATE_INPUTS))
        if c.skip_connections and c.skip_gate:
            self.skip_gate = nn.Parameter(torch.zeros(1, GATE_INPUTS))
        # scalars: per layer the residual weight, the attention gains (QKV, O) and the bigram mixing weight,
        # then smear, backout and the skip's logit. The x0 mixing weights are a parameter of their own (x0_lambdas):
        # the published optimizer gives them other Adam betas.
        L = c.num_layers
        self.scalar_index = {"residual": slice(0, L), "sa_qkv": slice(L, 2 * L), "sa_o": slice(2 * L, 3 * L),
                             "bigram": slice(3 * L, 4 * L), "smear": 4 * L, "backout": 4 * L + 1, "skip": 4 * L + 2}
        self.scalars = nn.Parameter(torch.empty(4 * L + 3))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.register_buffer("rotary_freqs", rotary_frequencies(c.head_dim, c.rope_min_wavelength_ratio))
        self.register_buffer("attn_temperature", torch.ones(()))
        self.register_buffer("yarn_window", torch.zeros((), dtype=torch.int64))  # long window the freqs fit
        self.register_buffer("tied", torch.ones((), dtype=torch.bool))
        self.attention_backend = "sdpa"
        # The longest document (tokens) a training batch can hold (the loader clips to seq_len); FA3/FA4 size
        # their grids by it. None: unknown (validation does not clip), the whole sequence bounds it.
        self.max_doc_tokens: int | None = None
        self.embedding_grads = "dense"  # the trainer's --embedding_grads: "scatter" passes gather_rows' rows
        # FA4 reads the temperature on the host from this CPU tensor (not a buffer: it stays on the CPU), changed
        # in place with attn_temperature: a graph input, so a compiled graph does not specialize on its value.
        self.host_temperature = torch.ones((), dtype=torch.float32)
        self.reset_parameters()
        self._mirror_buffers()

    def _mirror_buffers(self):
        # Python copies of the schedule state: the forward branches on them (torch.compile specializes on
        # them, a recompile per stage, done in the warmup, instead of breaking the graph on .item()), and the
        # per-step hooks read them instead of the buffers. Reading a CUDA buffer waits for the GPU: called
        # at every step, that drained the GPU before each step was queued. Only init and loads read the buffers.
        self.is_tied = bool(self.tied)
        self.temperature = float(self.attn_temperature)
        self.host_temperature.fill_(self.temperature)
        self.yarn_tokens = int(self.yarn_window)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._mirror_buffers()
        return result

    @torch.no_grad()
    def reset_parameters(self):
        """The published initialization: Q, K, V and O uniform with std 0.5 / sqrt(dim); MLP up projections the
        same, down projections zero; head (and the tied embedding) N(0, lm_head_init_std); value and bigram
        embeddings, gates and x0 lambdas zero; residual lambdas residual_init; attention gains 0.5 (QKV) and
        1.0 (O); bigram mixing 0.1; smear 0, backout 0.5, skip logit -1.5 (sigmoid 0.18)."""
        c = self.config
        bound = math.sqrt(3) * 0.5 * c.model_dim**-0.5  # uniform with std 0.5 / sqrt(dim)
        self.attn_bank.uniform_(-bound, bound)
        self.mlp_bank.zero_()
        self.mlp_bank[: c.num_layers, 0].uniform_(-bound, bound)  # up projections; down ones stay zero
        self.lm_head_t.normal_(0, c.lm_head_init_std)
        self.embed.copy_(self.lm_head_t.T)
        for name in ("value_embeds", "bigram_embed", "attn_gate", "ve_gate", "smear_gate", "skip_gate"):
            if hasattr(self, name):
                getattr(self, name).zero_()
        L, i = c.num_layers, self.scalar_index
        values = torch.empty(4 * L + 3)
        values[i["residual"]], values[i["sa_qkv"]], values[i["sa_o"]], values[i["bigram"]] = c.residual_init, 0.5, 1.0, 0.1
        values[i["smear"]], values[i["backout"]], values[i["skip"]] = 0.0, 0.5, -1.5
        self.scalars.copy_(values)
        self.x0_lambdas.zero_()

    # --- schedule hooks (called by the trainer between steps) -------------------------------------

    @torch.no_grad()
    def set_long_window(self, long_window_blocks: int):
        """Rescale the rotary frequencies (YaRN) when the long window grows beyond what they fit. Called
        every step: when nothing changes it touches no tensor (see _mirror_buffers)."""
        tokens, old = long_window_blocks * BLOCK, self.yarn_tokens
        if old and tokens <= old:
            return
        if old:
            freqs, temperature = yarn_rescale(self.rotary_freqs, old, tokens, self.config.yarn_attn_factor)
            self.rotary_freqs.copy_(freqs)
            self.attn_temperature.mul_(temperature)
            self.temperature = float(self.attn_temperature)  # a wait, but only when the window grows
            self.host_temperature.fill_(self.temperature)
        self.yarn_window.fill_(tokens)
        self.yarn_tokens = tokens

    @torch.no_grad()
    def untie(self):
        """From now on the token embedding is its own parameter, starting from the head's weights."""
        self.embed.copy_(self.lm_head_t.T)
        self.tied.fill_(False)
        self.is_tied = False

    # --- forward ------------------------------------------------------------------------------------

    def bigram_index(self, inputs: torch.Tensor) -> torch.Tensor:
        """Hash of (previous token, token) into the table; the first token of a document gets the
        reserved last bucket (it has no previous token of its own)."""
        buckets = self.bigram_embed.size(0) - 1
        cur = inputs.to(torch.int64)
        prev = torch.cat([cur.new_zeros(1), cur[:-1]])
        h = torch.bitwise_xor(cur * 1000003, prev * 69069) % buckets
        return torch.where(inputs == self.config.bos_id, torch.full_like(h, buckets), h)

    # --- embedding rows gathered outside the compiled graph (sparse gradients) ------------------------

    @torch.no_grad()
    def gather_rows(self, inputs: torch.Tensor) -> tuple[dict, list]:
        """The embedding-table rows one forward reads, gathered here as leaf tensors that require grad,
        for `forward(..., rows=...)`; then `add_row_grads(scatter)` after the backward.

        Why: a table's autograd gradient is dense. With accumulation each micro-step wrote the whole
        (vocab or buckets, dim) gradient of every table (425M floats for the token, value and bigram
        tables: zero-fill, scatter, then an add into .grad) though a forward reads only its tokens' rows.
        Here the compiled graph's gradient is per row, and a scatter-add puts it into .grad.
        The value and bigram rows are in the forward's compute dtype (bf16 on GPU): the forward casts them to
        it anyway, and the gradient of that cast is the bf16 gradient cast up, so the math is the same and the
        gather, the graph's row gradients and the scatter move fewer bytes (kernels.gather_rows says more).
        Returns (rows, scatter): rows {"token", "value", "bigram"} -> leaf (None when off); scatter [(table,
        index, sorted index or None, leaf)] for add_row_grads.

        While tied the token rows are the head's (read from `embed`, which holds a copy of the head while tied,
        see tied_embedding) and their gradient goes to embed.grad, which tie_gradients() adds to the head's.
        So the compiled graph is the same tied and untied: one graph, where reading the head inside the graph
        made the tie a second one (~25 s more of compile per shape that meets both).
        """
        c = self.config
        dtype = torch.bfloat16 if inputs.is_cuda else torch.float32
        idx = inputs.to(torch.int64)
        rows, scatter = {"token": None, "value": None, "bigram": None}, []
        # The token and value tables share one sort of the index (the GPU's scatter walks it in order); the
        # bigram index is sorted inside its scatter.
        order = kernels.sort_index(idx) if kernels.use_triton(idx) else None
        # float32, unlike the others: with bf16 token rows Inductor fused the first layer's backward (embedding
        # norm, smear, x0 mixing) into one kernel of 1.9 ms per micro-step instead of 0.44 (H200, ~9 ms/step).
        rows["token"] = kernels.gather_rows(self.tied_embedding(), idx, torch.float32)
        scatter.append((self.embed, idx, order, "token"))
        if c.value_embeds:
            rows["value"] = kernels.gather_rows(self.value_embeds, idx, dtype)
            scatter.append((self.value_embeds, idx, order, "value"))
        if c.bigram_embeds:
            bigram_idx = self.bigram_index(inputs)
            rows["bigram"] = kernels.gather_rows(self.bigram_embed, bigram_idx, dtype)
            scatter.append((self.bigram_embed, bigram_idx, None, "bigram"))
        for leaf in rows.values():
            if leaf is not None:
                leaf.requires_grad_()
        return rows, [(table, index, order, rows[name]) for table, index, order, name in scatter]

    @torch.no_grad()
    def tied_embedding(self) -> torch.Tensor:
        """The token embedding table the rows come from: `embed`, which while tied is first overwritten with
        the head (lm_head_t.T; while tied its own values are otherwise unused). A copy at every call, so it is
        never stale: the fused Adam writes the head through a raw pointer, which no version counter sees
        (one 50304 x 768 float copy per micro-step, ~0.07 ms on an H200)."""
        if self.is_tied:
            self.embed.copy_(self.lm_head_t.T)
        return self.embed

    @torch.no_grad()
    def tie_gradients(self) -> None:
        """While tied: add the token rows' gradient (gathered rows put it in embed.grad) to the head's, which
        is the tied weight's gradient, and drop embed.grad. Called after the backward passes of a step, before
        the optimizer; a no-op untied or when the graph read the head itself (dense embedding gradients)."""
        if not self.is_tied or self.embed.grad is None:
            return
        if self.lm_head_t.grad is None:
            self.lm_head_t.grad = self.embed.grad.T.contiguous()
        else:
            self.lm_head_t.grad.add_(self.embed.grad.T)
        self.embed.grad = None

    @torch.no_grad()
    def add_row_grads(self, scatter: list) -> None:
        """After the backward of a forward given gather_rows' rows: add each row's gradient to its table's
        .grad (created as zeros when absent), as autograd's dense gradient would have."""
        for table, index, order, leaf in scatter:
            if leaf.grad is None:
                continue
            if table.grad is None:
                table.grad = torch.zeros_like(table)
            kernels.scatter_add_rows(table.grad, index, leaf.grad, order)

    def attention(self, x, layer, ve, ctx, gains):
        c = self.config
        T, H, D = x.size(0), c.num_heads, c.head_dim
        hd = H * D
        w = self.attn_bank[self.attn_slot[layer]].to(x.dtype)
        w_qkv, w_o = w[: 3 * hd], w[3 * hd:]
        if gains is not None:  # sa_lambdas: learned gains on the weights (published: on the weights, not outputs)
            w_qkv, w_o = gains[0] * w_qkv, gains[1] * w_o
        long = layer in c.long_window_layers
        paired = layer in c.paired_head_layers
        gate = None
        if ve is not None:
            gate = 2 * torch.sigmoid(x[:, :GATE_INPUTS] @ self.ve_gate[self.ve_slot[layer]].to(x.dtype).T)
        cos, sin = (ctx["paired_cos"], ctx["paired_sin"]) if paired else (ctx["cos"], ctx["sin"])
        inputs = (x, w_qkv, cos, sin, ctx["not_doc_start"], ve, gate, H, c.qk_norm,
                  c.key_offset and long and not paired, paired)
        if c.qkv_kernel == "triton" and kernels.attention_inputs_supported(x, D):
            q, k, v = kernels.attention_inputs(*inputs)
        else:
            q, k, v = kernels.attention_inputs_reference(*inputs)
        window = ctx["long_window"] if long else ctx["short_window"]
        mask = ctx["masks"].get((long, paired))
        if self.attention_backend == "flex":
            # The YaRN temperature as a tensor (a score_mod): a compiled graph outlives its changes.
            scale, temperature = c.attn_scale, self.attn_temperature
        elif self.attention_backend == "fa4":
            scale, temperature = c.attn_scale, self.host_temperature  # the same, on the host (see _fa4_varlen_op)
        else:
            scale, temperature = c.attn_scale * self.temperature, None
        if paired:
            # Paired heads: heads i and i + H/2 of a token become two consecutive positions of one head of
            # a sequence twice as long, so each head also sees its partner head's keys at earlier tokens.
            q, k, v = (t.reshape(2 * T, H // 2, D) for t in (q, k, v))
            y = attend(q, k, v, mask, ctx["cu_seqlens"], window, 1, scale, self.attention_backend, temperature,
                       ctx["max_seqlen"], window_unit=BLOCK)
            y = y.reshape(T, H, D)
        else:
            y = attend(q, k, v, mask, ctx["cu_seqlens"], window, 0, scale, self.attention_backend, temperature,
                       ctx["max_seqlen"], window_unit=BLOCK)
        y = y * torch.sigmoid(x[:, :GATE_INPUTS] @ self.attn_gate[self.attn_slot[layer]].to(x.dtype).T)[..., None]
        return y.reshape(T, hd) @ w_o.T

    def mlp(self, x, layer):
        up, down = self.mlp_bank[layer].to(x.dtype).unbind(0)
        if self.config.mlp_activation == "relu2" and self.config.mlp_kernel == "triton":
            return kernels.relu2_mlp(x, up, down)
        if self.config.mlp_activation == "relu2":
            h = F.relu(x @ up.T).square()
        else:
            h = F.gelu(x @ up.T, approximate="tanh")
        return h @ down

    def attention_masks(self, doc, short_tokens, long_tokens) -> dict:
        """{(long window?, paired heads?): mask} for the kinds of attention layer the model has, built
        once per forward (not once per layer: four kinds serve the ten layers of the default model)."""
        c = self.config
        masks = {}
        for layer in self.attn_layers:
            long, paired = layer in c.long_window_layers, layer in c.paired_head_layers
            if (long, paired) not in masks:
                positions_doc = doc.repeat_interleave(2) if paired else doc
                masks[long, paired] = attention_mask(positions_doc, long_tokens if long else short_tokens,
                                                     self.attention_backend)
        return masks

    def forward(self, inputs, targets, short_window, long_window, mtp_weights=(1.0,),
                loss_divisor: float = 1.0, cu_seqlens=None, rows=None, with_next_token: bool = False):
        """Loss of one packed sequence: sum over positions t and k of mtp_weights[k] * CE(logits_t,
        targets[t + k]), divided by loss_divisor. Windows in blocks of 128 tokens: ints, or 0-d integer
        tensors (on the device for flex and sdpa, on the CPU for fa4), which a compiled graph takes as inputs
        instead of specializing on them (FA3 takes ints).
        rows: the embedding rows of these inputs from gather_rows (else the tables are read here).
        In eval mode (model.eval(), validation) the head runs in the compute dtype, without fp8, as the
        published validation does. with_next_token=True returns (loss, next_token_loss): the second is the
        sum of the plain next-token terms CE(logits_t, targets[t]) / loss_divisor, without gradient (what the
        trainer logs as train_loss, comparable with val_loss)."""
        return self.loss(self.states(inputs, short_window, long_window, cu_seqlens, rows), targets, mtp_weights,
                         loss_divisor, with_next_token)

    @torch.no_grad()
    def next_token_logits(self, inputs, short_window: int, long_window: int) -> torch.Tensor:
        """The (softcapped) logits of the token after the last one of `inputs` (for sampling; no fp8)."""
        x = self.states(inputs, short_window, long_window)[-1:]
        logits = (x @ self.lm_head_t.to(x.dtype)).float()
        return kernels.softcap(logits) if self.config.softcap else logits

    def states(self, inputs, short_window, long_window, cu_seqlens=None, rows=None):
        """The normalized states the head reads, one per position of the packed sequence `inputs`."""
        c = self.config
        dtype = torch.bfloat16 if inputs.is_cuda else torch.float32
        is_doc_start = inputs == c.bos_id
        doc = torch.cumsum(is_doc_start.to(torch.int32), 0)
        # Paired-head layers rotate by positions 0 .. 2T - 1; the others read the first T rows of the same table.
        paired = any(layer in self.attn_slot for layer in c.paired_head_layers)
        T = inputs.numel()
        paired_cos, paired_sin = rotary_table(self.rotary_freqs, 2 * T if paired else T)
        cos, sin = paired_cos[:T], paired_sin[:T]
        # Windows stay in blocks for the flash kernels (FA4 may get them as CPU tensors: multiplying one here
        # would put a CPU kernel in the compiled graph); the masks of the others count positions.
        masks = {}
        if self.attention_backend not in FLASH_BACKENDS:
            masks = self.attention_masks(doc, short_window * BLOCK, long_window * BLOCK)
        ctx = {"cu_seqlens": cu_seqlens, "short_window": short_window, "long_window": long_window, "masks": masks,
               "max_seqlen": self.max_doc_tokens if self.training else None,
               "cos": cos, "sin": sin, "paired_cos": paired_cos, "paired_sin": paired_sin,
               "not_doc_start": (~is_doc_start).to(dtype)}

        if rows is None or rows["token"] is None:
            embed_weight = self.lm_head_t.T if self.is_tied else self.embed
            x = F.embedding(inputs.to(torch.int64), embed_weight).to(dtype)
        else:
            x = rows["token"].to(dtype)
        if c.smear:
            # Smear: a gated share of the previous token's embedding, within the document.
            gate = self.scalars[self.scalar_index["smear"]] * torch.sigmoid(x[:, :GATE_INPUTS] @ self.smear_gate.to(dtype).T)
            previous = torch.cat([x[:1] * 0, x[:-1]]) * ctx["not_doc_start"][:, None]
            x = x + gate * previous
        x = x0 = norm(x)
        bigram = None
        if c.bigram_embeds:
            bigram = (self.bigram_embed[self.bigram_index(inputs)] if rows is None else rows["bigram"]).to(dtype)
        s = self.scalars.to(dtype)
        residual, gains_qkv, gains_o, mix_bigram = (s[self.scalar_index[k]] for k in ("residual", "sa_qkv", "sa_o", "bigram"))
        mix_x0 = self.x0_lambdas.to(dtype)

        skip = backout = None
        for layer in range(c.num_layers):
            if c.skip_connections and layer == c.skip_to:
                gate = torch.sigmoid(s[self.scalar_index["skip"]])
                if c.skip_gate:  # per token, from x0: sigmoid(lambda) * 2 sigmoid(W x0[:12])
                    gate = gate * 2 * torch.sigmoid(x0[:, :GATE_INPUTS] @ self.skip_gate.to(dtype).T)
                x = x + gate * skip
            x = residual[layer] * x + mix_x0[layer] * x0
            if bigram is not None:
                x = x + mix_bigram[layer] * bigram
            if layer in self.attn_slot:
                ve = None
                if layer in self.ve_slot:
                    if rows is None:
                        ve = F.embedding(inputs.to(torch.int64), self.value_embeds[self.ve_slot[layer]]).to(dtype)
                    else:
                        ve = rows["value"][self.ve_slot[layer]].to(dtype)
                gains = (gains_qkv[layer], gains_o[layer]) if c.sa_lambdas else None
                x = x + self.attention(norm(x), layer, ve, ctx, gains)
            x = x + self.mlp(norm(x), layer)
            if layer == c.skip_from:
                skip = x
            if layer == c.backout_layer:
                backout = x
        if c.backout:
            # Backout: take back a learned share of an intermediate state before the head.
            x = x - s[self.scalar_index["backout"]] * backout
        return norm(x)

    def loss(self, x, targets, mtp_weights, loss_divisor, with_next_token: bool = False):
        c = self.config
        if not self.training:
            loss = self.eval_loss(x, targets, mtp_weights, loss_divisor)
            return (loss, loss.detach()) if with_next_token else loss
        if c.fp8 and c.softcap and x.is_cuda:
            # One op: its backward writes the logits' gradient straight in fp8 (kernels/cross_entropy.py says why).
            out = kernels.fp8_softcapped_cross_entropy(
                x, self.lm_head_t, targets, mtp_weights, c.fp8_x_scale, c.fp8_w_scale,
                c.fp8_grad_scale / loss_divisor, with_next_token=with_next_token)
        else:
            if c.fp8 and x.is_cuda:
                logits = kernels.fp8_linear(x, self.lm_head_t, c.fp8_x_scale, c.fp8_w_scale,
                                            c.fp8_grad_scale / loss_divisor)
            else:
                logits = x @ self.lm_head_t.to(x.dtype)
            if c.softcap:
                out = kernels.softcapped_cross_entropy(logits, targets, mtp_weights, reduction="sum",
                                                       with_next_token=with_next_token)
            else:
                out = plain_cross_entropy(logits, targets, mtp_weights, with_next_token)
        if with_next_token:
            return out[0] / loss_divisor, out[1] / loss_divisor
        return out / loss_divisor

    def eval_loss(self, x, targets, mtp_weights, loss_divisor, rows_per_chunk: int = EVAL_HEAD_ROWS):
        """The loss with the head in the compute dtype (bf16 on GPU), no fp8, next-token only (validation calls
        it with one weight), in chunks of rows: a 262,144-token validation forward would otherwise hold its
        whole (tokens, vocab) logits (26 GB in bf16 at the GPT-2 vocabulary)."""
        if len(mtp_weights) != 1:
            raise ValueError(f"eval mode scores the next token only, got {len(mtp_weights)} MTP weights")
        head = self.lm_head_t.to(x.dtype)
        total = 0
        for start in range(0, x.size(0), rows_per_chunk):
            logits = x[start:start + rows_per_chunk] @ head
            chunk_targets = targets[start:start + rows_per_chunk]
            if self.config.softcap:
                total = total + kernels.softcapped_cross_entropy(logits, chunk_targets, mtp_weights, reduction="sum")
            else:
                total = total + plain_cross_entropy(logits, chunk_targets, mtp_weights)
        return total / loss_divisor


def plain_cross_entropy(logits, targets, mtp_weights, with_next_token: bool = False):
    """sum over t and k of mtp_weights[k] * CE(logits_t, targets[t + k]), in float32, without a softcap;
    with_next_token: (that, the k = 0 sum unweighted and without gradient)."""
    logits = logits.float()
    total = next_token = 0
    for k in range(len(mtp_weights)):
        term = F.cross_entropy(logits[: logits.size(0) - k], targets[k:], reduction="sum")
        total = total + mtp_weights[k] * term
        if k == 0:
            next_token = term.detach()
    return (total, next_token) if with_next_token else total


def validate_config(c: ModelConfig):
    """Index lists and sizes must fit the model; each error names the setting."""
    L = c.num_layers

    def layers_ok(name, layers):
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"{name}: layer indices {bad} are outside 0..{L - 1} (num_layers={L})")

    for name in ("attention_skip_layers", "long_window_layers", "paired_head_layers", "value_embed_layers"):
        layers_ok(name, getattr(c, name))
    attn = [i for i in range(L) if i not in c.attention_skip_layers]
    if not attn:
        raise ValueError("attention_skip_layers skips every layer; at least one layer needs attention")
    for name in ("paired_head_layers", "value_embed_layers"):
        skipped = sorted(set(getattr(c, name)) & set(c.attention_skip_layers))
        if skipped and (name != "value_embed_layers" or c.value_embeds):
            raise ValueError(f"{name}: layers {skipped} have no attention (attention_skip_layers)")
    if c.paired_head_layers and c.num_heads % 2:
        raise ValueError(f"paired_head_layers needs an even num_heads, got {c.num_heads}")
    if c.head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 (half-truncated RoPE), got {c.head_dim}")
    if c.skip_connections and not 0 <= c.skip_from < c.skip_to < L:
        raise ValueError(f"skip_from ({c.skip_from}) must be before skip_to ({c.skip_to}), both in 0..{L - 1}")
    if c.backout and not 0 <= c.backout_layer < L:
        raise ValueError(f"backout_layer {c.backout_layer} is outside 0..{L - 1}")
    for name in ("mlp_kernel", "qkv_kernel"):
        if getattr(c, name) not in ("triton", "torch"):
            raise ValueError(f"{name} must be triton or torch, got {getattr(c, name)!r}")
    if c.mlp_activation not in ("relu2", "gelu"):
        raise ValueError(f"mlp_activation must be relu2 or gelu, got {c.mlp_activation!r}")
    if not 0 <= c.bos_id < c.vocab_size:
        raise ValueError(f"bos_id {c.bos_id} is outside the vocabulary (vocab_size={c.vocab_size})")
