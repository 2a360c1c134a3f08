"""modded_nanogpt.bench.backend_agreement: one checkpoint scored under several attention backends (CPU; the GPU
case is gpu-marked)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import modded_nanogpt.model as model_module
from nanogpt.config import ConfigError
from tests.fixtures import REPO_ROOT, read_metrics
from tests.test_study_probes import speedrun

CHECKPOINT_STEP = 3


@pytest.fixture(scope="module")
def checkpoint(char_corpus, tmp_path_factory):
    """A tiny speedrun run's checkpoint after 3 steps (the run validates there too) and that validation's loss."""
    from modded_nanogpt.train_gpt import main

    run_dir = tmp_path_factory.mktemp("agreement") / "run"
    main(speedrun(char_corpus, run_dir, f"--save_checkpoints={CHECKPOINT_STEP}", "--val_tokens=2048",
                  "--val_batch_tokens=1024"))
    logged = {m["step"]: m["val_loss"] for m in read_metrics(run_dir) if m["kind"] == "val"}
    return run_dir / "ckpt" / f"step_{CHECKPOINT_STEP:07d}.pt", logged[CHECKPOINT_STEP]


def agreement(*argv):
    from modded_nanogpt.bench.backend_agreement import agreement

    return agreement([str(a) for a in argv])


def test_sdpa_agrees_with_the_float32_reference_and_the_run_s_validation(checkpoint):
    """On CPU the sdpa backend computes in float32: every layer's output and gradients equal the tool's own
    float32 reference (written apart from `attend`), with no bias; the val loss is the one the run logged at
    that step; the bf16 floor is bf16-sized; every attention layer is reported, the paired one included."""
    path, logged = checkpoint
    report = agreement(path, "--backends=sdpa", "--tokens=256")
    assert report.val_loss["sdpa"] == pytest.approx(logged, rel=1e-6)
    layers = sorted({layer for layer, _ in report.layers})
    assert layers == [0, 1, 3]  # tiny_cpu: 4 layers, layer 2 without attention
    assert "paired" in report.kinds[0] and "paired" not in report.kinds[1]
    for layer in layers:
        for name, (error, bias, worst) in report.layers[layer, "sdpa"].items():
            assert error < 1e-5 and abs(bias) < 1e-6 and worst < 1e-4, (layer, name, error, bias, worst)
        for name, (error, _, worst) in report.layers[layer, "bf16 rounding"].items():
            assert 1e-4 < error < 1e-2 and error < worst < 0.1, (layer, name, error, worst)


def test_a_backend_whose_attention_is_one_percent_short_shows_a_minus_one_percent_bias(checkpoint, monkeypatch):
    """The signed bias finds a systematic error: attention outputs scaled by 0.99 show -1% on the output and on
    each input gradient (all linear in the output), where the relative error alone would not tell shrinkage
    from noise."""
    path, _ = checkpoint
    original = model_module.attend

    def short(*args, **kwargs):
        return 0.99 * original(*args, **kwargs)

    monkeypatch.setattr(model_module, "attend", short)
    report = agreement(path, "--backends=sdpa", "--tokens=256", "--val_tokens=0")
    assert report.val_loss == {}
    for (layer, backend), errors in report.layers.items():
        if backend == "sdpa":
            for name, (error, bias, _) in errors.items():
                assert bias == pytest.approx(-0.01, abs=1e-5) and error == pytest.approx(0.01, rel=1e-3), (layer, name)


@pytest.mark.parametrize("argv, message", [
    (["--backends=sdpa,xformers"], "--backends: xformers not among fa3, fa4, flex, sdpa"),
    (["--backends="], "--backends: none given"),
    (["--backends=sdpa", "--tokens=200"], "--tokens must be a positive multiple of 128"),
    (["--backends=sdpa", "--tokens=32768"], "up to 16384 .the float32 reference holds"),
    (["--backends=sdpa", "--val_tokens=-1"], "--val_tokens must be >= 0"),
    (["--backends=sdpa", "--val_tokens=512"], "--val_tokens=512 is less than one validation forward"),
])
def test_bad_arguments_are_refused_with_the_culprit_named(checkpoint, argv, message):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        agreement(path, *argv)


def test_sdpa_is_refused_for_a_validation_forward_whose_dense_mask_would_not_fit(checkpoint, tmp_path):
    """The speedrun validates in forwards of 262,144 tokens: sdpa's dense mask would be 64 GiB. Refused with the
    way out, before the model is built; the per-layer comparison alone (--val_tokens=0) runs."""
    path, _ = checkpoint
    payload = torch.load(path, weights_only=False)
    payload["config"]["val_batch_tokens"] = 262144
    payload["config"]["val_tokens"] = 262144
    big = tmp_path / "big.pt"
    torch.save(payload, big)
    with pytest.raises(ConfigError, match=r"val_batch_tokens=262144 would need 64 GiB .* --val_tokens=0"):
        agreement(big, "--backends=sdpa", "--tokens=256")
    report = agreement(big, "--backends=sdpa", "--tokens=256", "--val_tokens=0")
    assert report.val_loss == {} and report.layers


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of CUDA-only backends is a CPU machine's")
def test_backends_that_cannot_run_here_and_a_missing_checkpoint_fail_before_anything_loads(tmp_path):
    """flex needs CUDA: refused on CPU, before the (missing) checkpoint is looked at; then the missing file.
    The command line prints one error line and exits 2."""
    with pytest.raises(ConfigError, match="--backends: attention_backend=flex needs CUDA"):
        agreement(tmp_path / "missing.pt", "--backends=flex")
    with pytest.raises(ConfigError, match="missing.pt: no such checkpoint file"):
        agreement(tmp_path / "missing.pt", "--backends=sdpa")
    done = subprocess.run([sys.executable, "-m", "modded_nanogpt.bench.backend_agreement", tmp_path / "missing.pt",
                           "--backends=fa4"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --backends: attention_backend=fa4 needs CUDA; use sdpa (or auto) on CPU"]


@pytest.mark.gpu
def test_gpu_flex_and_fa4_agree_with_the_reference_on_a_trained_model(char_corpus, tmp_path):
    """On a CUDA GPU, compiled flex and (where flash-attn-4 imports on sm90/sm100) FA4 on a tiny trained model
    (head_dim 64): bf16-sized errors against the float32 reference, and val losses near sdpa's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (tests/README.md: the GPU tier)")
    from modded_nanogpt.model import fa4_import_error
    from modded_nanogpt.train_gpt import main

    run_dir = tmp_path / "run"
    main(speedrun(char_corpus, run_dir, f"--save_checkpoints={CHECKPOINT_STEP}", "--val_tokens=2048",
                  "--val_batch_tokens=1024", "--model_dim=128", "--head_dim=64"))
    backends = ["sdpa", "flex"]
    if fa4_import_error() is None and torch.cuda.get_device_capability()[0] in (9, 10):
        backends.append("fa4")
    report = agreement(run_dir / "ckpt" / f"step_{CHECKPOINT_STEP:07d}.pt", f"--backends={','.join(backends)}",
                       "--tokens=1024")
    for backend in backends:
        assert report.val_loss[backend] == pytest.approx(report.val_loss["sdpa"], abs=2e-2), backend
        for layer in {layer for layer, _ in report.layers}:
            for name, (error, _, _) in report.layers[layer, backend].items():
                assert error < 2e-2, (backend, layer, name, error)


