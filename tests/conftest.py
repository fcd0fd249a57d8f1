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

# `auto` on a GPU times its candidate backends per new shape and keeps the results in a table
# under the user's cache: tests neither measure (tests/test_backend_choice.py turns it on where
# it is the subject) nor write outside a temporary folder.
os.environ.setdefault("LLM_ADAPTERS_AUTO_MEASURE", "0")
if "LLM_ADAPTERS_CACHE_DIR" not in os.environ:
    import tempfile

    _TEST_CACHE = tempfile.mkdtemp(prefix="llm_adapters_test_cache_")
    os.environ["LLM_ADAPTERS_CACHE_DIR"] = _TEST_CACHE
else:
    _TEST_CACHE = None

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _TEST_CACHE is not None:
        import shutil

        shutil.rmtree(_TEST_CACHE, ignore_errors=True)


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
