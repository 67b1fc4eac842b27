"""Host emulation of the CUDA kernels' logic (no GPU): compiles csrc/cuda/{select_pivots,sensitivity_accumulate,
sparse_adamw_step}.cu as host C++ (prelude.h maps the device features they use onto std::thread / std::barrier;
blocks run one after another) and compares them with the pure-PyTorch references: select exactly, sensitivity
bitwise, sparse AdamW within the fp32 tolerance.

It checks indexing, radix digits, tie handling, compaction, NaN detection, alignment paths; not speed, not memory
ordering on real hardware. Run from the repository root: `python tests/cuda_emulation/run_emulation.py` (~3 min on
2 cores: every emulated block spawns its threads). Needs g++ with C++20 and the CUDA toolkit's headers.
"""

import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/cuda_emulation/ -> root
sys.path.insert(0, ROOT)
from ppt_fast.ops.select_pivots import _select_pivots_ref  # noqa: E402
from ppt_fast.ops.sensitivity_accumulate import MODES, _sensitivity_accumulate_ref  # noqa: E402
from ppt_fast.ops.sparse_adamw_step import _sparse_adamw_step_ref  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")  # the kernel sources harness.cpp includes
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
BUILD = tempfile.mkdtemp(prefix="ppt_fast_emu_")


def build(variant):
    exe = os.path.join(BUILD, f"harness_{variant}")
    subprocess.run(
        [
            "g++",
            "-std=c++20",
            "-O1",
            "-ffp-contract=off",
            "-pthread",
            f"-DEMU_{variant}",
            "-isystem",
            f"{CUDA_HOME}/include",
            "-I",
            HERE,
            "-I",
            CUDA_DIR,
            os.path.join(HERE, "harness.cpp"),
            f"-L{CUDA_HOME}/lib64",
            "-lcudart",
            f"-Wl,-rpath,{CUDA_HOME}/lib64",
            "-o",
            exe,
        ],
        check=True,
    )
    return exe