def test_the_fa4_path_passes_host_scalars_and_agrees_through_a_reference_stand_in(checkpoint, fa4_on_cpu,
                                                                                   monkeypatch):
    """FA4's branch on CPU, through the tests' reference FA4 interface (float32, dense mask, backward by hand):
    the window and the scale reach the kernel as each layer's, and its outputs and gradients agree with the
    tool's float32 reference."""
    import modded_nanogpt.bench.backend_agreement as tool

    monkeypatch.setattr(tool, "select_attention_backend", lambda backend, device: backend)
    report = agreement(checkpoint[0], "--backends=fa4", "--tokens=256", "--val_tokens=0")
    windows = {int(kind.split()[1].rstrip(",")) for kind in report.kinds.values()}
    assert {window for _, window in fa4_on_cpu} == windows == {128, 256}
    assert len(fa4_on_cpu) == 2 * len(report.kinds)  # a forward and a backward per layer
    for (layer, backend), errors in report.layers.items():
        if backend == "fa4":
            for name, (error, bias, worst) in errors.items():
                assert error < 1e-5 and abs(bias) < 1e-6 and worst < 1e-4, (layer, name, error)


def test_the_worst_row_finds_an_error_at_one_position_that_the_norms_average_away():
    """One position of 4,096 off by 20% of its norm: the relative error over the tensor stays near 0.3%, the worst
    row reads 20%; a uniform 1% error reads 1% on both; a near-zero row's error counts against the median norm."""
    from modded_nanogpt.bench.backend_agreement import errors

    ref = torch.randn(4096, 2, 64, generator=torch.Generator().manual_seed(0))
    norms = ref.norm(dim=-1)
    row = divmod(int(norms.flatten().argmax()), 2)  # a row above the median norm
    one_row = ref.clone()
    one_row[row] += 0.2 * norms[row] * torch.nn.functional.normalize(torch.randn(64), dim=0)
    error, _, worst = errors(one_row, ref)
    assert error < 0.004 and worst == pytest.approx(0.2, rel=1e-6)
    error, bias, worst = errors(1.01 * ref, ref)
    assert error == pytest.approx(0.01, rel=1e-5) and bias == pytest.approx(0.01, rel=1e-5)
    assert worst == pytest.approx(0.01, rel=1e-5)
    tiny = ref.clone()
    tiny[7, 0] = 1e-6
    off = tiny.clone()
    off[7, 0] += 1e-3
    median = tiny.norm(dim=-1).median().item()
    assert errors(off, tiny)[2] == pytest.approx(1e-3 * 8 / median, rel=1e-5)  # |1e-3 * ones(64)| = 8e-3
