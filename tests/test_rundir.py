"""The run directory and its checkpoints (nanogpt.rundir), written once for both trainers and read by the tooling:
fresh starts, resumes, the dirty flag, durable checkpoints, pruning, one metrics reader, one provenance."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from nanogpt import rundir
from nanogpt.rundir import RunDir
from slurm import jobs, manifest, report
from tests.fixtures import read_metrics, run_module
from tests.test_env_scripts import prologue
from tests.test_modded_train import THREE_STEPS


def test_three_fresh_starts_keep_every_earlier_run_s_files(tmp_path):
    """A fresh start (nothing to resume) moves an earlier run's files aside under the first number free for all
    of them: a third start used to overwrite the first one's metrics and log (always renamed to .1), and every
    start overwrote the earlier config.json and provenance.json."""
    for attempt in range(3):
        run = RunDir(tmp_path)
        run.start({"attempt": attempt}, {"started": attempt}, None)
        run.metric("train", step=1, attempt=attempt)
        run.log(f"attempt {attempt}")
    for suffix, attempt in (("", 2), (".1", 0), (".2", 1)):
        assert (tmp_path / f"train.log{suffix}").read_text() == f"attempt {attempt}\n"
        assert json.loads((tmp_path / f"metrics.jsonl{suffix}").read_text())["attempt"] == attempt
        assert json.loads((tmp_path / f"config.json{suffix}").read_text()) == {"attempt": attempt}
        assert json.loads((tmp_path / f"provenance.json{suffix}").read_text())["started"] == attempt
    # A run that got no further than its config keeps one number for all its files: the next free one is 4.
    (tmp_path / "metrics.jsonl.3").write_text("")
    RunDir(tmp_path).start({"attempt": 3}, {}, None)
    assert (tmp_path / "config.json.4").is_file() and (tmp_path / "train.log.4").is_file()
    assert not (tmp_path / "config.json.3").exists()


def test_a_resume_keeps_the_records_up_to_its_step_and_sets_the_rest_aside(tmp_path):
    """Records after the checkpoint's step, lines cut by a kill and lines that are no JSON object go to
    metrics.dropped.jsonl; every record at or before it stays, the stop record of the interruption too (the
    job scripts read it). Both trainers resume through RunDir.start, which does this (the baseline dropped by
    `record.get("step", 0)`, which a non-object line crashed). provenance.json keeps a summary of each launch."""
    run = RunDir(tmp_path)
    run.start({}, {"time": "first", "git_sha": "a", "sources": {"x.py": "..."}}, None)
    lines = [json.dumps({"kind": "train", "step": i}) for i in (1, 2, 3)] + [
        json.dumps({"kind": "stop", "step": 3, "reason": "signal SIGUSR1"}), json.dumps({"kind": "train", "step": 4}),
        json.dumps({"kind": "val", "step": 4}), "[4, 5]", '{"kind": "train", "st']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run.start({}, {"time": "second", "git_sha": "b", "sources": {}}, 3)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:4]
    assert (tmp_path / "metrics.dropped.jsonl").read_text().splitlines() == lines[4:]
    assert not (tmp_path / "metrics.jsonl.tmp").exists() and not (tmp_path / "metrics.jsonl.1").exists()
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["resumed_from_step"] == 3 and provenance["time"] == "second"
    (first,) = provenance["history"]
    assert list(first) == list(rundir.HISTORY_KEYS) and first["time"] == "first" and first["git_sha"] == "a"
    run.start({}, {"time": "third"}, 3)
    assert [h["time"] for h in json.loads((tmp_path / "provenance.json").read_text())["history"]] == ["first", "second"]


def test_dirty_means_what_differs_from_the_commit_and_a_snapshot_says_its_own(tmp_path):
    """One definition for the trainers' provenance, the launcher's snapshot and the job log (git status
    --porcelain: a changed tracked file or an untracked file git does not ignore); the baseline ignored
    untracked files, the speedrun did not. A code snapshot (no .git) reports the commit it was copied from."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "train.py").write_text("print(1)\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    sha, dirty = rundir.git_state(repo)
    assert len(sha) == 40 and dirty is False
    (repo / "runs").mkdir()
    (repo / "runs" / "metrics.jsonl").write_text("{}\n")
    assert rundir.git_state(repo) == (sha, False)  # ignored: not code
    (repo / "helper.py").write_text("x = 1\n")
    assert rundir.git_state(repo) == (sha, True)  # an untracked module the run may import
    (repo / "helper.py").unlink()
    (repo / "train.py").write_text("print(2)\n")
    assert rundir.git_state(repo) == (sha, True)
    snapshot = tmp_path / "runs" / "submissions" / "1" / "code"
    snapshot.mkdir(parents=True)
    (snapshot / ".snapshot.json").write_text(json.dumps({"git_sha": "f" * 40, "git_dirty": True}))
    assert rundir.git_state(snapshot) == ("f" * 40, True)
    assert rundir.git_state(tmp_path / "not_a_repo") == (None, None)


