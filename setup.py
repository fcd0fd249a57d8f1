"""Builds the optional CUDA extension `llm_adapters._C`, and only when asked.

    LLM_ADAPTERS_BUILD_CUDA=1 pip install -e . --no-build-isolation   # ahead-of-time build
    LLM_ADAPTERS_CUDA_ARCHS="8.0;9.0"     target architectures (default 8.0;9.0)
    MAX_JOBS=N                            parallel compile jobs (default: cores, capped by memory)
    CUDA_HOME=/usr/local/cuda             the toolkit, when nvcc on PATH is only a wrapper

Without LLM_ADAPTERS_BUILD_CUDA=1 nothing native is built and the package is pure Python;
`backend="cuda"` then builds the extension on first use through torch's JIT loader.
With it, a missing nvcc or a compile error fails the install (never a silent pure-Python
install). All metadata lives in pyproject.toml.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
ext_modules = []
cmdclass = {}


def _build_settings():
    # llm_adapters/_cuda_build.py holds the sources and flags shared with the JIT loader; load
    # it by path so that building does not import the package.
    spec = importlib.util.spec_from_file_location(
        "_llm_adapters_cuda_build", ROOT / "llm_adapters" / "_cuda_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_jobs() -> str:
    # one nvcc job needs about 2 GB at peak; stay well inside the machine's memory
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return str(cores)
    return str(max(1, min(cores, int(mem_gb // 3))))


if os.environ.get("LLM_ADAPTERS_BUILD_CUDA") == "1":
    settings = _build_settings()
    sources = settings.sources(ROOT)
    if not sources:
        raise RuntimeError("LLM_ADAPTERS_BUILD_CUDA=1 but csrc/ has no sources")
    cuda_home = settings.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("LLM_ADAPTERS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    # torch.utils.cpp_extension reads CUDA_HOME once, when imported
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get(
        "LLM_ADAPTERS_CUDA_ARCHS", settings.DEFAULT_ARCHS
    )
    os.environ.setdefault("MAX_JOBS", _default_jobs())
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    print(
        f"llm_adapters: building the CUDA extension for {os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"with {cuda_home} ({os.environ['MAX_JOBS']} jobs)"
    )
    ext_modules.append(
        CUDAExtension(
            "llm_adapters._C",
            sources,
            extra_compile_args={"cxx": settings.CXX_FLAGS, "nvcc": settings.NVCC_FLAGS},
            depends=settings.headers(ROOT),  # an edited header rebuilds the extension
        )
    )
    cmdclass["build_ext"] = BuildExtension
else:
    print(
        "llm_adapters: not building the CUDA extension "
        "(set LLM_ADAPTERS_BUILD_CUDA=1 to build it)"
    )

setup(ext_modules=ext_modules, cmdclass=cmdclass)
