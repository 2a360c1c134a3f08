#!/usr/bin/env bash
# One terminal session's work on a GPU machine, run from the repo root: the speedrun trainer's scaled run on the
# local BPE corpus (compile + warmup time, step_avg per stage, peak memory, val curve), then its GPU tests.
# Prepare the data first (here or there):
#   python -m nanogpt.data.text_corpus --out data/stdlib_bpe50257 --tokenizer bpe --vocab_size 50257
# A FineWeb-format corpus with the published vocabulary (GPT-2 tokens, fineweb_{train,val}_*.bin), e.g. the
# cached FineWeb10B shards (python -m modded_nanogpt.data.cached_fineweb10B) or any proxy built in that format:
#   DATA=/tmp/corpus/data/fineweb10B STEPS=450 VAL_TOKENS=10485760 EXTRA="--vocab_size=50304 --bos_id=50256" \
#     TESTS=0 bash modded_nanogpt/bench/gpu_session.sh
# Knobs: DATA (data dir), STEPS (scheduled steps), EXT (extension steps, 12), VAL_EVERY (50), TESTS=0 to skip
# the tests, EXTRA (more --key=value),
# NUM_GPUS (1 runs the trainer in this process; 2, 4 or 8 run it through modded_nanogpt/run.sh, torchrun),
# OUT (each call writes a new run directory under it, so a second call never resumes the first's run; the
# kernel caches go to OUT/.cache unless TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are set, so a second call with
# the same OUT warms up from warm caches: delete OUT/.cache, or give a new OUT, for a cold warmup).
set -uo pipefail
DATA=${DATA:-data/stdlib_bpe50257}
STEPS=${STEPS:-300}
EXT=${EXT:-12}
VAL_EVERY=${VAL_EVERY:-50}
TESTS=${TESTS:-1}
EXTRA=${EXTRA:-}
NUM_GPUS=${NUM_GPUS:-1}
# Val tokens split into whole forwards on every rank: 294,912 on one GPU; 262,144 (the
# largest multiple of 8 x 32,768 within the stdlib corpus's 326,226 val tokens) on several.
VAL_TOKENS=${VAL_TOKENS:-$([[ $NUM_GPUS == 1 ]] && echo 294912 || echo 262144)}
OUT=${OUT:-/tmp/modded_gpu_session}
RUN="$OUT/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ $NUM_GPUS == 1 ]]; then
  launch=(python -m modded_nanogpt.train_gpt)
else
  launch=(env NUM_GPUS="$NUM_GPUS" bash modded_nanogpt/run.sh)
fi
# shellcheck disable=SC2086
"${launch[@]}" --data_dir="$DATA" --vocab_size=0 --bos_id=-1 --run_dir="$RUN" \
  --num_iterations="$STEPS" --extension_iterations="$EXT" --val_every="$VAL_EVERY" --val_tokens="$VAL_TOKENS" $EXTRA 2>&1 |
  tee "$OUT/run.log" | awk '!/train_loss/ || /step:([0-9]*[05]0|1|2|3)\//'
status=${PIPESTATUS[0]}
if [[ $status != 0 || ! -s "$RUN/metrics.jsonl" ]]; then
  echo "error: the trainer exited with status $status (log: $OUT/run.log); no summary" >&2
  exit 1
fi
echo "run directory: $RUN"
python - "$RUN/metrics.jsonl" <<'PY'
import json, sys, statistics
records = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in records if r["kind"] == "train"]
times = {}
prev = 0.0
for r in train:
    times.setdefault((r["stage"], r["batch_tokens"]), []).append(r["train_time_ms"] - prev)
    prev = r["train_time_ms"]
print("stage | tokens/step | steps | median ms/step (first 3 of each stage dropped) | tokens/s")
for (stage, tokens), ts in sorted(times.items()):
    med = statistics.median(ts[3:] or ts)
    print(f"{stage} | {tokens} | {len(ts)} | {med:.1f} | {tokens / med * 1000:,.0f}")
end = records[-1]
print("end:", {k: end.get(k) for k in ("final_val_loss", "train_time_ms", "warmup_s", "peak_memory_bytes")})
print("val:", [(r["step"], round(r["val_loss"], 4)) for r in records if r["kind"] == "val"])
PY
if [[ $TESTS == 1 ]]; then
  python -m pytest tests/test_modded_*.py -m gpu -q 2>&1 | tail -15
fi