def test_a_checkpoint_is_on_disk_before_its_rename_and_the_rename_is_made_durable(tmp_path, monkeypatch):
    """The file is fsynced, then renamed, then its folder fsynced (the baseline did all three but failed when
    the folder refused fsync; the speedrun did not fail). A folder that refuses fsync is no error."""
    events, refuse = [], {"folder": False}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        events.append("fsync folder" if folder else "fsync file")
        if folder and refuse["folder"]:
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for refuse["folder"] in (False, True):
        events.clear()
        path = rundir.save_checkpoint(tmp_path / "ckpt", 5, {"step": 5, "w": torch.arange(3)})
        assert events == ["fsync file", "rename", "fsync folder"]
        assert torch.equal(rundir.load_newest(tmp_path / "ckpt", log=print)["w"], torch.arange(3))
        assert path == rundir.checkpoint_path(tmp_path / "ckpt", 5) and not path.with_name(path.name + ".tmp").exists()


def test_a_write_that_fails_midway_leaves_the_file_as_it_was_and_no_temporary(tmp_path):
    """atomic_write, through which the checkpoints and the probe store's files are written: all or nothing."""
    path = tmp_path / "index.json"
    rundir.atomic_write(path, lambda f: f.write(b"first"))

    def full_disk(f):
        f.write(b"half of the second")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        rundir.atomic_write(path, full_disk)
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["index.json"]
    rundir.atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_pruning_keeps_the_checkpoint_just_written_and_those_kept_for_studies(tmp_path):
    """After a resume that fell back past an unreadable newest checkpoint (step 8), the checkpoint written at
    step 6 is the one to resume from: pruning only looks at steps up to the one written (keeping the newest
    of them and the study steps), so it stays; the unreadable one is overwritten when the run reaches it."""
    ckpt_dir = tmp_path / "ckpt"
    for step in (2, 4, 6, 8):
        rundir.save_checkpoint(ckpt_dir, step, {"step": step})
    rundir.checkpoint_path(ckpt_dir, 8).write_bytes(b"cut short")
    rundir.prune_checkpoints(ckpt_dir, 6, keep_newest=1, keep_steps={2})
    assert [p.name for p in rundir.checkpoints(ckpt_dir)] == ["step_0000002.pt", "step_0000006.pt", "step_0000008.pt"]
    warnings = []
    assert rundir.load_newest(ckpt_dir, warnings.append)["step"] == 6 and "step_0000008.pt" in warnings[0]
    rundir.prune_checkpoints(ckpt_dir, 6, keep_newest=2)
    assert [p.name for p in rundir.checkpoints(ckpt_dir)] == ["step_0000002.pt", "step_0000006.pt", "step_0000008.pt"]
    rundir.prune_checkpoints(ckpt_dir, 8, keep_newest=1)
    assert [p.name for p in rundir.checkpoints(ckpt_dir)] == ["step_0000008.pt"]