HARNESS = {"SELECT": build("SELECT"), "SENS": build("SENS"), "ADAM": build("ADAM")}
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def raw(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def run_select(scores, k, offs=None):
    offs = offs or [0] * len(scores)
    b = struct.pack("<iiq", 0, len(scores), k)
    for s, o in zip(scores, offs):
        b += struct.pack("<iqi", DT[s.dtype], s.numel(), o) + raw(s)
    p = subprocess.run([HARNESS["SELECT"]], input=b, capture_output=True, check=True)
    nan = struct.unpack("<i", p.stdout[:4])[0]
    counts = np.frombuffer(p.stdout[4 : 4 + 8 * len(scores)], dtype=np.int64)
    idx = np.frombuffer(p.stdout[4 + 8 * len(scores) :], dtype=np.int32)
    return nan, torch.from_numpy(counts.copy()), torch.from_numpy(idx.copy())


def check_select(scores, k, offs=None):
    nan, c, i = run_select(scores, k, offs)
    rc, ri = _select_pivots_ref(scores, k)
    ok = nan == 0 and torch.equal(c, rc) and torch.equal(i, ri)
    if not ok:
        print(
            "MISMATCH k",
            k,
            "nan",
            nan,
            c.tolist()[:8],
            rc.tolist()[:8],
            (i != ri).nonzero()[:5].tolist() if i.shape == ri.shape else (i.shape, ri.shape),
        )
    return ok


torch.manual_seed(0)
res = []
shapes = [(1,), (7,), (16383,), (16385,), (0,), (40_001,)]
for dt in DT:
    sc = [torch.randn(s).to(dt) for s in shapes]
    N = sum(s.numel() for s in sc)
    for k in (1, 13, N // 100, N // 3, N - 1, N):
        res.append(check_select(sc, k))
    res.append(check_select(sc, N // 10, offs=[1, 3, 0, 5, 0, 1]))
    ti = [(torch.randint(-3, 4, s).float() * 0.5).to(dt) for s in shapes]
    for k in (1, 2, 17, N // 7, N // 2, N - 1, N):
        res.append(check_select(ti, k))
x = torch.tensor([0.0, -0.0, 1e-45, -1e-40, float("inf"), -float("inf"), 3.0, -3.0])
for k in range(1, 9):
    res.append(check_select([x], k))
bad = [torch.randn(100), torch.randn(20000)]
bad[1][777] = float("nan")
nan, _, _ = run_select(bad, 5)
res.append(nan == 1)
print("select:", sum(res), "/", len(res))


# sensitivity
def run_sens(scores, grads, params, mode, offs):
    b = struct.pack("<iii", 1, len(scores), mode)
    for s, g, p, o in zip(scores, grads, params, offs):
        b += struct.pack("<iiiqi", DT[s.dtype], DT[g.dtype], DT[p.dtype], s.numel(), o) + raw(s) + raw(g) + raw(p)
    out = subprocess.run([HARNESS["SENS"]], input=b, capture_output=True, check=True).stdout
    got, pos = [], 0
    for s in scores:
        n = s.numel() * s.element_size()
        got.append(torch.frombuffer(bytearray(out[pos : pos + n]), dtype=s.dtype).reshape(s.shape) if n else s.clone())
        pos += n
    return got


r2 = []
for mode, m in MODES.items():
    for sd in (torch.float32, torch.bfloat16):
        for gd in DT:
            shp = [(8191,), (8192 * 3 + 5,), (0,), (1,), (20000,)]
            offs = [0, 0, 0, 0, 1]
            sc = [torch.rand(s).to(sd) for s in shp]
            gr = [torch.randn(s).to(gd) for s in shp]
            pa = [torch.randn(s).to(gd) for s in shp]
            got = run_sens(sc, gr, pa, m, offs)
            want = [s.clone() for s in sc]
            _sensitivity_accumulate_ref(want, gr, pa, mode)
            ok = all(torch.equal(a, b) for a, b in zip(got, want))
            if not ok:
                print("sens mismatch", mode, sd, gd)
            r2.append(ok)
print("sensitivity (bitwise):", sum(r2), "/", len(r2))


# sparse AdamW: 6 steps, mixed dtypes, master, dense or gathered bf16 grads, grad_scale, found_inf, a clipping
# coefficient, and checked steps (a NaN at step 5 must leave everything untouched and raise the flag)
def run_adam(params, grads, offsets, indices, m, v, master, pivot_grads, scale, found_inf, coef, checked, *hyper):
    lr, b1, b2, eps, wd, step = hyper
    bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
    hyper = struct.pack("<7f", 1.0 - lr * wd, 1.0 - b1, b2, 1.0 - b2, eps, lr / bc1, bc2**0.5)
    pg_dtype = DT[pivot_grads.dtype] if pivot_grads is not None else 0
    b = struct.pack("<iiq", 2, len(params), len(indices)) + hyper
    b += struct.pack("<iii", master is not None, pivot_grads is not None, pg_dtype)
    b += struct.pack("<if", scale is not None, 1.0 if scale is None else scale)
    b += struct.pack("<if", found_inf is not None, 0.0 if found_inf is None else found_inf)
    b += struct.pack("<if", coef is not None, 1.0 if coef is None else coef)
    b += struct.pack("<i", int(checked))
    for i, p in enumerate(params):
        gd = DT[grads[i].dtype] if grads is not None else 0
        b += struct.pack("<iiq", DT[p.dtype], gd, p.numel()) + raw(p) + (raw(grads[i]) if grads is not None else b"")
    b += np.asarray(offsets, dtype=np.int64).tobytes() + raw(indices) + raw(m) + raw(v)
    b += raw(master) if master is not None else b""
    b += raw(pivot_grads) if pivot_grads is not None else b""
    out = subprocess.run([HARNESS["ADAM"]], input=b, capture_output=True, check=True).stdout
    pos, new_params = 0, []
    for p in params:
        n = p.numel() * p.element_size()
        new_params.append(torch.frombuffer(bytearray(out[pos : pos + n]), dtype=p.dtype).reshape(p.shape))
        pos += n
    k = len(indices)
    st = [
        torch.frombuffer(bytearray(out[pos + 4 * k * j : pos + 4 * k * (j + 1)]), dtype=torch.float32) for j in range(3)
    ]
    flag = struct.unpack("<f", out[pos + 12 * k : pos + 12 * k + 4])[0]
    return new_params, st[0], st[1], (st[2] if master is not None else None), flag


r3, bitwise = [], 0
for dtypes, gathered, scaled, coef, checked in [
    ((torch.float32,) * 3, False, False, None, False),
    ((torch.float32,) * 3, True, True, 0.7, False),
    ((torch.bfloat16, torch.float16, torch.float32), False, True, None, True),
    ((torch.bfloat16, torch.float16, torch.float32), True, False, 0.3, True),
    ((torch.float32,) * 3, False, True, 0.5, True),
]:
    shapes = [(300, 7), (5,), (4099,)]
    params = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    offsets, parts = [0], []
    for s in shapes:
        n = int(np.prod(s))
        kk = max(1, n // 10)
        parts.append(torch.randperm(n)[:kk].sort().values.to(torch.int32))
        offsets.append(offsets[-1] + kk)
    indices = torch.cat(parts)
    k = offsets[-1]
    m, v = torch.zeros(k), torch.zeros(k)
    master = None
    if any(d != torch.float32 for d in dtypes):
        master = torch.cat([p.reshape(-1)[parts[i].long()].float() for i, p in enumerate(params)])
    ref = ([p.clone() for p in params], m.clone(), v.clone(), master.clone() if master is not None else None)
    for step in range(1, 7):
        grads = [torch.randn(s).to(d) * 0.1 for s, d in zip(shapes, dtypes)]
        scale = 512.0 if scaled else None
        if scaled:
            grads = [g * 512 for g in grads]
        pg = None
        if gathered:
            pg = torch.cat([g.reshape(-1)[parts[i].long()].float() for i, g in enumerate(grads)]).to(torch.bfloat16)
        if checked and step == 5:  # one NaN at a pivot of the last tensor
            if gathered:
                pg[-1] = float("nan")
            else:
                grads[2].view(-1)[parts[2][0].long()] = float("nan")
        found = 1.0 if step == 3 else 0.0
        hyper = (1e-2, 0.9, 0.999, 1e-8, 0.05, step)
        before = [p.clone() for p in params]
        params, m, v, master, flag = run_adam(
            params, None if gathered else grads, offsets, indices, m, v, master, pg, scale, found, coef, checked, *hyper
        )
        ref_flag = torch.zeros(1) if checked else None
        _sparse_adamw_step_ref(
            ref[0],
            None if gathered else grads,
            offsets,
            indices,
            ref[1],
            ref[2],
            ref[3],
            pg,
            torch.tensor([scale]) if scaled else None,
            torch.tensor([found]),
            torch.tensor([coef]) if coef is not None else None,
            ref_flag,
            *hyper,
        )
        if checked and (flag != float(ref_flag[0]) or (step == 5 and not all(map(torch.equal, before, params)))):
            print("adam checked-step mismatch", dtypes, gathered, step, flag, ref_flag)
            r3.append(False)
    pairs = list(zip(params, ref[0])) + [(m, ref[1]), (v, ref[2])] + ([(master, ref[3])] if master is not None else [])
    ok = True
    for a, b in pairs:
        rt = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[a.dtype]
        ok = ok and torch.allclose(a.float(), b.float(), rtol=rt, atol=1e-6)
        bitwise += int(torch.equal(a, b))
    if not ok:
        print("adam mismatch", dtypes, gathered, scaled)
    r3.append(ok)
print("sparse_adamw (tol):", sum(r3), "/", len(r3), f"(bitwise-equal tensors: {bitwise})")
sys.exit(0 if all(res) and all(r2) and all(r3) else 1)
