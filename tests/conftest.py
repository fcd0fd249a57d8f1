"""Test setup shared by every test file.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; TRITON_INTERPRET
must be in the environment before anything imports triton, so it is set here, first.
"""

import os


def _has_cuda() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # With the interpreter on, `auto` would send every CPU tensor through it: model-level
    # tests use the torch backend unless a test asks for another (keyword or monkeypatch).
    os.environ.setdefault("LLM_ADAPTERS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
