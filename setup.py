"""Build ppt_fast's compiled kernels.

`get_extensions()` always builds the CPU extension (`ppt_fast._C`, C++ / OpenMP) and adds the CUDA kernels to it
only when torch is a CUDA build *and* a CUDA toolkit is present. `PPT_FAST_NO_EXT=1` installs pure Python; every op
then falls back to its reference implementation.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def get_extensions():
    if os.environ.get("PPT_FAST_NO_EXT", "0") == "1":
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if sys.platform == "darwin":
        cxx.remove("-fopenmp")
    extra = {"cxx": cxx}
    use_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and os.environ.get("PPT_FAST_NO_CUDA", "0") != "1"
    if use_cuda:
        cuda_sources = sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        extra["cxx"] = cxx + ["-DPPT_FAST_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo", "-DPPT_FAST_WITH_CUDA"]
        return [
            CUDAExtension(
                "ppt_fast._C", cpu_sources + cuda_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"]
            )
        ]
    return [CppExtension("ppt_fast._C", cpu_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])]


def _cmdclass():
    if os.environ.get("PPT_FAST_NO_EXT", "0") == "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
)
