"""The `slurm_cluster` fixture: a real, throw-away Slurm cluster on this machine for the `slurm` tests.

tests/cluster/up.sh starts Debian's slurmctld, one slurmd per fake node (typed fake GPUs), munge and,
for sacct, slurmdbd with a private MariaDB; tests/cluster/down.sh stops them at the end of the pytest session.
Where the cluster cannot exist (not root, packages not installable) the tests are skipped with the
reason, unless REQUIRE_SLURM=1 (CI), which turns the skip into a failure. Any other failure of up.sh
fails loudly with its output.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPTS = REPO_ROOT / "tests" / "cluster"
EXIT_CANNOT_RUN = 77  # up.sh: this machine cannot host the cluster
NODE_SPEC = "h100:2:8 a100:1:8"  # TYPE:NODES:GPUS_PER_NODE; the tests count on these nodes
PARTITION = "debug"
UP_TIMEOUT_S = 900  # a first start installs the Debian packages
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


@dataclass(frozen=True)
class SlurmCluster:
    base: Path
    conf: Path
    partition: str
    node_spec: str

    def nodes(self) -> dict[str, tuple[str, int]]:
        """Node name -> (gpu type, gpus), as up.sh names them from the node spec."""
        nodes = {}
        for spec in self.node_spec.split():
            gpu_type, count, gpus = spec.split(":")
            for i in range(1, int(count) + 1):
                nodes[f"{gpu_type}-{i}"] = (gpu_type, int(gpus))
        return nodes

    def sbatch(self, *args, cwd: Path | str = REPO_ROOT, env: dict | None = None) -> int:
        """Submit with `sbatch --parsable ARGS`; the job id. Raises with sbatch's stderr if it refuses."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *map(str, args)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"sbatch {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}"
            )
        return int(proc.stdout.strip().split(";")[0])

    def state(self, job_id: int) -> str:
        """The job's state in sacct (first word: 'CANCELLED by 0' -> 'CANCELLED'); '' before sacct knows it."""
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        words = proc.stdout.split()
        return words[0] if proc.returncode == 0 and words else ""

    def wait(self, job_id: int, timeout: float = 300) -> str:
        """Poll sacct until the job reaches a terminal state; that state. sacct lags squeue by ~1 s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in TERMINAL_STATES:
                return state
            time.sleep(0.5)
        subprocess.run(["scancel", str(job_id)], timeout=60)
        raise AssertionError(
            f"job {job_id} not finished after {timeout:.0f}s (last state {self.state(job_id)!r}); cancelled"
        )


def _run_script(name: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPTS / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running local Slurm cluster; SLURM_CONF points at it (os.environ) while the session lasts."""
    required = os.environ.get("REQUIRE_SLURM", "0") == "1"

    def unavailable(reason: str):
        if required:
            pytest.fail(f"REQUIRE_SLURM=1 but the local Slurm cluster cannot run here: {reason}")
        pytest.skip(f"local Slurm cluster unavailable: {reason}")

    if os.geteuid() != 0:
        unavailable("tests/cluster/up.sh needs root (daemons, mknod, /etc/hosts)")
    base = tmp_path_factory.mktemp("localslurm")
    env = dict(os.environ, BASE=str(base), NODE_SPEC=NODE_SPEC, PARTITION=PARTITION, WITH_DBD="1")
    up = _run_script("up.sh", env, UP_TIMEOUT_S)
    if up.returncode != 0:
        down = _run_script("down.sh", env, 120)  # stop whatever did start
        if up.returncode == EXIT_CANNOT_RUN:
            unavailable(up.stderr.strip().splitlines()[-1] if up.stderr.strip() else "up.sh exited 77")
        pytest.fail(
            f"tests/cluster/up.sh failed ({up.returncode}):\n{_output(up)}\ndown.sh:\n{_output(down)}"
        )
    conf = base / "etc" / "slurm.conf"
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # sbatch, sacct, squeue and submitit read it
    try:
        yield SlurmCluster(base=base, conf=conf, partition=PARTITION, node_spec=NODE_SPEC)
    finally:
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
        down = _run_script("down.sh", env, 120)
        if down.returncode != 0:
            pytest.fail(f"tests/cluster/down.sh failed ({down.returncode}):\n{_output(down)}")
