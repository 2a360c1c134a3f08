"""The README's first command: from nothing to a trained model and samples, on any machine.

  make demo                      # = bash setup_env.sh && . ./activate_env.sh && python -m nanogpt.demo
  python -m nanogpt.demo --max_iters=100 --run_name=quick

1. prepares the local corpus: the running Python's standard library as character-level shards
   ($DATA_DIR/stdlib_char; reused when already there);
2. trains a small baseline GPT on it (recipe `demo`: on the GPU when there is one, else the CPU);
3. prints samples from the trained model and where the run directory is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from nanogpt import sample, train
from nanogpt.data import text_corpus


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="corpus folder (default: $DATA_DIR/stdlib_char)")
    parser.add_argument("--runs_dir", default=None, help="where the run goes (default: $RUNS_DIR)")
    parser.add_argument("--run_name", default=None, help="run directory name (default: demo-<time>)")
    parser.add_argument("--max_iters", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir or Path(os.environ.get("DATA_DIR", "data")) / "stdlib_char")
    runs_dir = Path(args.runs_dir or os.environ.get("RUNS_DIR", "runs"))
    run_dir = runs_dir / (args.run_name or time.strftime("demo-%Y%m%d-%H%M%S"))

    print(f"[1/3] local corpus: the Python standard library -> {data_dir}", flush=True)
    text_corpus.main(["--out", str(data_dir), "--tokenizer", "char"])

    print(f"[2/3] training a small baseline GPT -> {run_dir}", flush=True)
    overrides = [f"--data_dir={data_dir}", f"--run_dir={run_dir}", f"--device={args.device}"]
    if args.max_iters is not None:
        overrides += [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    summary = train.main(["demo", *overrides])

    print("[3/3] samples from the trained model (prompt: 'def '):", flush=True)
    samples = sample.main([f"--run_dir={run_dir}", "--start=def ", "--num_samples=2", "--max_new_tokens=300",
                           "--temperature=0.8", f"--device={args.device}"])
    print(f"\nDone. Final val loss {summary['final_val_loss']:.3f} after {summary['step']} steps "
          f"({summary['train_time_ms'] / 1000:.0f}s of training).\n"
          f"Run directory: {run_dir}  (config.json, provenance.json, metrics.jsonl, train.log, ckpt/)\n"
          f"More samples:  python -m nanogpt.sample --run_dir={run_dir} --start='class '\n"
          f"Tests:         make test")
    return {"run_dir": str(run_dir), "summary": summary, "samples": samples}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
