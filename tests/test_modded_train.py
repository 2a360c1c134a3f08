"""The speedrun trainer end to end on CPU: the README's command, world sizes 1 and 2, resume, bad input,
and the optimizer step against slow references."""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modded_nanogpt import kernels
from modded_nanogpt.data.loader import DistributedBOSLoader
from modded_nanogpt.dist_optim import (
    AdamGroup,
    BankSpec,
    SpeedrunOptimizer,
    adam_update,
    adam_update_reference,
)
from modded_nanogpt.model import GPT
from modded_nanogpt.optim import normuon_update
from modded_nanogpt.train_gpt import (
    TOTAL_MICRO_STEPS,
    ConfigError,
    Runtime,
    StepReadings,
    build_optimizer,
    lm_head_mode,
    main,
    model_config,
    parse_hyperparameters,
    resolve_data,
    schedule_of,
    train_step,
)
from tests.fixtures import REPO_ROOT, read_metrics, run_files, run_module

# Three one-step stages (the third is stage 3): every stage switch and the untie (after step 1) happen within 3 steps.
THREE_STEPS = ["--num_iterations=3", "--extension_iterations=0", "--batch_schedule=1;2;1",
               "--window_schedule=1,1;1,2;2,3", "--mtp_schedule=1,0.5;1,0.5>0;1", "--lr_schedule=1;1.5;1",
               "--untie_step=1", "--val_every=0", "--val_tokens=2048"]


def tiny(char_corpus, run_dir, *extra):
    return ["tiny_cpu", f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *extra]


def final_params(run_dir):
    ckpts = sorted((run_dir / "ckpt").glob("step_*.pt"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=False)


def test_twenty_cpu_steps_on_the_local_corpus(char_corpus, tmp_path):
    """The README's command, in the grammar of both trainers: python -m modded_nanogpt.train_gpt tiny_cpu ...
    --num_iterations=20."""
    run_dir = tmp_path / "run"
    proc = run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, "--num_iterations=20"))
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if m["kind"] == "train"]
    val = [m for m in metrics if m["kind"] == "val"]
    assert [m["step"] for m in train] == list(range(1, 23))  # 20 scheduled + 2 extension steps
    assert [m["step"] for m in val] == [10, 20, 22]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    # loss: the next-token loss, in val_loss's units; mtp_loss: the weighted objective, larger until the MTP
    # weights become (1.0,) in the last stage
    assert all(m["mtp_loss"] > m["loss"] for m in train if len(m["mtp_weights"]) > 1)
    assert all(m["mtp_loss"] == pytest.approx(m["loss"], rel=1e-5) for m in train if m["mtp_weights"] == [1.0])
    assert train[0]["loss"] < 1.5 * math.log(json.loads((char_corpus / "corpus.json").read_text())["vocab_size"])
    assert re.search(r"step:22/22 train_loss:\d+\.\d+ train_mtp_loss:\d+\.\d+ train_time:", proc.stdout)
    end = metrics[-1]
    assert end["kind"] == "end" and end["final_val_loss"] == val[-1]["val_loss"]
    assert "step:22/22 val_loss:" in proc.stdout and "step_avg:" in proc.stdout
    assert "lm head: float32 (fp8 off)" in proc.stdout  # the tiny recipe turns fp8 off
    # Whole stdlib files against seq_len 256: most of each is clipped away, and the log says so.
    assert re.search(r"warning: documents are clipped to seq_len=256 tokens: \d+% of the first train shard", proc.stdout)
    config = json.loads((run_dir / "config.json").read_text())
    corpus = json.loads((char_corpus / "corpus.json").read_text())
    assert config["vocab_size"] == -(-corpus["vocab_size"] // 128) * 128 and config["bos_id"] == corpus["eot_id"]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["attention_backend"] == "sdpa"  # with where its kernels came from, for fa3/fa4
    assert "| attention sdpa |" in proc.stdout
    assert provenance["attention_backend"] == "sdpa"
    assert "modded_nanogpt/model.py" in provenance["sources"]
    assert [m["stage"] for m in train][:8] == [0] * 7 + [1]  # 20 steps in 3 stages: 0, 7, 13, then extension 20


def run_two_ranks(*args):
    """The trainer on 2 gloo ranks (CPU) through torchrun; fails the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "modded_nanogpt.train_gpt", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_world_sizes_one_and_two_give_the_same_parameters(char_corpus, tmp_path):
    """gloo on CPU: 2 ranks x 4 micro-steps == 1 rank x 8 micro-steps, through the stage switches and the untie."""
    run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, tmp_path / "one", *THREE_STEPS))
    run_two_ranks(*tiny(char_corpus, tmp_path / "two", *THREE_STEPS))
    one, two = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert one["step"] == two["step"] == 3
    assert not one["model"]["tied"]  # untied after step 1
    # Summation order differs (2 ranks x 4 micro-steps), and Adam with eps 1e-10 turns a rounding-level
    # difference of a near-zero gradient into up to ~lr * 1e-3; the value and bigram tables take 75x Adam's lr
    # (measured: 4.2e-4 on one of 81,920 bigram entries, whose values reach 1.1; 3.7e-9 on the head).
    for name, tensor in one["model"].items():
        atol = 1e-3 if name in ("value_embeds", "bigram_embed") else 1e-4
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-4, atol=atol, msg=name)
    for bank, state in one["optimizer"]["muon"].items():
        for key, value in state.items():
            # Gradients have the published scale (a sum over tokens / 4): tolerances relative to the state's size.
            torch.testing.assert_close(two["optimizer"]["muon"][bank][key], value, rtol=1e-4,
                                       atol=1e-5 * value.abs().max().item())
    assert json.loads((tmp_path / "two" / "provenance.json").read_text())["world_size"] == 2


def test_two_ranks_stop_together_and_resume_with_the_pending_adam_gradients(char_corpus, tmp_path):
    """gloo, 2 ranks. max_train_minutes: every rank reads the reduced stop flag of step 1 after queuing step 2,
    so both stop after step 2, with one checkpoint and a stop record. And a checkpoint after step 1 (the even
    step: Adam gradients pending on both ranks, saved summed) resumes on 2 ranks to the uninterrupted run."""
    stopped = tmp_path / "stopped"
    run_two_ranks(*tiny(char_corpus, stopped, *THREE_STEPS, "--max_train_minutes=0.0001"))
    stop = read_metrics(stopped)[-1]
    assert stop["kind"] == "stop" and stop["step"] == 2 and stop["reason"] == "max_train_minutes", stop
    assert sorted(p.name for p in (stopped / "ckpt").iterdir()) == ["step_0000002.pt"]

    run_two_ranks(*tiny(char_corpus, tmp_path / "whole", *THREE_STEPS, "--save_checkpoints=1"))
    saved = tmp_path / "whole" / "ckpt" / "step_0000001.pt"
    assert torch.load(saved, weights_only=False)["optimizer"]["pending_grads"]
    cut = tmp_path / "cut"
    (cut / "ckpt").mkdir(parents=True)
    shutil.copy(saved, cut / "ckpt")
    run_two_ranks(*tiny(char_corpus, cut, *THREE_STEPS))
    whole, resumed = final_params(tmp_path / "whole"), final_params(cut)
    assert resumed["step"] == whole["step"] == 3
    for name, tensor in whole["model"].items():  # rank 0 adds the pending sum first: rounding differs
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGINT"])
def test_signal_checkpoints_and_the_resumed_run_matches(char_corpus, tmp_path, sig):
    """SIGUSR1 or Ctrl-C (SIGINT) mid-run: checkpoint, exit 0; the same command resumes to the uninterrupted run's
    numbers (CPU: bitwise)."""
    args = ["--num_iterations=14", "--extension_iterations=0", "--batch_schedule=1;1;1", "--window_schedule=1,1;1,2;2,3",
            "--mtp_schedule=1,0.5>0;1;1", "--lr_schedule=1;1.2;1.3", "--val_every=7"]
    run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, tmp_path / "whole", *args))
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, *args)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in output, output
    stop = read_metrics(run_dir)[-1]
    assert stop["kind"] == "stop" and stop["reason"] == f"signal {sig}" and stop["step"] < 14, stop
    resumed = run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, *args))
    assert f"resumed from step {stop['step']}" in resumed.stdout
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(run_dir)
    curve = lambda ms: [(m["step"], m.get("loss"), m.get("val_loss")) for m in ms if m["kind"] in ("train", "val")]
    assert curve(cut) == curve(whole)
    assert cut[-1]["final_val_loss"] == whole[-1]["final_val_loss"]


@pytest.mark.parametrize("stop", [5, 6])
def test_resume_between_an_accumulating_step_and_the_adam_step(char_corpus, tmp_path, stop):
    """Adam parameters accumulate gradients over two steps and update on odd ones: a checkpoint after step 5
    (the next step is an Adam step) must carry the pending gradients, or the resumed run drops a step's worth
    (it did: every parameter differed at the end). Step 6's checkpoint has none pending. CPU: bitwise."""
    args = ["--num_iterations=10", "--extension_iterations=0", "--batch_schedule=1;1;1", "--window_schedule=1,1;1,2;2,3",
            "--mtp_schedule=1,0.5>0;1;1", "--lr_schedule=1;1.2;1.3", "--val_every=0"]
    main(tiny(char_corpus, tmp_path / "whole", f"--save_checkpoints={stop}", *args))
    cut = tmp_path / "cut"
    (cut / "ckpt").mkdir(parents=True)
    saved = tmp_path / "whole" / "ckpt" / f"step_{stop:07d}.pt"
    assert bool(torch.load(saved, weights_only=False)["optimizer"]["pending_grads"]) == (stop % 2 == 1)
    shutil.copy(saved, cut / "ckpt")
    main(tiny(char_corpus, cut, *args))
    whole, resumed = final_params(tmp_path / "whole")["model"], final_params(cut)["model"]
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


def test_embedding_grads_scatter_and_dense_train_alike(char_corpus, tmp_path):
    """The trainer with --embedding_grads=scatter (the default) and dense: the same losses up to summation order,
    through the untie (step 3 here) and the Adam steps."""
    args = ["--num_iterations=6", "--extension_iterations=0", "--batch_schedule=1;1;1", "--window_schedule=1,1;1,2;2,3",
            "--mtp_schedule=1,0.5>0;1;1", "--lr_schedule=1;1.2;1.3", "--untie_step=3", "--val_every=0"]
    losses = {}
    for mode in ("scatter", "dense"):
        main(tiny(char_corpus, tmp_path / mode, f"--embedding_grads={mode}", *args))
        losses[mode] = [m["loss"] for m in read_metrics(tmp_path / mode) if m["kind"] == "train"]
    assert len(losses["dense"]) == 6
    assert losses["scatter"] == pytest.approx(losses["dense"], rel=1e-4)


def test_save_checkpoints_every_n(char_corpus, tmp_path):
    run_dir = tmp_path / "run"
    main(tiny(char_corpus, run_dir, "--num_iterations=6", "--extension_iterations=0", "--batch_schedule=1;1;1",
              "--window_schedule=1,1;1,1;1,1", "--mtp_schedule=1;1;1", "--lr_schedule=1;1;1", "--val_every=0",
              "--save_checkpoints=every:2"))
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == [f"step_{s:07d}.pt" for s in (2, 4, 6)]


def test_a_killed_run_resumes_from_its_periodic_checkpoint(char_corpus, tmp_path):
    """A run killed without warning (SIGKILL: a node lost, an OOM kill) resumes from its newest periodic checkpoint
    (checkpoint_every, untimed; older ones are deleted) to the uninterrupted run's numbers. Before, the speedrun
    saved only on a signal, at max_train_minutes and at the end: a crash lost the whole run."""
    args = ["--num_iterations=12", "--extension_iterations=0", "--batch_schedule=1;1;1", "--window_schedule=1,1;1,2;2,3",
            "--mtp_schedule=1,0.5>0;1;1", "--lr_schedule=1;1.2;1.3", "--val_every=6", "--checkpoint_every=4"]
    run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, tmp_path / "whole", *args))
    assert sorted(p.name for p in (tmp_path / "whole" / "ckpt").iterdir()) == ["step_0000012.pt"]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, *args)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "ckpt" / "step_0000008.pt").exists():
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    saved = sorted(p.name for p in (run_dir / "ckpt").iterdir() if p.suffix == ".pt")
    assert saved[-1] in ("step_0000008.pt",) and "step_0000004.pt" not in saved, saved
    resumed = run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, *args))
    assert "resumed from step 8" in resumed.stdout
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(run_dir)
    curve = lambda ms: [(m["step"], m.get("loss"), m.get("val_loss")) for m in ms if m["kind"] in ("train", "val")]
    assert curve(cut) == curve(whole)


