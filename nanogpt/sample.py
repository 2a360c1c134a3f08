"""Sample text from a trained model: a run directory, a checkpoint file, or OpenAI's GPT-2 weights.

  python -m nanogpt.sample --run_dir=runs/tiny                                  # newest checkpoint of a run
  python -m nanogpt.sample --checkpoint=runs/tiny/ckpt/step_0000200.pt --start="def "
  python -m nanogpt.sample --run_dir=runs/tiny --start=FILE:prompt.txt --num_samples=3 --temperature=0.8 --top_k=50
  python -m nanogpt.sample --init_from=gpt2 --start="Hello, I'm a language model,"   # needs transformers + weights

The tokenizer is the one of the run's data directory (corpus.json or meta.pkl), or GPT-2's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt import checkpoint as ckpt
from nanogpt.config import ConfigError, config_help, exit_status, parse_config
from nanogpt.data.common import DataError
from nanogpt.data.shards import ShardError
from nanogpt.data.tokenizer import gpt2_tokenizer, load_tokenizer
from nanogpt.model import GPT, GPT2_SIZES, GPTConfig


@dataclass
class SamplingSettings:
    """The settings both trainers' samplers take (python -m nanogpt.sample, python -m modded_nanogpt.sample)."""

    run_dir: str = ""  # sample from this run's newest checkpoint that loads
    checkpoint: str = ""  # or from this checkpoint file
    data_dir: str = ""  # where the tokenizer is; default: the checkpoint's data_dir
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 2
    max_new_tokens: int = 300
    temperature: float = 0.8  # < 1 sharper, > 1 more random
    top_k: int = 200  # keep only the k most likely tokens (0 = all)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class SampleConfig(SamplingSettings):
    init_from: str = ""  # or from Hugging Face GPT-2 weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | HF dir


def load_model(cfg: SampleConfig) -> tuple[GPT, str]:
    """The model and the data directory its tokenizer lives in."""
    sources = [bool(cfg.run_dir), bool(cfg.checkpoint), bool(cfg.init_from)]
    if sum(sources) != 1:
        raise ConfigError("give exactly one of --run_dir, --checkpoint or --init_from")
    if cfg.init_from:
        if cfg.init_from not in GPT2_SIZES and not Path(cfg.init_from).is_dir():
            raise ConfigError(f"init_from={cfg.init_from!r}: one of {', '.join(GPT2_SIZES)} or a Hugging Face model directory")
        return GPT.from_pretrained(cfg.init_from), cfg.data_dir
    payload = sampling_checkpoint(cfg, ckpt.load_newest)
    model = GPT(GPTConfig(**payload["model_args"]))
    model.load_state_dict(payload["model"])
    return model, cfg.data_dir or payload["config"]["data_dir"]


def sampling_checkpoint(cfg, load_newest) -> dict:
    """The checkpoint either trainer's sampler reads: the newest of --run_dir that `load_newest(ckpt_dir, warn)`
    loads (the trainer's own: nanogpt.checkpoint.load_newest checks the format), or the --checkpoint file. A
    folder or file that is missing, a run without a complete checkpoint or a file that does not load is a
    ConfigError naming it."""
    if cfg.run_dir:
        ckpt_dir = Path(cfg.run_dir) / "ckpt"
        if not Path(cfg.run_dir).is_dir():
            raise ConfigError(f"run_dir {cfg.run_dir}: not found")
        payload = load_newest(ckpt_dir, lambda m: print(m, file=sys.stderr))
        if payload is None:
            raise ConfigError(f"{ckpt_dir}: no complete checkpoint to sample from")
        return payload
    if not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint {cfg.checkpoint}: not found")
    try:
        return torch.load(cfg.checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any damaged file
        raise ConfigError(f"checkpoint {cfg.checkpoint}: cannot be read ({type(e).__name__}: {e})") from e


def sampling_command(config_class, argv: list[str] | None, doc: str):
    """Either trainer's sampler's command line: None after printing --help (the module's `doc`, then every
    setting), else the parsed settings and the prompt (sampling_prompt)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc + "\nsettings:\n" + config_help(config_class))
        return None
    cfg, _ = parse_config(config_class, argv)
    return cfg, sampling_prompt(cfg)


def sampling_main(config_class, argv: list[str] | None, doc: str, sample_with) -> list[str]:
    """Either trainer's sampler's main: [] after --help, else sample_with(settings, prompt), its samples."""
    command = sampling_command(config_class, argv, doc)
    return [] if command is None else sample_with(*command)


def sampling_device(name: str) -> str:
    """--device of a sampler: auto is the GPU when there is one, else the CPU."""
    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def sampling_model(model, cfg) -> tuple[str, torch.Generator]:
    """Either sampler's model on its --device in eval mode, and the generator of its --seed: (device, generator)."""
    device = sampling_device(cfg.device)
    model.eval().to(device)
    return device, torch.Generator(device=device).manual_seed(cfg.seed)


def sampling_prompt(cfg) -> str:
    """Check the sampling settings (of either trainer's sampler) and return the prompt: --start, or the text of
    the file named by --start=FILE:path."""
    if cfg.num_samples <= 0 or cfg.max_new_tokens <= 0 or cfg.temperature <= 0 or cfg.top_k < 0:
        raise ConfigError("num_samples, max_new_tokens and temperature must be positive, top_k >= 0")
    if not cfg.start.startswith("FILE:"):
        return cfg.start
    path = Path(cfg.start[5:])
    if not path.is_file():
        raise ConfigError(f"prompt file {path}: not found")
    return path.read_text()


def main(argv: list[str] | None = None) -> list[str]:
    return sampling_main(SampleConfig, argv, __doc__, generate_samples)


def generate_samples(cfg: SampleConfig, prompt: str) -> list[str]:
    """cfg.num_samples continuations of the prompt, printed and returned."""
    model, data_dir = load_model(cfg)
    tokenizer = load_tokenizer(data_dir) if data_dir else gpt2_tokenizer()
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise ConfigError("the prompt is empty after tokenization; give --start with some text")
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer of {data_dir} has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")

    device, generator = sampling_model(model, cfg)
    context = torch.tensor([ids], dtype=torch.long, device=device).repeat(cfg.num_samples, 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        out = model.generate(context, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             generator=generator)
    samples = []
    for row in out.tolist():
        generated = row[len(ids):]
        # tokens past the model's vocabulary padding cannot be decoded: they are never trained targets
        generated = [t for t in generated if t < tokenizer.vocab_size]
        samples.append(prompt + tokenizer.decode(generated))
    for i, text in enumerate(samples):
        print(f"--- sample {i + 1}/{len(samples)} ---\n{text}")
    return samples


def cli() -> int:
    return exit_status(main, {ConfigError: 2, ShardError: 2, DataError: 2})


if __name__ == "__main__":
    sys.exit(cli())
