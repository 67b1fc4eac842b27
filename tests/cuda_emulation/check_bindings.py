"""Load-time check of csrc/cuda/bindings.cpp on a machine with a CPU torch and a CUDA toolkit but no GPU.

Builds the binding with g++ against torch's headers (plus an empty `c10/cuda/impl/cuda_cmake_macros.h`, which CPU
wheels lack), links it with stub launchers and stubs of the few libc10_cuda symbols it references (none is ever
called), loads it with `torch.ops.load_library`, and checks that every `_<op>_cuda` schema is registered with a
CUDA kernel. A C++ signature that does not match its schema string fails right at load, which is what this catches
before a GPU machine does. Run from the repository root: `python tests/cuda_emulation/check_bindings.py` (~1 min).
"""

import os
import subprocess
import sys
import tempfile

import torch
import torch.utils.cpp_extension as ext

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc", "cuda")  # bindings.cpp, kernels.cuh
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
EXPECTED = {
    "_sensitivity_accumulate_cuda": "(Tensor(a!)[] scores, Tensor[] grads, Tensor[] params, int mode) -> ()",
    "_select_pivots_cuda": "(Tensor[] scores, int k) -> (Tensor, Tensor)",
    "_sparse_adamw_step_cuda": (
        "(Tensor(a!)[] params, Tensor[] grads, int[] offsets, Tensor indices, Tensor(b!) exp_avg, "
        "Tensor(c!) exp_avg_sq, Tensor(d!)? master, Tensor? pivot_grads, Tensor? grad_scale, Tensor? found_inf, "
        "Tensor? grad_coef, Tensor(e!)? nonfinite, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, int step) -> ()"
    ),
}


def main() -> int:
    build = tempfile.mkdtemp(prefix="ppt_fast_bindings_")
    shim = os.path.join(build, "shim", "c10", "cuda", "impl")
    os.makedirs(shim)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n")
    inc = ["-isystem", os.path.join(build, "shim")]
    for path in ext.include_paths():
        inc += ["-isystem", path]
    inc += ["-isystem", os.path.join(CUDA_HOME, "include"), "-I", CUDA_DIR]
    objs = []
    for src in (
        os.path.join(CUDA_DIR, "bindings.cpp"),
        os.path.join(HERE, "launcher_stubs.cpp"),
        os.path.join(HERE, "c10_cuda_stubs.cpp"),
    ):
        obj = os.path.join(build, os.path.basename(src) + ".o")
        cmd = [
            "g++",
            "-std=c++17",
            "-O0",
            "-fPIC",
            "-Wall",
            "-Wextra",
            "-DPPT_FAST_WITH_CUDA",
            *inc,
            "-c",
            src,
            "-o",
            obj,
        ]
        subprocess.run(cmd, check=True)
        objs.append(obj)
    lib = os.path.join(build, "bindings_check.so")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cuda_lib = os.path.join(CUDA_HOME, "lib64")
    subprocess.run(
        [
            "g++",
            "-shared",
            *objs,
            f"-L{torch_lib}",
            "-lc10",
            "-ltorch_cpu",
            f"-L{cuda_lib}",
            "-lcudart",
            f"-Wl,-rpath,{torch_lib}",
            f"-Wl,-rpath,{cuda_lib}",
            "-o",
            lib,
        ],
        check=True,
    )
    torch.ops.load_library(lib)
    bad = []
    for name, schema in EXPECTED.items():
        op = getattr(torch.ops.ppt_fast, name).default
        got = str(op._schema)
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
        print(f"{got}\n  CUDA kernel: {has_cuda}")
        if got != f"ppt_fast::{name}{schema}" or not has_cuda:
            bad.append(name)
    if bad:
        print("mismatch:", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
