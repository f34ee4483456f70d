import os

import pytest
import torch

os.environ.setdefault("HYMBA_TEST", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the DESIGN invariant's measure)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
