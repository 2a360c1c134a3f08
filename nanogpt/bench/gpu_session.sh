#!/usr/bin/env bash
# One terminal session's work on a GPU machine, run from the repo root: versions, the baseline's gpu-marked
# tests, then a throughput sweep of `python -m nanogpt.bench` for GPT-2 124M (sequence 1024, bf16, compiled,
# 524,288 tokens/step), ending with a short table. Results go to $OUT (or ./gpu_out) as JSON and logs.
#   bash nanogpt/bench/gpu_session.sh                 # everything
#   SWEEP="32:auto 32:cudnn" TESTS=0 bash nanogpt/bench/gpu_session.sh
#   SWEEP="128:auto" BENCH_ARGS="--fused_mlp=False" TESTS=0 bash nanogpt/bench/gpu_session.sh   # the table has a column per switch
set -uo pipefail
OUT=${OUT:-gpu_out}
SWEEP=${SWEEP-"32:auto 64:auto"}    # micro-batch:attention backend; SWEEP="" runs the tests only
TESTS=${TESTS:-1}
BENCH_STEPS=${BENCH_STEPS:-10}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
if [ "$TESTS" = 1 ]; then
  if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py tests/test_fused_loss.py tests/test_fused_mlp.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
  else
    echo "pytest is not installed here: gpu tests skipped (carry its wheel to run them)"
  fi
fi
BENCH_ARGS=${BENCH_ARGS:-}   # more settings for every bench run, e.g. "--inductor_tuning=True"
for spec in $SWEEP; do
  batch=${spec%%:*}; attention=${spec##*:}
  name="b${batch}_${attention}${BENCH_ARGS:+_$(echo "$BENCH_ARGS" | tr -c 'A-Za-z0-9\n' '_' | tr -s '_')}"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of settings
  "$PYTHON" -m nanogpt.bench --batch_size="$batch" --attention="$attention" --total_batch_size=524288 \
    --block_size=1024 --bench_steps="$BENCH_STEPS" --bench_warmup=3 --out_json="$OUT/bench_${name}.json" $BENCH_ARGS \
    2>&1 | tee "$OUT/bench_${name}.log" | grep -E '^bench|Error|error' || true
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys, pathlib
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json"))]
print(f"{'micro':>5} {'attention':>9} {'tuning':>6} {'bias':>5} {'loss':>5} {'mlp':>5} {'ms/step':>8} {'tok/s':>10} {'MFU':>6} {'mem GiB':>7}  device")
for r in rows:
    c = r["config"]
    print(f"{c['batch_size']:>5} {c['attention']:>9} {str(c.get('inductor_tuning')):>6} {str(c.get('bias')):>5} {str(c.get('fused_loss')):>5} {str(c.get('fused_mlp')):>5} {r['ms_per_step']:>8.1f} {r['tokens_per_s']:>10,.0f} "
          f"{100 * r['mfu']:>5.1f}% {r['peak_memory_gib']:>7.1f}  {r['device_name']}")
PY
