"""pytest configuration: shared fixtures, and the `gpu` tier skipped where CUDA is missing."""

import os

# Bitwise CPU comparisons (a resumed run against an uninterrupted one, in separate processes) need the same
# rounding in every process. MKL by default picks each call's thread count itself (MKL_DYNAMIC), and on a
# busy machine it sometimes picks another, which changes a matmul's summation order: a resumed run then
# differed in the 7th digit of a loss (seen once in a few dozen runs of the signal test). Fixed thread
# counts here, before torch loads MKL, and in every process the tests start (they inherit the environment).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import pytest  # noqa: E402

from tests.slurm_cluster import slurm_cluster  # noqa: F401

pytest_plugins = ["tests.fixtures"]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (tests/README.md: the GPU tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
