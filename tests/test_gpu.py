"""GPU tier: the baseline trainer's CUDA paths (bf16 + compile, fp16 + GradScaler, attention backends).

Skipped without CUDA (see conftest.py); run them with `python -m pytest -m gpu` on a CUDA machine
(`bash nanogpt/bench/gpu_session.sh` runs them with the throughput sweep).
"""

import pytest
import torch

from nanogpt.bench.throughput import main as bench_main
from nanogpt.model import GPT, GPTConfig, select_sdpa_backend
from nanogpt.train import main as train_main
from tests.fixtures import read_metrics

pytestmark = pytest.mark.gpu

SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=128", "--block_size=128", "--batch_size=16", "--max_iters=40",
         "--eval_interval=20", "--eval_iters=5", "--warmup_iters=5", "--learning_rate=3e-3", "--min_lr=3e-4",
         "--log_interval=5"]


@pytest.mark.parametrize("dtype, compile_model", [("bfloat16", True), ("float16", False)])
def test_cuda_training_lowers_the_loss(char_corpus, tmp_path, dtype, compile_model):
    run_dir = tmp_path / "run"
    summary = train_main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", "--device=cuda", f"--dtype={dtype}",
                          f"--compile={compile_model}", *SMALL])
    val = [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "val"]
    assert val[-1] < val[0] - 0.5, val
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in train)
    assert summary["peak_memory_bytes"] > 0


def test_attention_backends_agree():
    """Each SDPA backend the GPU offers computes the same model output as the plain math one."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=1000)).cuda().eval()
    tokens = torch.randint(0, 1000, (4, 256), device="cuda")
    outputs = {}
    try:
        for backend in ("math", "flash", "cudnn", "efficient"):
            select_sdpa_backend(backend)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                try:
                    outputs[backend] = model(tokens, targets=tokens)[0].float()
                except RuntimeError as e:  # a backend this GPU/build lacks
                    print(f"{backend}: unavailable ({e})")
    finally:
        select_sdpa_backend("auto")
        for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                       torch.backends.cuda.enable_math_sdp, torch.backends.cuda.enable_cudnn_sdp):
            enable(True)
    assert "flash" in outputs
    for backend, out in outputs.items():
        error = (out - outputs["math"]).norm() / outputs["math"].norm()
        assert error < 2e-2, f"{backend}: relative error {error:.2e}"


def test_bench_reports_throughput_and_mfu():
    result = bench_main(["--n_layer=2", "--n_embd=256", "--n_head=4", "--block_size=256", "--batch_size=8",
                         "--total_batch_size=4096", "--bench_steps=3", "--bench_warmup=1", "--compile=False"])
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["accumulation"] == 2
