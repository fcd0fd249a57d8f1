"""Build settings of the CUDA extension, shared by setup.py and the JIT loader.

    LLM_ADAPTERS_CUDA_ARCHS      target architectures, "8.0;9.0" by default (sm_80, sm_90);
                                 the JIT build defaults to the visible GPUs' own architectures
    LLM_ADAPTERS_CUDA_BUILD_DIR  where the JIT build keeps its objects (default: a folder per
                                 torch version and architecture list under ~/.cache)
    CUDA_HOME / CUDA_PATH        the CUDA toolkit; else found from nvcc or /usr/local/cuda
    MAX_JOBS                     parallel compile jobs (torch's own variable)

This module imports nothing heavy at the top, so setup.py can load it by file path without
importing the package (or torch) first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

DEFAULT_ARCHS = "8.0;9.0"
EXTENSION_NAME = "llm_adapters_C"  # the torch.ops namespace the C++ registers, too
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# No --use_fast_math: it swaps expf / tanhf for approximations, and φ is applied in float32 on
# rank-sized data where the accurate versions cost nothing measurable.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def _listed(patterns: tuple[str, ...], root: Path | None) -> list[str]:
    folder = CSRC if root is None else root / "csrc"
    found = [p for pattern in patterns for p in sorted(folder.glob(pattern))]
    return [str(p if root is None else p.relative_to(root)) for p in found]


def sources(root: Path | None = None) -> list[str]:
    """The extension's C++ / CUDA sources (sorted), relative to `root` when given."""
    return _listed(("*.cpp", "*.cu"), root)


def headers(root: Path | None = None) -> list[str]:
    """The headers the sources include (csrc/*.cuh: one per kernel family, the tensor-core
    helpers, the tile MMAs, Philox), relative to `root` when given. setup.py passes them as the
    extension's `depends`, so an edited header rebuilds it and they go into an sdist; the JIT
    build tracks them through the compilers' dependency files, and `jit_cached` counts every
    file in csrc/."""
    return _listed(("*.cuh", "*.h"), root)


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: CUDA_HOME / CUDA_PATH, else the one whose include/ has
    cuda_runtime.h among nvcc's parent folder and /usr/local/cuda. (nvcc can be a wrapper
    script in /usr/local/bin, whose parent folder is not the toolkit.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def jit_unavailable_reason() -> str | None:
    """None when a JIT build can be attempted here, else why not."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return f"torch is not importable: {exc}"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA runtime"
    if find_cuda_home() is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    if not (CSRC / "ops.cpp").exists():
        return f"the C++ sources are not present (expected them in {CSRC})"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def jit_archs() -> str:
    """Architectures of a JIT build: LLM_ADAPTERS_CUDA_ARCHS, else the visible GPUs', else the
    default list."""
    env = os.environ.get("LLM_ADAPTERS_CUDA_ARCHS")
    if env:
        return env
    import torch

    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_ARCHS


def build_dir(archs: str) -> Path:
    """JIT build folder, one per torch version, Python version and architecture list (ninja
    rebuilds within it when a source changes)."""
    env = os.environ.get("LLM_ADAPTERS_CUDA_BUILD_DIR")
    if env:
        return Path(env)
    import torch

    key = f"{torch.__version__}|{sys.version_info[:2]}|{archs}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "llm_adapters" / f"cuda-ext-{tag}"


def jit_cached() -> Path | None:
    """The library an earlier JIT build left in the cache for this torch, Python and GPU
    architecture list, when no source or header in csrc/ is newer (loading it then compiles
    nothing); else None."""
    if jit_unavailable_reason() is not None:
        return None
    lib = build_dir(jit_archs()) / f"{EXTENSION_NAME}.so"
    try:
        built = lib.stat().st_mtime
        newest = max(p.stat().st_mtime for p in CSRC.iterdir() if p.is_file())
    except (OSError, ValueError):
        return None
    return lib if built >= newest else None


def jit_build(verbose: bool = False) -> str:
    """Compile (or reuse) the extension with torch's JIT loader and load it into this process;
    returns the library path. Raises RuntimeError with the compiler's message on failure."""
    reason = jit_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build the llm_adapters CUDA extension: {reason}")
    import torch.utils.cpp_extension as cpp_extension

    cuda_home = find_cuda_home()
    # torch resolves its CUDA_HOME once, at import, from `which nvcc`; a wrapper script in
    # /usr/local/bin makes that /usr/local. Point it at the real toolkit for this build.
    cpp_extension.CUDA_HOME = cuda_home
    archs = jit_archs()
    folder = build_dir(archs)
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=sources(),
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            build_directory=str(folder),
            verbose=verbose,
            with_cuda=True,
            is_python_module=False,
        )
    except Exception as exc:
        raise RuntimeError(
            f"building the llm_adapters CUDA extension in {folder} failed: {exc}"
        ) from exc
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    return str(folder / f"{EXTENSION_NAME}.so")