# ---- bad input: a clear error, before any allocation or write ----------------------------------------------

@pytest.mark.parametrize("extra, env, message", [
    (["--num_layer=3"], {}, "unknown setting --num_layer on the command line; did you mean num_layers?"),
    (["--num_layers=three"], {}, "--num_layers: cannot read 'three' as int"),
    (["--optimizer=sgd"], {}, "--optimizer: 'sgd' is not one of normuon, adamw"),
    (["--embedding_grads=sparse"], {}, "--embedding_grads: 'sparse' is not one of scatter, dense"),
    (["--paired_head_layers=0,7"], {}, "paired_head_layers: layer indices [7] are outside 0..3"),
    (["--val_tokens=1000"], {}, "val_tokens (1000) must be a multiple of val_batch_tokens"),
    (["--window_schedule=1,3"], {}, "window_schedule has 1 stages but batch_schedule has 4"),
    (["--save_checkpoints=sometimes"], {}, "--save_checkpoints: 'sometimes'"),
    ([], {"WORLD_SIZE": "3"}, "world_size 3 is not supported: the speedrun runs on 1, 2, 4 or 8 GPUs"),
])
def test_bad_settings_fail_before_any_write(char_corpus, tmp_path, extra, env, message):
    run_dir = tmp_path / "run"
    proc = run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, *extra), check=False, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_missing_data_and_recipe(tmp_path):
    """Also the older spelling of the recipe, --recipe=NAME, which the speedrun's command line still takes."""
    proc = run_module("modded_nanogpt.train_gpt", "--recipe=tiny_cpu", f"--data_dir={tmp_path / 'nope'}",
                      f"--run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'nope'}: data directory not found" in proc.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    proc = run_module("modded_nanogpt.train_gpt", "--recipe=tiny_cpu", f"--data_dir={tmp_path / 'empty'}",
                      f"--run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "no train shards" in proc.stderr
    with pytest.raises(ConfigError, match="no recipe 'speedy'.*known recipes: .*tiny_cpu"):
        parse_hyperparameters(["--recipe=speedy"])


def test_disable_fp8_env_and_list_flags(monkeypatch):
    assert parse_hyperparameters([]).fp8
    monkeypatch.setenv("DISABLE_FP8", "1")
    assert not parse_hyperparameters([]).fp8
    assert parse_hyperparameters(["--fp8=True"]).fp8  # the command line still wins
    assert parse_hyperparameters(["--paired_head_layers=none"]).paired_head_layers == []
    assert parse_hyperparameters(["--paired_head_layers=1,3"]).paired_head_layers == [1, 3]


# ---- the optimizer step against slow references --------------------------------------------------------------

def slow_adam(p0, grads, lrs, beta1, beta2, eps, weight_decay):
    """The record's Adam, element by element in Python floats, written from the published formulas:
    m, v EMAs; update = m / (sqrt(v) + eps) * lr sqrt(1 - beta2^t) / (1 - beta1^t); then
    p <- p - update - lr^2 * weight_decay * p where update * p > 0 (p before the step)."""
    values = p0.double().flatten().tolist()
    m, v = [0.0] * len(values), [0.0] * len(values)
    for t, (grad, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        for i, g in enumerate(grad.double().flatten().tolist()):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            update = m[i] / (v[i] ** 0.5 + eps) * lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
            decay = lr * lr * weight_decay * values[i] if update * values[i] > 0 else 0.0
            values[i] -= update + decay
    return torch.tensor(values, dtype=torch.float64).view(p0.shape)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_adam_update_matches_the_reference_and_the_formulas(dtype, tol):
    """adam_update (on CPU the reference math) and adam_update_reference against slow_adam, 5 steps from fresh
    random gradients with a changing learning rate and a decay strong enough to show (lr^2 c up to 0.16). The
    last column's gradient is always 0: a zero update, which the strict mask (update * p > 0) leaves undecayed."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, 5, generator=g, dtype=dtype)
    p0, ref = p.clone(), p.clone()
    grads = [torch.randn(7, 5, generator=g, dtype=dtype) for _ in range(5)]
    for grad in grads:
        grad[:, -1] = 0
    lrs = [0.1, 0.2, 0.15, 0.05, 0.2]
    state, ref_state = {}, {}
    for grad, lr in zip(grads, lrs, strict=True):
        adam_update(p, grad, state, lr, 0.8, 0.95, 1e-10, 4.0)
        adam_update_reference(ref, grad, ref_state, lr, 0.8, 0.95, 1e-10, 4.0)
    expected = slow_adam(p0, grads, lrs, 0.8, 0.95, 1e-10, 4.0)
    torch.testing.assert_close(p.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(ref.double(), expected, rtol=tol, atol=tol)
    assert torch.equal(p[:, -1], p0[:, -1])
    assert state["step"] == 5 and state["exp_avg"].dtype == dtype


# The record's Adam groups: (betas, lr_mul, wd_mul) with adam lr 0.008 and weight_decay 0.005, so c = 0.005 * wd_mul
# and the decay per step at schedule multiplier 1 is (0.008 * lr_mul)^2 * c; the published figure where given.
PUBLISHED_ADAM_GROUPS = [
    ("value/bigram embeddings", (0.75, 0.95), 75, 5, "9.0e-03"),
    ("lm_head, token embedding", (0.5, 0.95), 1, 150, "4.8e-05"),
    ("x0 lambdas", (0.65, 0.95), 5, 0, None),
    ("other scalars", (0.9, 0.99), 5, 0, None),
    ("smear gate", (0.9, 0.99), 0.01, 0, None),
    ("skip gate", (0.9, 0.99), 0.05, 0, None),
    ("attention, value-embedding gates", (0.9, 0.99), 1, 1, None),
]


@pytest.mark.parametrize("name, betas, lr_mul, wd_mul, published", PUBLISHED_ADAM_GROUPS)
def test_adam_decay_per_step_of_the_published_groups(name, betas, lr_mul, wd_mul, published):
    """The part of one Adam step proportional to p is (0.008 * lr_mul)^2 * 0.005 * wd_mul where the update and p
    have the same sign, and nothing where they differ. The update does not depend on p: a step from p = 0 gives
    it, and a p signed against it (mask all false) and one signed with it (mask all true) give the decay."""
    lr, c = 0.008 * lr_mul, 0.005 * wd_mul
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(6, 9, generator=g, dtype=torch.float64)
    magnitude = torch.rand(6, 9, generator=g, dtype=torch.float64) + 0.5

    def one_step(p0):
        p = p0.clone()
        adam_update(p, grad, {}, lr, *betas, 1e-10, c)
        return p

    update = -one_step(torch.zeros_like(grad))
    assert torch.all(update != 0)
    with_update, against_update = magnitude * update.sign(), -magnitude * update.sign()
    decay = (with_update - update - one_step(with_update)) / with_update
    torch.testing.assert_close(decay, torch.full_like(decay, lr * lr * c), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(one_step(against_update), against_update - update, rtol=0, atol=1e-15)
    if published is not None:
        assert f"{lr * lr * c:.1e}" == published, name


@pytest.mark.gpu
def test_gpu_adam_update_matches_the_reference(monkeypatch):
    """The Triton path against adam_update_reference on the GPU and against slow_adam's float64 math (on a CPU
    copy), over fresh random inputs: 5 steps, a changing learning rate, an odd size, a non-contiguous
    gradient. After the first step nothing recompiles the kernel and nothing makes the host wait."""
    import triton

    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(1000, 77, generator=g, device="cuda")
    p0, ref = p.clone(), p.clone()
    grads = [torch.randn(77, 1000, generator=g, device="cuda").T if i == 2 else
             torch.randn(1000, 77, generator=g, device="cuda") for i in range(5)]
    for grad in grads:
        grad[:, -1] = 0  # zero updates: the strict mask leaves them undecayed
    lrs = [0.1, 0.2, 0.15, 0.05, 0.2]
    state, ref_state = {}, {}
    for grad, lr in zip(grads, lrs, strict=True):
        adam_update_reference(ref, grad, ref_state, lr, 0.8, 0.95, 1e-10, 4.0)
    adam_update(p, grads[0], state, lrs[0], 0.8, 0.95, 1e-10, 4.0)
    torch.cuda.synchronize()
    # The kernel has run once: from here on it must neither compile again, nor fall back, nor wait.
    compiles = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda **info: compiles.append(info))
    monkeypatch.setattr("modded_nanogpt.dist_optim._adam_math", lambda *a: pytest.fail("the reference ran"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grad, lr in zip(grads[1:], lrs[1:], strict=True):
            adam_update(p, grad, state, lr, 0.8, 0.95, 1e-10, 4.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert compiles == []
    torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(p[:, -1], p0[:, -1])
    expected = slow_adam(p0.cpu(), [x.cpu() for x in grads], lrs, 0.8, 0.95, 1e-10, 4.0)
    torch.testing.assert_close(p.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_normuon_update_of_a_slice_equals_the_update_of_the_whole_bank():
    """Sharding is exact: NorMuon works matrix by matrix, so updating slices (what each rank does) with their own
    lr_muls equals updating the whole bank at once with all of them."""
    g = torch.Generator().manual_seed(1)
    whole = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)
    halves = whole.clone()
    lr_muls = torch.tensor([1.0, 2.0, 0.5, 2.0], dtype=torch.float64).view(4, 1, 1)
    whole_state, half_states = {}, [{}, {}]
    for momentum in (0.85, 0.9, 0.95):
        grad = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)
        normuon_update(whole, grad, whole_state, lr=0.02, momentum=momentum, beta2=0.95, weight_decay=1.2,
                       lr_mul=lr_muls)
        for r in range(2):
            rows = slice(2 * r, 2 * r + 2)
            normuon_update(halves[rows], grad[rows], half_states[r], lr=0.02, momentum=momentum, beta2=0.95,
                           weight_decay=1.2, lr_mul=lr_muls[rows])
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=1e-12)


def test_speedrun_optimizer_single_rank_updates_banks_and_accumulates_adam():
    """One rank: the bank's step is normuon_update with the bank's lr_muls and the momentum passed to step (or
    the constructor's); Adam waits for the Adam step, then applies the summed gradient; a checkpoint round
    trip keeps the states."""
    g = torch.Generator().manual_seed(2)
    bank = torch.nn.Parameter(torch.randn(2, 2, 8, 4, generator=g, dtype=torch.float64))
    head = torch.nn.Parameter(torch.randn(4, 6, generator=g, dtype=torch.float64))

    def build():
        return SpeedrunOptimizer([BankSpec("bank", bank, (4, 8, 4), lr_muls=[1, 2, 1, 2])],
                                 [AdamGroup("head", [head], 0.01, (0.8, 0.95), 3.0)], muon_lr=0.02,
                                 muon_momentum=0.95, muon_beta2=0.95, muon_weight_decay=1.2, adam_eps=1e-10)

    opt = build()
    lr_muls = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64).view(4, 1, 1)
    expected_bank, expected_head = bank.detach().clone().view(4, 8, 4), head.detach().clone()
    muon_state, adam_state = {}, {}
    grads = [(torch.randn(2, 2, 8, 4, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64))
             for _ in range(3)]
    bank.grad, head.grad = grads[0][0].clone(), grads[0][1].clone()
    opt.step(lr_multiplier=0.5, adam_step=False, muon_momentum=0.85)  # Adam waits: the head's gradient stays
    normuon_update(expected_bank, grads[0][0].view(4, 8, 4), muon_state, lr=0.01, momentum=0.85, beta2=0.95,
                   weight_decay=1.2, lr_mul=lr_muls)
    assert bank.grad is None and torch.equal(head.grad, grads[0][1]) and torch.equal(head.detach(), expected_head)
    bank.grad = grads[1][0].clone()
    head.grad += grads[1][1]
    opt.step(lr_multiplier=1.0, adam_step=True, muon_momentum=0.9)
    normuon_update(expected_bank, grads[1][0].view(4, 8, 4), muon_state, lr=0.02, momentum=0.9, beta2=0.95,
                   weight_decay=1.2, lr_mul=lr_muls)
    adam_update_reference(expected_head, grads[0][1] + grads[1][1], adam_state, 0.01, 0.8, 0.95, 1e-10, 3.0)
    torch.testing.assert_close(bank.detach().view(4, 8, 4), expected_bank, rtol=0, atol=0)
    torch.testing.assert_close(head.detach(), expected_head, rtol=0, atol=0)
    assert head.grad is None
    bank.grad = grads[2][0].clone()
    opt.step(lr_multiplier=1.0, adam_step=False)  # no momentum given: the constructor's 0.95
    normuon_update(expected_bank, grads[2][0].view(4, 8, 4), muon_state, lr=0.02, momentum=0.95, beta2=0.95,
                   weight_decay=1.2, lr_mul=lr_muls)
    torch.testing.assert_close(bank.detach().view(4, 8, 4), expected_bank, rtol=0, atol=0)
    # A checkpoint round trip keeps the states.
    saved = opt.state_dict()
    opt2 = build()
    opt2.load_state_dict(saved)
    for key in ("momentum_buffer", "second_moment"):
        torch.testing.assert_close(opt2.muon_state["bank"][key], muon_state[key], rtol=0, atol=0)
    assert opt2.adam_state[id(head)]["step"] == 1
    with pytest.raises(ValueError, match="3 lr_muls for 4 matrices"):
        BankSpec("bank", bank, (4, 8, 4), lr_muls=[1, 2, 1])


def untied_pair(device):
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Parameter(torch.randn(4, 6, generator=g).to(device))
    embed = torch.nn.Parameter(head.detach().T.contiguous())  # as the model's own (V, D) table
    opt = SpeedrunOptimizer([], [AdamGroup("head", [head], 0.01, (0.8, 0.95), 0.0),
                                 AdamGroup("embeddings", [embed], 0.01, (0.8, 0.95), 0.0)], 0.02, 0.95, 0.95, 0.0, 1e-10)
    head.grad = torch.randn(4, 6, generator=g).to(device)
    opt.step(lr_multiplier=1.0, adam_step=True)
    opt.copy_adam_state(head, embed, transform=lambda t: t.T if t.ndim == 2 else t)
    return head, embed, opt


def test_untie_carries_the_adam_moments_laid_out_as_the_embedding():
    """The untie step copies the head's moments, transposed, to the embedding: same values, the embedding's own
    (contiguous) strides, and the step count. A transposed clone kept the head's strides, which would send the
    embedding's Adam steps past the Triton kernel to the slow reference."""
    head, embed, opt = untied_pair("cpu")
    carried, source = opt.adam_state[id(embed)], opt.adam_state[id(head)]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(carried[key], source[key].T)
        assert carried[key].stride() == embed.stride()
    assert carried["step"] == 1


@pytest.mark.gpu
def test_gpu_adam_step_after_the_untie(monkeypatch):
    """The embedding's first Adam step with the carried moments (step count 2) runs in the Triton kernel, not
    the reference, and matches the reference."""
    head, embed, opt = untied_pair("cuda")
    expected, state = embed.detach().clone(), {k: (v.clone() if torch.is_tensor(v) else v)
                                              for k, v in opt.adam_state[id(embed)].items()}
    embed.grad = torch.randn_like(embed)
    adam_update_reference(expected, embed.grad.clone(), state, 0.01, 0.8, 0.95, 1e-10, 0.0)
    monkeypatch.setattr("modded_nanogpt.dist_optim._adam_math", lambda *a: pytest.fail("the reference ran"))
    opt.step(lr_multiplier=1.0, adam_step=True)
    assert opt.adam_state[id(embed)]["step"] == 2
    torch.testing.assert_close(embed.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_gpu_train_steps_never_wait_for_the_device(char_corpus):
    """The host queues step after step without waiting for the GPU: once a step shape has run, train_step (rows
    gathered and scatter-added, forward, backward, NorMuon, Adam on odd steps, the stage's hooks) and the queued
    reading of its loss raise nothing under torch.cuda.set_sync_debug_mode("error"). (The per-step
    set_long_window read a CUDA buffer and so drained the GPU before every step.)"""
    hp = parse_hyperparameters(tiny(char_corpus, "unused", "--device=cuda"))
    train_files = resolve_data(hp)[0]  # also reads the vocabulary and end-of-text id from corpus.json
    rt = Runtime(0, 0, 1, torch.device("cuda"))
    model = GPT(model_config(hp)).cuda()
    model.attention_backend, model.embedding_grads = "sdpa", hp.embedding_grads
    schedule = schedule_of(hp)
    plan = schedule.at(schedule.stage_starts[2])
    model.untie()
    optimizer = build_optimizer(model, hp, rt)
    loader = DistributedBOSLoader(train_files, plan.batch_tokens // TOTAL_MICRO_STEPS, hp.seq_len, hp.bos_id,
                                  device=rt.device)
    plans = [dataclasses.replace(plan, untie_after=False, adam_step=odd) for odd in (False, True)]
    readings = StepReadings(rt)
    for p in plans:  # first allocations, cached device constants, the window's first setting
        readings.queue(train_step(model, model, optimizer, loader, p, rt), False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in plans * 2:
            readings.queue(train_step(model, model, optimizer, loader, p, rt), False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_run_sh(char_corpus, tmp_path):
    """run.sh: torchrun --standalone over NUM_GPUS processes; other counts are refused before torchrun starts."""
    bad = subprocess.run(["bash", "modded_nanogpt/run.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                         env=dict(os.environ, NUM_GPUS="3"))
    assert bad.returncode == 2 and "NUM_GPUS must be 1, 2, 4 or 8 (got '3')" in bad.stderr
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", "modded_nanogpt/run.sh", *tiny(char_corpus, run_dir, *THREE_STEPS)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, NUM_GPUS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_metrics(run_dir)[-1]["kind"] == "end"


def test_validation_forwards_are_262144_tokens_in_eval_mode(char_corpus):
    """Published validation: forwards of 262,144 tokens per rank whatever the stage (the default
    val_batch_tokens), with the model in eval mode (its head in bf16 without fp8: GPT.eval_loss) and no
    gradients; the model is back in train mode afterwards and no gradient is left behind."""
    from modded_nanogpt.train_gpt import Hyperparameters, validate
    from nanogpt.data.shards import find_shards

    assert Hyperparameters().val_batch_tokens == 262_144 and Hyperparameters().val_tokens == 10_485_760
    hp = parse_hyperparameters(["--recipe=tiny_cpu", f"--data_dir={char_corpus}", "--val_tokens=3072",
                                "--val_batch_tokens=768"])
    resolve_data(hp)
    torch.manual_seed(0)
    model = GPT(model_config(hp))
    calls = []

    def spy(inputs, *args):
        calls.append((inputs.numel(), model.training, torch.is_grad_enabled(), args[4]))
        return model(inputs, *args)

    loss = validate(model, spy, find_shards(char_corpus, "val"), hp, Runtime(0, 0, 1, torch.device("cpu")), 1, 2)
    assert calls == [(768, False, False, 768.0)] * 4
    assert model.training and all(p.grad is None for p in model.parameters())
    assert 0 < loss < 10


def test_validation_windows_and_yarn_as_published():
    """A validation after s steps uses the windows (and YaRN) of step s, as the published loop advances its
    schedule before validating; the final one widens the long window to 20 blocks without a YaRN rescale."""
    from modded_nanogpt.train_gpt import Hyperparameters, validation_windows

    hp = Hyperparameters(vocab_size=256, bos_id=0, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                         attention_skip_layers=[2], long_window_layers=[1, 3], paired_head_layers=[0],
                         value_embed_layers=[0, 3], skip_from=0, skip_to=2, backout_layer=2, fp8=False)
    schedule = schedule_of(hp)
    model = GPT(model_config(hp))
    model.set_long_window(3)
    assert validation_windows(model, schedule, 500) == (1, 3) and model.yarn_tokens == 3 * 128
    assert validation_windows(model, schedule, 505) == (3, 7) and model.yarn_tokens == 7 * 128
    for long in (11, 13):
        model.set_long_window(long)
    scale = model.temperature
    assert validation_windows(model, schedule, 1555) == (6, 20)
    assert model.yarn_tokens == 13 * 128 and model.temperature == scale  # no rescale for the final window


def test_validation_scores_the_contiguous_val_stream(char_corpus):
    """Validation reads the first val_tokens of the val split as they are (the speedrun's val loader): the
    loss is the mean over forwards of the model's next-token loss on consecutive slices of the stream, the
    same whatever seq_len (training's document clipping does not apply)."""
    from modded_nanogpt.data.loader import read_shard
    from modded_nanogpt.train_gpt import validate
    from nanogpt.data.shards import find_shards

    hp = parse_hyperparameters(["--recipe=tiny_cpu", f"--data_dir={char_corpus}", "--val_tokens=3072",
                                "--val_batch_tokens=512"])
    resolve_data(hp)
    torch.manual_seed(0)
    model = GPT(model_config(hp))
    rt = Runtime(0, 0, 1, torch.device("cpu"))
    val_files = find_shards(char_corpus, "val")
    stream = torch.from_numpy(read_shard(val_files[0])[: 3072 + 1].astype("int64"))
    with torch.no_grad():
        reference = sum(model(stream[i : i + 512].int(), stream[i + 1 : i + 513], 1, 2).item()
                        for i in range(0, 3072, 512)) / 3072
    got = validate(model, model, val_files, hp, rt, 1, 2)
    assert abs(got - reference) < 1e-5 * reference
    hp.seq_len = 64  # documents are not clipped in validation
    assert validate(model, model, val_files, hp, rt, 1, 2) == got


def test_val_tokens_beyond_the_val_split_fail_before_any_write(char_corpus, tmp_path):
    import json

    available = json.loads((char_corpus / "corpus.json").read_text())["num_tokens"]["val"]
    too_many = (available // 1024 + 1) * 1024
    proc = run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, tmp_path / "run", f"--val_tokens={too_many}",
                                                        "--val_batch_tokens=1024"), check=False)
    assert proc.returncode == 2 and f"val_tokens={too_many}: the val shards of {char_corpus} hold" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_optimizer_flag_moves_the_banks_to_adamw():
    from modded_nanogpt.model import GPT
    from modded_nanogpt.train_gpt import Runtime, build_optimizer, model_config

    hp = parse_hyperparameters(["--recipe=tiny_cpu", "--vocab_size=128", "--bos_id=0"])
    model = GPT(model_config(hp))
    rt = Runtime(0, 0, 1, torch.device("cpu"))
    normuon = build_optimizer(model, hp, rt)
    assert [b.name for b in normuon.banks] == ["attn_bank", "mlp_bank"]
    assert all(model.attn_bank is not p for g in normuon.adam_groups for p in g.params)
    hp.optimizer = "adamw"
    adamw = build_optimizer(model, hp, rt)
    assert adamw.banks == []
    matrices = [g for g in adamw.adam_groups if g.name == "matrices"][0]
    assert matrices.every_step and {id(p) for p in matrices.params} == {id(model.attn_bank), id(model.mlp_bank)}


def test_the_trainer_builds_the_published_adam_groups_and_normuon_multipliers():
    """build_optimizer with the defaults: for one parameter of each group, the published betas, learning rate
    (0.008 x lr_mul) and decay per Adam step at multiplier 1 ((0.008 x lr_mul)^2 x 0.005 x wd_mul); the MLP
    bank's down projections (odd matrices of [up_0, down_0, up_1, ...]) at 2x NorMuon's learning rate."""
    hp = parse_hyperparameters(["--vocab_size=256", "--bos_id=0"])  # default model, a small vocabulary
    model = GPT(model_config(hp))
    opt = build_optimizer(model, hp, Runtime(0, 0, 1, torch.device("cpu")))
    group_of = {id(p): g for g in opt.adam_groups for p in g.params}
    published = {  # parameter: (betas, lr, decay per Adam step at lr multiplier 1)
        "value_embeds": ((0.75, 0.95), 0.6, 9.0e-3), "bigram_embed": ((0.75, 0.95), 0.6, 9.0e-3),
        "lm_head_t": ((0.5, 0.95), 0.008, 4.8e-5), "embed": ((0.5, 0.95), 0.008, 4.8e-5),
        "x0_lambdas": ((0.65, 0.95), 0.04, 0.0), "scalars": ((0.9, 0.99), 0.04, 0.0),
        "smear_gate": ((0.9, 0.99), 8e-5, 0.0), "skip_gate": ((0.9, 0.99), 4e-4, 0.0),
        "attn_gate": ((0.9, 0.99), 0.008, 3.2e-7), "ve_gate": ((0.9, 0.99), 0.008, 3.2e-7),
    }
    adam_names = {n for n, p in model.named_parameters() if id(p) in group_of}
    assert adam_names == set(published)
    for name, (betas, lr, decay) in published.items():
        group = group_of[id(getattr(model, name))]
        assert group.betas == betas and group.lr == pytest.approx(lr), name
        assert group.lr**2 * group.weight_decay == pytest.approx(decay, rel=1e-9, abs=1e-20), name
    assert not group_of[id(model.embed)].every_step and opt.adam_eps == 1e-10
    mlp = [b for b in opt.banks if b.name == "mlp_bank"][0]
    assert mlp.shape == (24, 3072, 768) and list(mlp.lr_muls) == [1.0, 2.0] * 12
    assert [b for b in opt.banks if b.name == "attn_bank"][0].lr_muls is None
    assert opt.muon == dict(lr=0.023, momentum=0.95, beta2=0.95, weight_decay=1.2)


def test_micro_step_loss_is_the_token_sum_over_4_as_published(char_corpus):
    """Published: a micro-batch's loss is the sum over its tokens times 2 / accumulation steps, gradients averaged
    over ranks; here the sum / 4 (TOTAL_MICRO_STEPS / 2) with gradients summed over ranks: the same gradients at
    every world size. The FP8 head's gradient scale follows: 0.75 / 448 / 4. train_step returns the mean."""
    from modded_nanogpt.model import ModelConfig
    from modded_nanogpt.train_gpt import LOSS_DIVISOR

    assert TOTAL_MICRO_STEPS == 8 and LOSS_DIVISOR == 4.0
    assert ModelConfig().fp8_grad_scale == 0.75 / 448
    hp = parse_hyperparameters(tiny(char_corpus, "unused"))
    train_files = resolve_data(hp)[0]
    rt = Runtime(0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(model_config(hp))
    model.embedding_grads = "dense"
    optimizer = build_optimizer(model, hp, rt)
    plan = schedule_of(hp).at(0)
    loader = DistributedBOSLoader(train_files, plan.batch_tokens // TOTAL_MICRO_STEPS, hp.seq_len, hp.bos_id)
    seen = []

    def spy(inputs, targets, short, long, mtp, divisor, *rest, with_next_token=False):
        loss, next_token = model(inputs, targets, short, long, mtp, divisor, *rest, with_next_token=with_next_token)
        summed = model(inputs, targets, short, long, mtp, 1.0, *rest).detach()
        next_summed = model(inputs, targets, short, long, (1.0,), 1.0, *rest).detach()
        seen.append((divisor, loss.detach(), summed, next_token, next_summed))
        return loss, next_token

    next_mean, mtp_mean = train_step(model, spy, optimizer, loader, plan, rt)
    assert len(plan.mtp_weights) > 1  # the first stage: the two means differ
    assert [entry[0] for entry in seen] == [4.0] * 8
    for _, loss, summed, next_token, next_summed in seen:
        torch.testing.assert_close(loss, summed / 4)
        torch.testing.assert_close(next_token, next_summed / 4)
    torch.testing.assert_close(mtp_mean, sum(entry[2] for entry in seen) / plan.batch_tokens)
    torch.testing.assert_close(next_mean, sum(entry[4] for entry in seen) / plan.batch_tokens)
    assert mtp_mean > next_mean


def test_each_trainer_refuses_a_run_directory_of_the_other(char_corpus, tmp_path):
    """The README's two tiny examples once shared runs/tiny: the speedrun died on a KeyError ('num_layers') in the
    baseline's checkpoint, the baseline skipped the speedrun's checkpoint and trained over its directory. Each now
    stops (exit 2) naming the directory and its trainer, and changes nothing there."""
    baseline, speedrun = tmp_path / "baseline", tmp_path / "speedrun"
    run_module("nanogpt.train", "tiny_cpu", f"--data_dir={char_corpus}", f"--run_dir={baseline}", "--max_iters=2",
               "--eval_interval=2", "--eval_iters=1")
    run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, speedrun, *THREE_STEPS))
    for run_dir in (baseline, speedrun):
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        if run_dir == baseline:
            proc = run_module("modded_nanogpt.train_gpt", *tiny(char_corpus, run_dir, *THREE_STEPS), check=False)
            message = f"{run_dir} holds a run of the baseline trainer (nanogpt.train"
        else:
            proc = run_module("nanogpt.train", "tiny_cpu", f"--data_dir={char_corpus}", f"--run_dir={run_dir}",
                              "--max_iters=2", check=False)
            message = f"{run_dir} holds a run of the speedrun trainer (modded_nanogpt.train_gpt"
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("module", ["modded_nanogpt.train_gpt", "nanogpt.train"])
def test_a_token_id_outside_the_vocabulary_and_an_unwritable_run_dir_are_named(char_corpus, tmp_path, module):
    """Each in one line, exit non-zero, before training: a shard holding a token id the vocabulary lacks (it
    failed as an IndexError at the first evaluation, a device-side assert on a GPU, or a misleading loader
    error), and a run directory that cannot be created (here: under a file; root ignores read-only bits)."""
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(char_corpus, data)
    val = sorted(data.glob("*val*.bin"))[0]
    tokens = np.memmap(val, dtype="<u2", mode="r+", offset=1024)
    tokens[100] = 60000
    tokens.flush()
    del tokens
    base = (["tiny_cpu", *THREE_STEPS]
            if module.startswith("modded") else ["tiny_cpu", "--max_iters=2"])
    proc = run_module(module, *base, f"--data_dir={data}", f"--run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{val}: token id 60000 is outside the vocabulary of" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "a_file").write_text("")
    proc = run_module(module, *base, f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'a_file' / 'run'}",
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot write to the run directory {tmp_path / 'a_file' / 'run'}: Not a directory" in proc.stderr


def test_a_checkpoint_that_cannot_be_written_is_named_with_the_free_space(char_corpus, tmp_path, monkeypatch):
    """A full disk ended in torch's "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos",
    naming neither the file nor the cause. Now: the checkpoint's path, the reason and the free space, and
    the checkpoints already written stay."""
    from nanogpt.rundir import RunDirError

    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    with pytest.raises(RunDirError) as err:
        main(tiny(char_corpus, run_dir, "--num_iterations=4", "--extension_iterations=0", "--val_every=0",
                  "--save_checkpoints=2,3"))
    assert f"cannot write the checkpoint {run_dir / 'ckpt' / 'step_0000003.pt'}: " in str(err.value)
    assert "unexpected pos" in str(err.value) and "free there" in str(err.value)
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["step_0000002.pt"]


def test_attention_backend_selection_on_cpu():
    from modded_nanogpt.model import select_attention_backend

    cpu = torch.device("cpu")
    assert select_attention_backend("auto", cpu) == "sdpa"
    for backend in ("flex", "fa3", "fa4"):
        with pytest.raises(ValueError, match=f"attention_backend={backend} needs CUDA"):
            select_attention_backend(backend, cpu)
    with pytest.raises(ValueError, match="must be one of auto, fa3, fa4, flex, sdpa, got 'xformers'"):
        select_attention_backend("xformers", cpu)


@pytest.fixture
def attention_modules(monkeypatch):
    """Stand-ins for the attention packages a GPU node may have, on a pretend CUDA device of compute capability
    `major`: set(fa3_built=..., hub=..., fa4=..., major=...) installs them; select() then picks a backend."""
    import types

    from modded_nanogpt import model as modded_model

    gets = []

    def install(fa3_built=False, hub=None, fa4=False, major=9):
        modded_model.fa3_interface.cache_clear()
        monkeypatch.setattr(modded_model, "cuda_major", lambda device: major)
        built = types.SimpleNamespace(flash_attn_varlen_func=lambda *a, **k: "fa3 built")
        monkeypatch.setitem(sys.modules, "flash_attn_interface", built if fa3_built else None)
        if hub is None:
            monkeypatch.setitem(sys.modules, "kernels", None)
        else:
            def get_kernel(repo):
                gets.append(repo)
                if hub == "offline":
                    raise OSError("cannot reach the hub")
                fn = types.SimpleNamespace(flash_attn_varlen_func=lambda *a, **k: "fa3 hub")
                return types.SimpleNamespace(flash_attn_interface=fn) if hub == "nested" else fn
            monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
        if fa4:
            interface = types.ModuleType("flash_attn.cute.interface")
            interface._flash_attn_fwd = interface._flash_attn_bwd = lambda *a, **k: None
            cute = types.ModuleType("flash_attn.cute")
            cute.interface = interface
            package = types.ModuleType("flash_attn")
            package.cute = cute
            for name, module in (("flash_attn", package), ("flash_attn.cute", cute),
                                 ("flash_attn.cute.interface", interface)):
                monkeypatch.setitem(sys.modules, name, module)
        else:
            for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
                monkeypatch.setitem(sys.modules, name, None)
        return gets

    yield install
    modded_model.fa3_interface.cache_clear()


def test_fa4_precompile_only_into_an_empty_fa4_disk_cache(tmp_path, monkeypatch):
    """The warmup's FA4 precompile child runs for fa4 on CUDA with FA4's disk cache on and its folder empty or
    absent; a folder that holds kernels already (a later run in the same folder of runs) gets none, nor do
    other backends, the CPU, or a cache turned off."""
    from modded_nanogpt.train_gpt import FA4_CACHE_DIR, FA4_CACHE_SWITCH, fa4_precompile_wanted

    cuda, folder = torch.device("cuda"), tmp_path / "flash_attn_cute"
    monkeypatch.setenv(FA4_CACHE_SWITCH, "1")
    monkeypatch.setenv(FA4_CACHE_DIR, str(folder))
    assert fa4_precompile_wanted("fa4", cuda)  # absent
    folder.mkdir()
    assert fa4_precompile_wanted("fa4", cuda)  # empty
    (folder / "c8c16f" / "tile_cumsum").mkdir(parents=True)  # what importing flash_attn.cute makes: no kernel yet
    assert fa4_precompile_wanted("fa4", cuda)
    assert not fa4_precompile_wanted("flex", cuda) and not fa4_precompile_wanted("fa4", torch.device("cpu"))
    (folder / "c8c16f" / "tile_cumsum" / "kernel.o").write_bytes(b"")
    assert not fa4_precompile_wanted("fa4", cuda)  # warm
    folder.joinpath("c8c16f", "tile_cumsum", "kernel.o").unlink()
    monkeypatch.setenv(FA4_CACHE_SWITCH, "0")
    assert not fa4_precompile_wanted("fa4", cuda)


def test_attention_backend_selection_with_stand_in_packages(attention_modules, monkeypatch):
    """auto: FA3 (a built flash_attn_interface, else the hub kernel through `kernels`), else FA4 on sm90/sm100,
    else flex; the log/provenance text names where the kernels came from; explicit backends that cannot run
    say why."""
    from modded_nanogpt.model import describe_attention_backend, fa3_interface, select_attention_backend

    cuda = torch.device("cuda")
    attention_modules(fa3_built=True, hub="flat", fa4=True)
    assert select_attention_backend("auto", cuda) == "fa3"
    assert describe_attention_backend("fa3") == "fa3 (flash_attn_interface)"
    assert fa3_interface()[0].flash_attn_varlen_func() == "fa3 built"

    for layout in ("flat", "nested"):
        gets = attention_modules(hub=layout, fa4=True)
        assert select_attention_backend("auto", cuda) == "fa3"
        assert gets[-1] == "kernels-community/flash-attn3"
        assert fa3_interface()[0].flash_attn_varlen_func() == "fa3 hub"
        assert describe_attention_backend("fa3") == "fa3 (kernels hub kernels-community/flash-attn3)"
    monkeypatch.setenv("MODDED_FA3_HUB_KERNEL", "someone/flash-attention-3")
    gets = attention_modules(hub="flat")
    assert select_attention_backend("auto", cuda) == "fa3" and gets[-1] == "someone/flash-attention-3"
    assert describe_attention_backend("fa3") == "fa3 (kernels hub someone/flash-attention-3)"
    monkeypatch.delenv("MODDED_FA3_HUB_KERNEL")

    attention_modules(hub="offline", fa4=True, major=9)
    assert select_attention_backend("auto", cuda) == "fa4"
    assert describe_attention_backend("fa4").startswith("fa4 (")
    with pytest.raises(ValueError, match=r"fa3 but FlashAttention 3 cannot be loaded \(kernels.get_kernel"):
        select_attention_backend("fa3", cuda)
    attention_modules(fa4=True, major=10)
    assert select_attention_backend("auto", cuda) == "fa4" and select_attention_backend("fa4", cuda) == "fa4"

    attention_modules(fa4=True, major=8)  # an A100: FA4 has no sm80 kernels
    assert select_attention_backend("auto", cuda) == "flex"
    with pytest.raises(ValueError, match="fa4 needs a Hopper .sm90. or Blackwell .sm100. GPU, this one is sm8x"):
        select_attention_backend("fa4", cuda)

    attention_modules(major=9)  # nothing installed
    assert select_attention_backend("auto", cuda) == "flex"
    with pytest.raises(ValueError, match="fa4 but flash_attn.cute does not import .* ATTENTION=fa4 bash setup_env.sh"):
        select_attention_backend("fa4", cuda)
    with pytest.raises(ValueError, match="neither flash_attn_interface nor the kernels package is importable"):
        select_attention_backend("fa3", cuda)
    assert select_attention_backend("flex", cuda) == "flex"


def test_model_defaults_are_the_same_in_both_dataclasses():
    """Hyperparameters repeats the model's fields so that every setting shows in one place with a comment;
    the two must not drift apart."""
    import dataclasses

    from modded_nanogpt.model import ModelConfig
    from modded_nanogpt.train_gpt import Hyperparameters, model_config

    shared = {f.name for f in dataclasses.fields(ModelConfig)} & {f.name for f in dataclasses.fields(Hyperparameters)}
    assert {"num_layers", "paired_head_layers", "value_embed_layers", "long_window_layers", "fp8"} <= shared
    model_defaults = dataclasses.asdict(ModelConfig())
    assert {k: v for k, v in dataclasses.asdict(model_config(Hyperparameters())).items() if k in shared} == \
        {k: model_defaults[k] for k in shared}


def test_a_finished_run_run_again_is_left_as_it_is(char_corpus, tmp_path):
    """The same command on a run that finished (a requeued job, a sweep submitted again) trains, compiles and
    rewrites nothing: its end record (warmup, peak memory) stays the run's. Killed after the final checkpoint but
    before the end record, it writes the end record (no warmup or peak of its own) and leaves the checkpoint."""
    run_dir = tmp_path / "run"
    args = tiny(char_corpus, run_dir, *THREE_STEPS)
    run_module("modded_nanogpt.train_gpt", *args)
    before = run_files(run_dir)
    again = run_module("modded_nanogpt.train_gpt", *args)
    assert f"{run_dir} already finished its 3 steps" in again.stdout and "nothing to do" in again.stdout
    assert "resumed" not in again.stdout
    assert run_files(run_dir) == before
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    end = json.loads(lines[-1])
    assert end["kind"] == "end" and end["step"] == 3 and end["warmup_s"] is not None
    metrics.write_text("".join(line + "\n" for line in lines[:-1]))
    checkpoint = (run_dir / "ckpt" / "step_0000003.pt").read_bytes()
    resumed = run_module("modded_nanogpt.train_gpt", *args)
    assert "resumed from step 3" in resumed.stdout and "already finished" not in resumed.stdout
    new_end = read_metrics(run_dir)[-1]
    assert new_end["kind"] == "end" and new_end["step"] == 3 and new_end["final_val_loss"] == end["final_val_loss"]
    assert new_end["warmup_s"] is None and new_end["peak_memory_bytes"] is None
    assert (run_dir / "ckpt" / "step_0000003.pt").read_bytes() == checkpoint


def test_the_gpu_benchmark_script_on_two_cpu_ranks(char_corpus, tmp_path):
    """modded_nanogpt/bench/gpu_session.sh (the one-call benchmark on a GPU machine) through torchrun on 2 CPU ranks
    with the tiny recipe: a summary row per stage; a second call writes a new run directory instead of finding the
    first run ended; a trainer that fails makes the script fail and say so (not a traceback from the summary)."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), NUM_GPUS="2", DATA=str(char_corpus), STEPS="9", TESTS="0",
               VAL_TOKENS="8192", OMP_NUM_THREADS="1",
               EXTRA="--recipe=tiny_cpu --extension_iterations=0 --val_every=0")
    runs = []
    for _ in range(2):
        proc = subprocess.run(["bash", "modded_nanogpt/bench/gpu_session.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert re.search(r"^2 \| 6144 \| \d+ \| [\d.]+ \| [\d,]+$", proc.stdout, re.M), proc.stdout
        runs.append(re.search(r"^run directory: (\S+)$", proc.stdout, re.M).group(1))
        time.sleep(1.1)  # run directories are named by the second
    assert runs[0] != runs[1] and all(json.loads((Path(r) / "config.json").read_text())["num_iterations"] == 9
                                      for r in runs)
    failed = subprocess.run(["bash", "modded_nanogpt/bench/gpu_session.sh"], cwd=REPO_ROOT, env=dict(env, STEPS="3"),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "error: the trainer exited with status 1" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_the_log_says_how_the_lm_head_runs(monkeypatch):
    """fp8 tensor cores from sm_89 (H100, L40S); an A100 runs the fp8 head simulated in float32, slower than a
    bf16 head, and the log says so and how to switch it off; CPU runs have no fp8 head."""
    cuda = torch.device("cuda", 0)

    def capability(cc):  # kernels.has_fp8_tensor_cores caches its answer per device: forget it with each change
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
        kernels.has_fp8_tensor_cores.cache_clear()

    try:
        capability((9, 0))
        assert lm_head_mode(True, cuda) == "fp8 (torch._scaled_mm)"
        capability((8, 9))
        assert lm_head_mode(True, cuda) == "fp8 (torch._scaled_mm)"
        capability((8, 0))
        slow = lm_head_mode(True, cuda)
        assert slow.startswith("fp8 simulated in float32: sm_80 has no fp8 tensor cores") and "--fp8=False" in slow
        assert lm_head_mode(False, cuda) == "bf16 (fp8 off)"
        assert lm_head_mode(True, torch.device("cpu")) == "float32 (fp8 runs on GPUs only)"
        assert lm_head_mode(False, torch.device("cpu")) == "float32 (fp8 off)"
    finally:
        kernels.has_fp8_tensor_cores.cache_clear()  # the real device's answer, not a faked one, from now on


def test_sampling_from_a_speedrun_run_and_its_errors(char_corpus, tmp_path):
    """python -m modded_nanogpt.sample: from a run's newest checkpoint or a checkpoint file, the same text for the
    same seed, continuing the prompt; the speedrun's checkpoints had no sampler (nanogpt.sample refuses them).
    Bad requests are named; a baseline checkpoint is pointed to nanogpt.sample."""
    from modded_nanogpt import sample
    from nanogpt.config import ConfigError

    run_dir = tmp_path / "run"
    main(tiny(char_corpus, run_dir, *THREE_STEPS))
    args = ["--start=def ", "--num_samples=2", "--max_new_tokens=20", "--device=cpu"]
    from_run = sample.main([f"--run_dir={run_dir}", *args])
    from_file = sample.main([f"--checkpoint={run_dir / 'ckpt' / 'step_0000003.pt'}", *args])
    assert from_run == from_file and len(from_run) == 2
    assert all(text.startswith("def ") and len(text) > len("def ") for text in from_run)
    assert from_run[0] != from_run[1]  # two draws, not one repeated
    proc = run_module("modded_nanogpt.sample", f"--run_dir={run_dir}", "--num_samples=1", "--max_new_tokens=5",
                      "--device=cpu")
    assert "--- sample 1/1 ---" in proc.stdout
    baseline = tmp_path / "baseline"
    run_module("nanogpt.train", "tiny_cpu", f"--data_dir={char_corpus}", f"--run_dir={baseline}", "--max_iters=2",
               "--eval_interval=2", "--eval_iters=1")
    damaged = tmp_path / "step_0000001.pt"
    damaged.write_bytes(b"not a checkpoint")
    for bad, message in (([], "exactly one of --run_dir or --checkpoint"),
                         ([f"--run_dir={tmp_path / 'none'}"], "not found"),
                         ([f"--checkpoint={damaged}"], f"checkpoint {damaged}: cannot be read"),
                         ([f"--run_dir={baseline}"], "not a checkpoint of the speedrun trainer (for the baseline")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            sample.main(bad + args)


def test_flash_boundaries_have_one_length_for_every_batch():
    """FA3/FA4 read cu_seqlens inside the compiled graph: padded with the token count (empty documents) to 1,024
    entries whatever the number of documents, so a new count does not compile the graph again; a batch of more
    documents takes the next power of two, never more than tokens + 1 entries."""
    import types

    from modded_nanogpt.train_gpt import FLASH_BOUNDARY_SLOTS, flash_boundaries

    assert FLASH_BOUNDARY_SLOTS == 1024
    for backend in ("fa3", "fa4"):
        model = types.SimpleNamespace(attention_backend=backend)
        for cu, tokens, length in (([0, 5, 16], 49152, 1024), ([0, 16], 49152, 1024), (list(range(17)), 16, 17),
                                   (list(range(0, 49152, 40)) + [49152], 49152, 2048),
                                   (list(range(1030)), 1029, 1030)):
            padded = flash_boundaries(model, torch.tensor(cu, dtype=torch.int32), tokens)
            assert padded.dtype == torch.int32 and padded.tolist() == cu + [tokens] * (length - len(cu))
    for backend in ("flex", "sdpa"):  # they do not read it
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        assert flash_boundaries(types.SimpleNamespace(attention_backend=backend), cu, 16) is cu
