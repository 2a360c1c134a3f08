"""Sample text from a speedrun run's newest checkpoint (or a given checkpoint file).

  python -m modded_nanogpt.sample --run_dir=runs/modded_tiny --start="def " --num_samples=2 --max_new_tokens=200
  python -m modded_nanogpt.sample --checkpoint=runs/x/ckpt/step_0001555.pt --start=FILE:prompt.txt --top_k=50

The model attends with the run's final windows (the last stage's short window, final_long_window), rotary
frequencies as the checkpoint holds them, the head in float32 (bf16 on a GPU) without fp8. Each new token
runs the whole sequence again (no cache): meant for a look at what a run learned, not for throughput. The
tokenizer is the one of the run's data directory (corpus.json, via nanogpt.data.tokenizer), or GPT-2's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from modded_nanogpt.model import GPT
from modded_nanogpt.train_gpt import Hyperparameters, model_config
from nanogpt.config import ConfigError, exit_status
from nanogpt.data.tokenizer import gpt2_tokenizer, load_tokenizer
from nanogpt.rundir import load_newest
from nanogpt.sample import SamplingSettings, sampling_checkpoint, sampling_main, sampling_model


@dataclass
class SampleConfig(SamplingSettings):
    max_new_tokens: int = 200  # each token runs the whole sequence again


def load(cfg: SampleConfig) -> tuple[GPT, Hyperparameters]:
    """The model of the checkpoint and the run's settings."""
    if bool(cfg.run_dir) == bool(cfg.checkpoint):
        raise ConfigError("give exactly one of --run_dir or --checkpoint")
    payload = sampling_checkpoint(cfg, load_newest)
    if not isinstance(payload, dict) or "config" not in payload or "batch_schedule" not in payload["config"]:
        raise ConfigError("not a checkpoint of the speedrun trainer (for the baseline: python -m nanogpt.sample)")
    known = Hyperparameters.__dataclass_fields__
    hp = Hyperparameters(**{k: v for k, v in payload["config"].items() if k in known})
    model = GPT(model_config(hp))
    model.load_state_dict(payload["model"])
    return model, hp


def final_windows(hp: Hyperparameters) -> tuple[int, int]:
    """The last stage's short window and the final validation's long window, in blocks."""
    last = hp.window_schedule.split(";")[-1]
    return int(last.split(",")[0]), hp.final_long_window


def sample(model: GPT, ids: list[int], hp: Hyperparameters, cfg: SampleConfig, generator, device) -> list[int]:
    short, long = final_windows(hp)
    tokens = torch.tensor(ids, dtype=torch.int32, device=device)
    for _ in range(cfg.max_new_tokens):
        logits = model.next_token_logits(tokens, short, long)[0] / cfg.temperature
        logits = logits[: hp.vocab_size]
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt.to(tokens.dtype)])
    return tokens.tolist()[len(ids):]


def main(argv: list[str] | None = None) -> list[str]:
    return sampling_main(SampleConfig, argv, __doc__, generate_samples)


def generate_samples(cfg: SampleConfig, prompt: str) -> list[str]:
    """cfg.num_samples continuations of the prompt, printed and returned."""
    model, hp = load(cfg)
    data_dir = cfg.data_dir or hp.data_dir
    tokenizer = load_tokenizer(data_dir) if data_dir and Path(data_dir).is_dir() else gpt2_tokenizer()
    ids = [hp.bos_id] + tokenizer.encode(prompt)  # a new document, as the speedrun trains on them
    device, generator = sampling_model(model, cfg)
    samples = []
    for n in range(cfg.num_samples):
        text = tokenizer.decode([t for t in sample(model, ids, hp, cfg, generator, device) if t < tokenizer.vocab_size])
        samples.append(prompt + text)
        print(f"--- sample {n + 1}/{cfg.num_samples} ---\n{prompt}{text}", flush=True)
    return samples


def cli() -> int:
    return exit_status(main, {ConfigError: 2})


if __name__ == "__main__":
    sys.exit(cli())