def test_every_reader_of_metrics_jsonl_reads_it_the_same_way(tmp_path):
    """The report, the launcher's status and requeue checks (slurm.manifest, slurm.submit, slurm.jobs) and the
    job scripts (slurm/common.sh stop_since) each had their own loop over metrics.jsonl; they now all read
    through nanogpt.rundir. A line that is JSON but no object used to crash the status line (list.get)."""
    stop_time = time.time()
    records = [{"kind": "val", "step": 1, "val_loss": 3.5, "tokens": 10, "train_time_ms": 5.0},
               {"kind": "stop", "step": 2, "reason": "signal SIGUSR1", "time": stop_time}]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '[1, 2]\n{"kind": "tr')
    assert rundir.last_record(run_dir, ("end", "stop")) == records[1] == rundir.last_record(run_dir)
    assert rundir.last_record(run_dir, ("end",)) is None and rundir.last_record(tmp_path / "none") is None
    assert jobs.last_record is rundir.last_record
    assert manifest.progress({"run_dir": str(run_dir)}) == "stopped at step 2 (signal SIGUSR1)"
    found = report.Found()
    run = report.load_run(run_dir, found)
    assert [r["step"] for r in run.val] == [1] and run.end is None
    assert f"{run_dir / 'metrics.jsonl'}: line 3 is not a JSON object; ignored" in found.warnings
    assert f"{run_dir / 'metrics.jsonl'}: the last line is cut short; ignored" in found.warnings
    proc = prologue(tmp_path, f'echo "since before: [$(stop_since {stop_time - 5:.0f} "{run_dir}")]"\n'
                              f'echo "since after: [$(stop_since {stop_time + 5:.0f} "{run_dir}")]"')
    assert proc.returncode == 0, proc.stderr
    assert "since before: [signal SIGUSR1]" in proc.stdout and "since after: []" in proc.stdout


def test_both_trainers_write_one_provenance_that_the_report_reads_without_fallbacks(char_corpus, tmp_path):
    """The baseline wrote resumed_from_step and the GPU names also under device_names, the speedrun
    resumed_step, a history of summaries and its sources; slurm.report looked for the GPUs under two keys and
    in the end record. Both now write nanogpt.rundir.provenance's keys. Each run here stops after its first
    step (max_train_minutes) and is resumed, so the resume's keys are compared too."""
    commands = {
        "baseline": ["nanogpt.train", "tiny_cpu", "--max_iters=3", "--eval_interval=3", "--eval_iters=1"],
        "modded": ["modded_nanogpt.train_gpt", "tiny_cpu", *THREE_STEPS],
    }
    provenances = {}
    for name, (module, *args) in commands.items():
        run_dir = tmp_path / name
        args += [f"--data_dir={char_corpus}", f"--run_dir={run_dir}"]
        run_module(module, *args, "--max_train_minutes=0.0001")
        assert read_metrics(run_dir)[-1]["kind"] == "stop"
        resumed = run_module(module, *args)
        assert "resumed from step 1" in resumed.stdout
        provenances[name] = json.loads((run_dir / "provenance.json").read_text())
        found = report.Found()
        assert report.device_text(report.load_run(run_dir, found)) == "cpu x1"
        assert report.trainer_of({}, provenances[name]) == ("baseline" if name == "baseline" else "modded")
    baseline, modded = provenances["baseline"], provenances["modded"]
    assert set(baseline) == set(modded)
    assert "device_names" not in baseline and "resumed_step" not in modded
    for prov in (baseline, modded):
        assert prov["resumed_from_step"] == 1 and prov["gpus"] == [] and prov["world_size"] == 1
        (launch,) = prov["history"]
        assert list(launch) == list(rundir.HISTORY_KEYS) and launch["resumed_from_step"] is None
        assert prov["git_sha"] == launch["git_sha"] and isinstance(prov["git_dirty"], bool)
        assert set(prov["parameters"]) == {"total", "non_embedding"}
    assert baseline["git_dirty"] == modded["git_dirty"] and baseline["git_sha"] == modded["git_sha"]
    assert "nanogpt/train.py" in baseline["sources"] and "modded_nanogpt/train_gpt.py" in modded["sources"]
    assert baseline["attention_backend"] == "sdpa (auto)" and modded["attention_backend"] == "sdpa"


