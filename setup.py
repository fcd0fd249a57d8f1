"""Builds the optional CUDA extension `llm_adapters._C`, and only when asked.

    LLM_ADAPTERS_BUILD_CUDA=1 pip install -e .      # ahead-of-time build (needs nvcc)
    LLM_ADAPTERS_CUDA_ARCHS="8.0;9.0"               # target architectures (default 8.0;9.0)

Without LLM_ADAPTERS_BUILD_CUDA=1 nothing native is built and the package is pure Python;
`backend="cuda"` then builds the extension on first use through torch's JIT loader.
All metadata lives in pyproject.toml.
"""

import glob
import os
import shutil

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("LLM_ADAPTERS_BUILD_CUDA") == "1":
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        print("llm_adapters: LLM_ADAPTERS_BUILD_CUDA=1 but csrc/ has no sources; building nothing")
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("LLM_ADAPTERS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    else:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        archs = os.environ.get("LLM_ADAPTERS_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext_modules.append(
            CUDAExtension(
                "llm_adapters._C",
                sources,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
        cmdclass["build_ext"] = BuildExtension
else:
    print("llm_adapters: not building the CUDA extension (set LLM_ADAPTERS_BUILD_CUDA=1 to build it)")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
