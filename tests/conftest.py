import contextlib

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Every device this machine has: cpu always, cuda where a GPU exists (skipped otherwise)."""
    return torch.device(request.param)


@contextlib.contextmanager
def _implicit_tensors_on_meta():
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture
def strict_device():
    """A context manager under which a tensor created without an explicit device lands on ``meta``.

    Real data stays on the device it was put on, so any tensor longlab creates without the device
    of its inputs meets real data on another device and raises at once: the CPU-only way to find
    code that would fail on a GPU ("expected ... on the same device, but got cpu").
    """
    return _implicit_tensors_on_meta
