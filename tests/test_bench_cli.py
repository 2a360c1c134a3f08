"""The benchmark entry points (`python -m nanogpt.bench`, `python -m modded_nanogpt.bench.NAME`) parse their command
lines before any work: --help prints usage and exits 0 on any machine (no GPU, no triton needed), a misspelt option
or a missing file stops with exit 2 naming it, and a GPU tool on a machine without CUDA says so in one line."""

import importlib
import json

import pytest
import torch

from nanogpt.bench.throughput import cli as nanogpt_bench_cli

MODDED = ["profile", "adam", "flex", "mlp", "rows", "compile_times", "sm90_check"]


def run(name, argv, capsys):
    module = importlib.import_module(f"modded_nanogpt.bench.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


@pytest.mark.parametrize("name", MODDED)
def test_every_speedrun_bench_prints_its_usage(name, capsys):
    code, out, _ = run(name, ["--help"], capsys)
    assert code == 0 and out.startswith(f"usage: python -m modded_nanogpt.bench.{name}"), out


@pytest.mark.parametrize("name, argv, message", [
    ("profile", ["--stag=1"], "unknown setting --stag"),          # a profile option misspelt reaches the trainer's parser
    ("profile", ["--steps=0"], "--steps and --rows must be positive"),
    ("mlp", ["--row=5"], "unrecognized arguments: --row=5"),
    ("adam", ["x"], "unrecognized arguments: x"),
    ("rows", ["--data=/nonexistent/train_000001.bin"], "--data: no such file: /nonexistent/train_000001.bin"),
    ("compile_times", ["/nonexistent/cache"], "cache_dir: not a directory: /nonexistent/cache"),
    ("sm90_check", ["--arch=75"], "--arch: invalid choice: 75"),
    ("flex", ["--windows=5"], "--windows"),
])
def test_a_bad_option_is_named_before_any_work(name, argv, message, capsys):
    code, _, err = run(name, argv, capsys)
    assert code == 2 and message in err, err


def test_a_stage_the_schedule_lacks_is_named(capsys):
    assert run("profile", ["--stage=4"], capsys)[0] == "--stage=4: this schedule has stages 0-3"
    assert run("profile", ["--stage=3", "--num_iterations=30", "--extension_iterations=0", "--batch_schedule=8;16;24",
                           "--window_schedule=1,3;3,7;5,11", "--lr_schedule=1;1.5;1.7", "--mtp_schedule=1;1;1"],
               capsys)[0] == "--stage=3: this schedule has stages 0-2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("name", ["profile", "adam", "mlp", "rows"])
def test_a_gpu_bench_without_cuda_says_so_in_one_line(name, capsys):
    code, _, _ = run(name, [], capsys)
    assert code == f"modded_nanogpt.bench.{name}: needs a CUDA GPU; none is visible here"


def test_the_baseline_bench_names_a_bad_setting(capsys):
    assert nanogpt_bench_cli(["--bogus=1"]) == 2
    assert "unknown setting --bogus on the command line" in capsys.readouterr().err
    assert nanogpt_bench_cli(["--help"]) == 0
    assert "python -m nanogpt.bench" in capsys.readouterr().out


def test_the_baseline_bench_measures_a_tiny_model_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    assert nanogpt_bench_cli(["tiny_cpu", "--device=cpu", "--compile=False", "--bench_steps=2", "--bench_warmup=1",
                              f"--out_json={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["ms_per_step"] > 0 and result["tokens_per_s"] > 0


@pytest.mark.parametrize("kernel, group", [
    # FA4's CuTe DSL kernels carry their class name after a "kernel_cutlass" prefix, which cuBLAS's group also matches
    ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensor0", "FA4 attention forward"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__tensor0", "FA4 attention backward"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_preprocessFlashAttentionBackwardPreprocess_object", "FA4 attention backward"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_postprocessFlashAttentionBackwardPostprocess_object", "FA4 attention backward"),
    ("triton_tem_fused_flex_attention_backward_0", "flex attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "cuBLAS bf16"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "cuBLAS bf16"),
    ("cutlass3x_sm90_tensorop_gemm_bf16", "cuBLAS bf16"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "Inductor reduction"),
])
def test_the_profile_groups_each_kernel_by_its_name(kernel, group):
    from modded_nanogpt.bench.profile import kernel_group

    assert kernel_group(kernel) == group
