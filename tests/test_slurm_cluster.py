"""The local Slurm cluster itself: typed fake GPUs, multi-node jobs, accounting and real rejections."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def test_sinfo_shows_typed_gpus_on_every_node(slurm_cluster):
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %G %P"], capture_output=True, text=True, check=True
    ).stdout
    seen = {}
    for line in out.splitlines():
        node, gres, partition = line.split()
        seen[node] = (gres, partition.rstrip("*"))
    expected = {
        node: (f"gpu:{gpu_type}:{gpus}", slurm_cluster.partition)
        for node, (gpu_type, gpus) in slurm_cluster.nodes().items()
    }
    assert seen == expected


def test_two_node_job_sees_eight_gpus_per_node_and_is_accounted(slurm_cluster, tmp_path):
    script = tmp_path / "two_nodes.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2\n"
        "#SBATCH --ntasks-per-node=1\n"
        "#SBATCH --output=%x-%j.out\n"
        "srun bash -c 'echo \"node=$SLURMD_NODENAME cvd=$CUDA_VISIBLE_DEVICES gpus=$SLURM_GPUS_ON_NODE\"'\n"
    )
    job_id = slurm_cluster.sbatch("--gres=gpu:h100:8", script, cwd=tmp_path)
    state = slurm_cluster.wait(job_id, timeout=120)
    log = (tmp_path / f"two_nodes.sh-{job_id}.out").read_text()
    assert state == "COMPLETED", log
    lines = sorted(line for line in log.splitlines() if line.startswith("node="))
    assert lines == [f"node=h100-{i} cvd=0,1,2,3,4,5,6,7 gpus=8" for i in (1, 2)], log
    tres = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "AllocTRES"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gres/gpu=16" in tres and "node=2" in tres, tres


@pytest.mark.parametrize("gres", ["gpu:b200:1", "gpu:h100:9"])
def test_gpus_the_cluster_does_not_have_are_rejected_at_submission(slurm_cluster, tmp_path, gres):
    proc = subprocess.run(
        ["sbatch", f"--gres={gres}", "--wrap", "true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Requested node configuration is not available" in proc.stderr, proc.stderr
