"""The project's one table of GPU facts, slurm/gpus.tsv (DESIGN.md, contract 5), as Python reads it.

The sbatch scripts read the file with awk (slurm/common.sh gpu_fact); the launcher (slurm.submit: GPU types,
micro-batches) and the baseline trainer (MFU against the peak bf16 rate) read it through this module, so a
GPU's numbers are typed once. Standard library only.
"""

from __future__ import annotations

import functools
from pathlib import Path

GPUS_TSV = Path(__file__).resolve().parent.parent / "slurm" / "gpus.tsv"


@functools.cache
def gpu_table(path: Path = GPUS_TSV) -> dict[str, dict[str, str]]:
    """gpu_type -> its row (column name -> text), in the file's order. Lines starting with # are comments; the
    first other line is the header."""
    rows, header = {}, None
    for line in Path(path).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        cells = line.split("\t")
        if header is None:
            header = cells
            continue
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def peak_flops(device_name: str, column: str = "peak_bf16_flops") -> float | None:
    """The peak FLOP/s (dense) of a GPU named like torch.cuda.get_device_name(): the first row whose torch_name
    occurs in the name (the table lists specific names before general ones); None for a GPU the table lacks."""
    for row in gpu_table().values():
        if row["torch_name"] in device_name:
            return float(row[column]) or None
    return None
