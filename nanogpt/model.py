"""GPT-2, as published: pre-norm transformer blocks, learned absolute positions, tied embeddings.

Read top to bottom, leaves first: LayerNorm -> attention -> MLP -> block -> config -> model.
The architecture is OpenAI's GPT-2 (Radford et al., 2019): LayerNorm before attention and MLP, a
final LayerNorm, a 4x MLP with the tanh approximation of GELU, the token embedding shared with
the output projection, residual projections initialised with std 0.02 / sqrt(2 * n_layer).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogpt.fused_loss import linear_cross_entropy
from nanogpt.fused_mlp import gelu_mlp
from nanogpt.gpus import peak_flops


def autocast_casts(*tensors):
    """The tensors (None stays None) cast as autocast casts a matmul's operands, when autocast is on where the
    first one lives; the fused ops take 16-bit operands directly, as nn.Linear would under autocast."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be switched off (PyTorch's could not, before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Fused (flash / memory-efficient / cuDNN) attention where the backend has it.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, seq, width)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.config = config  # shared with the model: fused_mlp is read at each forward

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU; keeping it makes converted weights exact.
        if self.config.fused_mlp and x.is_cuda:
            return self.dropout(self._fused(x))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    def _fused(self, x):
        """The same MLP as one op with the GELU in its matmuls' epilogues (nanogpt/fused_mlp.py)."""
        return gelu_mlp(*autocast_casts(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 had
    # How, not what: not part of the model's shape, so not in checkpoints' model_args.
    fused_loss: bool = True  # training loss on CUDA through one fused lm_head + cross-entropy op (fused_loss.py)
    fused_mlp: bool = True  # on CUDA, the MLP as one op with the GELU in Triton matmul epilogues (fused_mlp.py)


# The published GPT-2 family (layers, heads, width); all use 1024 positions and 50257 tokens.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def select_sdpa_backend(name: str) -> str:
    """Restrict F.scaled_dot_product_attention to one backend (process-wide; torch.compile honours it).

    "auto" leaves PyTorch's own choice (FlashAttention-2 on Ampere/Hopper in bf16). On Hopper the
    cuDNN backend is often faster; `python -m nanogpt.bench --attention=cudnn` measures it.
    """
    if name not in SDPA_BACKENDS:
        raise ValueError(f"attention={name!r}: must be one of {', '.join(SDPA_BACKENDS)}")
    if name == "auto":
        return name
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(name == "flash")
    cuda.enable_cudnn_sdp(name == "cudnn")
    cuda.enable_mem_efficient_sdp(name == "efficient")
    cuda.enable_math_sdp(name == "math" or not torch.cuda.is_available())  # CPU always needs math
    return name


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # Residual projections scaled by depth so the residual stream's variance stays put.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (the token embedding is the
        output layer too, so it counts)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.transformer.wpe.weight.numel() if non_embedding else total

    def forward(self, idx, targets=None, return_logits: bool = True):
        """Logits (or only the last position's, without targets) and the loss when targets are given.

        Training passes return_logits=False: the full (B, T, vocab) logits then need not leave the
        compiled graph, which saves memory traffic. On CUDA with config.fused_loss the lm_head and the
        loss then run as one op that makes the logits' gradient in the forward (nanogpt/fused_loss.py).
        """
        batch, seq = idx.shape
        if seq > self.config.block_size:
            raise ValueError(f"sequence of {seq} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(seq, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :]), None
        if self.config.fused_loss and not return_logits and x.is_cuda:
            return None, self._fused_lm_head_loss(x, targets)
        logits = self.lm_head(x)
        flat = logits.view(-1, logits.size(-1))
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # the softmax in at least fp32
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    def _fused_lm_head_loss(self, x, targets):
        """The lm_head and the mean cross-entropy in one op; the logits never leave it."""
        x, weight = autocast_casts(x, self.lm_head.weight)
        return linear_cross_entropy(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), ignore_index=-1)

    def crop_block_size(self, block_size: int):
        """Shorten the context (e.g. to fine-tune GPT-2 weights at 256 tokens)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None):
        """AdamW with weight decay on 2-D tensors (matmul weights, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM, appendix B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second: float, device_name: str) -> float | None:
        """Model FLOPs utilisation against the GPU's dense peak bf16 rate in slurm/gpus.tsv (the project's GPU
        table); None off-GPU or for a GPU the table lacks."""
        peak = peak_flops(device_name)
        return None if peak is None else self.flops_per_token() * tokens_per_second / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Sample `max_new_tokens` tokens after the prompt `idx` (B, T); returns (B, T + new)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0) -> GPT:
        """Load Hugging Face GPT-2 weights ('gpt2', 'gpt2-medium', ..., or a local directory).

        Needs the `transformers` package. HF's GPT-2 stores its linear layers as Conv1D, i.e.
        with the weight transposed relative to nn.Linear, so those four are transposed here.
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("from_pretrained needs the `transformers` package (pip install transformers)") from e
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        hf_cfg = hf_model.config
        config = GPTConfig(
            block_size=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.n_layer,
            n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd, dropout=dropout, bias=True,
        )
        model = cls(config)
        ours = model.state_dict()
        theirs = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        missing = set(ours) - set(theirs)
        if missing:
            raise ValueError(f"{name_or_path}: checkpoint lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for key, value in theirs.items():
                if key not in ours:
                    continue
                value = value.t() if key.endswith(transposed) else value
                if value.shape != ours[key].shape:
                    raise ValueError(f"{name_or_path}: {key} has shape {tuple(value.shape)}, expected {tuple(ours[key].shape)}")
                ours[key].copy_(value)
        return model