@pytest.mark.parametrize("goal, target_stops, done", [(3, False, True), (5, False, False), (5, True, True)])
def test_a_run_that_ended_is_recognised_by_its_end_record_and_newest_checkpoint(tmp_path, goal, target_stops,
                                                                                done):
    """completed(): the last end/stop record is an end, the newest checkpoint is of its step, and the step is
    the goal or later, or the run ended on reaching its target where that ends a run (the baseline's rule;
    the speedrun's was a file name test that missed a shorter rerun)."""
    run = RunDir(tmp_path)
    rundir.save_checkpoint(run.ckpt_dir, 3, {"step": 3})
    run.metric("end", step=3, reached_target=True)
    assert (run.completed(goal, target_stops) is not None) == done
    run.metric("stop", step=3, reason="signal SIGUSR1")
    assert run.completed(goal, target_stops) is None


def test_compile_caches_go_beside_the_run_directory_unless_set_and_say_whether_they_are_warm(tmp_path, monkeypatch):
    """Inductor's and Triton's caches (and any named others) default to RUN_DIR/../.cache/<name>, so the runs of
    one folder share compiled kernels; a variable already set is the user's and is kept; `warm` says whether any
    cache held files before the run."""
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "OTHER_CACHE", "RUNS_DIR"):
        monkeypatch.delenv(variable, raising=False)
    runs = tmp_path / "runs"
    caches = rundir.compile_caches(runs / "a")
    assert caches == {"TORCHINDUCTOR_CACHE_DIR": str(runs / ".cache" / "inductor"),
                      "TRITON_CACHE_DIR": str(runs / ".cache" / "triton"), "warm": False}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(runs / ".cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(runs / ".cache" / "triton")
    assert not (runs / ".cache").exists()  # made by the compilers when they write
    assert rundir.caches_text(caches) == (f"kernel caches (empty): TORCHINDUCTOR_CACHE_DIR={runs}/.cache/inductor, "
                                          f"TRITON_CACHE_DIR={runs}/.cache/triton")

    (runs / ".cache" / "triton" / "KEY").mkdir(parents=True)
    assert rundir.compile_caches(runs / "b")["warm"] is False  # folders without a file in them: nothing compiled
    (runs / ".cache" / "triton" / "KEY" / "kernel.cubin").write_bytes(b"")
    assert rundir.compile_caches(runs / "b")["warm"] is True  # another run of the folder: the same caches
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    caches = rundir.compile_caches(tmp_path / "elsewhere" / "c", {"TRITON_CACHE_DIR": "triton", "OTHER_CACHE": "x"})
    assert caches == {"TRITON_CACHE_DIR": str(tmp_path / "mine"), "OTHER_CACHE": str(tmp_path / "elsewhere" / ".cache" / "x"),
                      "warm": False}
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # only the variables asked for


def test_runs_under_runs_dir_share_one_cache_there_whatever_their_folder(tmp_path, monkeypatch):
    """The launcher puts each submission's runs in a folder of its own under $RUNS_DIR: their caches are all
    $RUNS_DIR/.cache, so one submission's compiles serve the next; a run outside $RUNS_DIR keeps its folder's."""
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    caches = rundir.compile_caches(tmp_path / "runs" / "20261203-1" / "speedrun-seed0")
    assert caches["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "runs" / ".cache" / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    caches = rundir.compile_caches(tmp_path / "scratch" / "a", {"TORCHINDUCTOR_CACHE_DIR": "inductor"})
    assert caches["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "scratch" / ".cache" / "inductor")


def test_importing_the_trainers_leaves_the_cache_variables_to_them():
    """torch fills TORCHINDUCTOR_CACHE_DIR in when torch._dynamo is imported, and a filled-in variable looks like
    the user's: the trainers point the caches before that, so their imports must not import it."""
    code = ("import os, modded_nanogpt.train_gpt, nanogpt.train, modded_nanogpt.bench.profile; "
            "print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'), os.environ.get('TRITON_CACHE_DIR'))")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["None", "None"]
