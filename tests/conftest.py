"""pytest configuration: shared fixtures, and the `gpu` tier skipped where CUDA is missing."""

import pytest

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
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a lent H100: see README, GPU tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
