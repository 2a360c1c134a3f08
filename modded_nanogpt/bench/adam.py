"""The speedrun's Adam step on a GPU: the fused update (dist_optim.adam_update) against the same update as
separate tensor operations (adam_update_reference), over the Adam parameters of the default model once untied (464M floats,
mostly the embedding tables), state already created.

    python -m modded_nanogpt.bench.adam
"""

import argparse
import sys

import torch

from modded_nanogpt.bench import require_cuda
from modded_nanogpt.dist_optim import adam_update, adam_update_reference
from modded_nanogpt.model import GPT
from modded_nanogpt.train_gpt import Runtime, build_optimizer, model_config, parse_hyperparameters


@torch.no_grad()
def main(argv):
    argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.adam", description=__doc__.split("\n\n")[0]).parse_args(argv)
    require_cuda("modded_nanogpt.bench.adam")
    from triton.testing import do_bench

    rt = Runtime(0, 0, 1, torch.device("cuda"))
    model = GPT(model_config(parse_hyperparameters([]))).cuda()
    model.untie()
    optimizer = build_optimizer(model, parse_hyperparameters([]), rt)
    params = [(g, p) for g in optimizer.adam_groups for p in g.params]
    floats = sum(p.numel() for _, p in params)
    for _, p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, update in (("fused (adam_update)", adam_update), ("separate ops (reference)", adam_update_reference)):
        states = [{} for _ in params]

        def step(update=update, states=states):
            for (group, p), state in zip(params, states, strict=True):
                update(p, p.grad, state, group.lr, *group.betas, 1e-10, group.weight_decay)

        ms = do_bench(step, warmup=3, rep=50, return_mode="median")
        print(f"Adam step, {floats / 1e6:.0f}M floats, {name:26s}: {ms:6.2f} ms  "
              f"({28 * floats / ms / 1e9:.2f} TB/s at 28 B/float)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
