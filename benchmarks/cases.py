"""The op-level benchmark cases: inputs at MusicGen shapes, one runnable per (op, provider), and the byte floor.

Shared by the pytest-benchmark suites (timing, in-process) and `memprobe.py` (peak memory, one fresh subprocess
per op, shapes and dtype), so both measure exactly the same work.

Providers
- `ref`, `cpp`, `cuda`, `triton`: the public op with `ppt_fast._backend.force(provider)`; availability comes from
  `ppt_fast._backend.available_backends(op, device)` and the reason from `why_unavailable`.
- `ref_compile`: `torch.compile` of the op's pure-torch reference (the bar a custom kernel has to clear).
- Baselines, what a pipeline without ppt_fast does:
  sensitivity_accumulate: `torch_foreach` = `torch._foreach_addcmul_(scores, grads, grads)` (one call, fp32);
  select_pivots: `dense_masked` = `torch.cat` + `torch.topk` + dense bool masks (what dense masked tuning needs);
  sparse_adamw_step: `dense_masked` = AdamW over the full tensors with grads multiplied by 0/1 masks and weight
  decay masked (`ppt_fast.optim.DenseMaskedAdamW` when present, else the same thing spelled out below).
- `optimizer`, `optimizer_clip` (sparse_adamw_step only): what a user's loop calls, `SparseAdamW.step()` after
  backward (gradients in `p.grad`, `nonfinite="skip"`), and `clip_grad_norm_(1.0)` + `step()`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

try:  # run as `python benchmarks/x.py` or imported as the package `benchmarks`
    from . import shapes as shapes_mod
except ImportError:  # pragma: no cover
    import shapes as shapes_mod  # type: ignore[no-redef]

OPS = ("sensitivity_accumulate", "select_pivots", "sparse_adamw_step")
KERNEL_BACKENDS = ("ref", "cpp", "triton", "cuda")
PROVIDERS = {
    "sensitivity_accumulate": ("torch_foreach", "ref", "ref_compile", "cpp", "triton", "cuda"),
    "select_pivots": ("dense_masked", "ref", "ref_compile", "cpp", "triton", "cuda"),
    "sparse_adamw_step": (
        "dense_masked",
        "dense_masked_foreach",
        "ref",
        "ref_compile",
        "cpp",
        "triton",
        "cuda",
        "optimizer",
        "optimizer_clip",
    ),
}
# Not an op backend: `ppt_fast.SparseAdamW` called as users call it (gradients in p.grad, the default non-finite
# check), with the device's default backend underneath; `optimizer_clip` also calls clip_grad_norm_(1.0) first.
OPTIMIZER_PROVIDERS = ("optimizer", "optimizer_clip")
BASELINE = {
    "sensitivity_accumulate": "torch_foreach",
    "select_pivots": "dense_masked",
    "sparse_adamw_step": "dense_masked",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# AdamW hyper-parameters for every step provider (the values do not change the work done).
LR, BETA1, BETA2, EPS, WD = 1e-4, 0.9, 0.999, 1e-8, 1e-2


@dataclass
class Inputs:
    """The tensors every provider of an op starts from (built once per shape set and reused across providers)."""

    size: str
    layers: int | None
    dtype: str
    device: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] | None = None  # select_pivots' input, built by ensure_scores()

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def make_inputs(size: str, layers: int | None, dtype: str, device: str, seed: int = 0) -> Inputs:
    """Random params and grads at the model's shapes (params ~ N(0, 0.02), grads ~ N(0, 1e-3))."""
    named = shapes_mod.model_shapes(size, layers)
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[dtype]
    inp = Inputs(size, layers, dtype, device, [n for n, _ in named], [s for _, s in named])
    for _, s in named:
        inp.params.append(torch.empty(s, dtype=dt, device=device).normal_(0.0, 0.02, generator=gen))
        inp.grads.append(torch.empty(s, dtype=dt, device=device).normal_(0.0, 1e-3, generator=gen))
    return inp


def ensure_scores(inp: Inputs) -> list[torch.Tensor]:
    """grad_sq-like fp32 scores (g²), shared by every select_pivots provider, so no provider's memory counts them."""
    if inp.scores is None:
        inp.scores = [g.float().square() for g in inp.grads]
    return inp.scores


def random_pivots(inp: Inputs, density: float, seed: int = 1):
    """A PivotSet with each entry pivotal independently with probability `density` (uniform positions, as a global
    top-k over noise-like scores gives); k ~ density * N."""
    from ppt_fast.pivots import PivotSet

    gen = torch.Generator(device=inp.device).manual_seed(seed)
    parts, offsets = [], [0]
    for p in inp.params:
        keep = torch.rand(p.numel(), generator=gen, device=inp.device) < density
        idx = torch.nonzero(keep).reshape(-1).to(torch.int32)
        del keep
        parts.append(idx)
        offsets.append(offsets[-1] + idx.numel())
    return PivotSet(inp.names, inp.shapes, offsets, torch.cat(parts))


# ---- availability ------------------------------------------------------------------------------------------------


def skip_reason(op: str, provider: str, device: str) -> str | None:
    """None when `provider` can run `op` on `device` here, else why not (the benchmark is skipped with it)."""
    dev = torch.device(device)
    if provider in KERNEL_BACKENDS:
        from ppt_fast import _backend

        if provider in _backend.available_backends(op, dev):
            if provider == "triton" and dev.type == "cpu":
                return "triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): a correctness lane, not speed"
            return None
        return _backend.why_unavailable(op, provider, dev) or f"{provider} not available for {op} on {device}"
    if provider == "ref_compile":
        if os.environ.get("PPT_FAST_BENCH_COMPILE", "1") == "0":
            return "PPT_FAST_BENCH_COMPILE=0 (torch.compile disabled for this run)"
        if dev.type == "cuda" and not torch.utils._triton.has_triton():
            return "torch.compile on CUDA needs triton"
        return None
    if provider in ("dense_masked", "dense_masked_foreach", "torch_foreach"):
        return None
    if provider in OPTIMIZER_PROVIDERS:
        return None if op == "sparse_adamw_step" else f"{provider} is a sparse_adamw_step provider"
    return f"unknown provider {provider!r}"


# ---- byte floors (DESIGN.md §4) ----------------------------------------------------------------------------------


def sensitivity_bytes(inp: Inputs, score_dtype: torch.dtype = torch.float32) -> int:
    """grad_sq: read g, read + write the score."""
    g = DTYPES[inp.dtype].itemsize
    s = score_dtype.itemsize
    return inp.numel * (g + 2 * s)


def select_bytes(n: int, k: int, n_tensors: int, score_bytes: int = 4) -> int:
    """The contract's algorithm: two histogram passes + one compaction pass over the N scores, k int32 indices out
    (+ per-tensor counts). A sort-free select cannot do fewer than one read; this floor is the 3-pass design's."""
    return 3 * n * score_bytes + 4 * k + 8 * n_tensors


def step_bytes(inp: Inputs, pivots, line: int) -> dict:
    """What the memory system moves for one sparse AdamW step: m, v read + written (16 B), the int32 index (4 B),
    the fp32 master read + written where params are 16-bit (8 B) per pivot; and every distinct cache line (CPU 64 B)
    or sector (GPU 32 B) of g read and of θ read + written back, counted from the real indices (at 1 % nearly every
    pivot owns its line; at 5 % neighbours start to share)."""
    itemsize = DTYPES[inp.dtype].itemsize
    per_line = max(1, line // itemsize)
    lines = 0
    for i in range(len(pivots)):
        idx = pivots.indices_of(i)
        if idx.numel():
            lines += int(torch.unique_consecutive(torch.div(idx, per_line, rounding_mode="floor")).numel())
    k = pivots.count
    stream = k * (16 + 4 + (8 if inp.dtype != "fp32" else 0))
    return {"bytes": stream + lines * line * 3, "lines_touched": lines, "stream_bytes": stream}


def cache_line(device: str) -> int:
    return 32 if device.startswith("cuda") else 64


# ---- runnables -------------------------------------------------------------------------------------------------


@dataclass
class Case:
    run: Callable[[], object]
    bytes_moved: int
    info: dict = field(default_factory=dict)


def _forced(provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    from ppt_fast import _backend

    def run():
        with _backend.force(provider):
            return fn()

    return run


@functools.cache
def _compiled(name: str) -> Callable:
    """torch.compile of one reference, made once per process. dynamic=True: one graph for every tensor shape."""
    if name == "sensitivity_accumulate":
        from ppt_fast.ops.sensitivity_accumulate import _sensitivity_accumulate_ref as f
    elif name == "select_pivots":
        from ppt_fast.ops.select_pivots import _select_pivots_ref as f
    else:
        from ppt_fast.ops.sparse_adamw_step import _sparse_adamw_step_ref as f
    return torch.compile(f, dynamic=True)


def sensitivity_case(inp: Inputs, provider: str) -> Case:
    from ppt_fast import sensitivity_accumulate

    scores = [torch.zeros(s, dtype=torch.float32, device=inp.device) for s in inp.shapes]
    grads = inp.grads
    if provider == "torch_foreach":
        g32 = grads if inp.dtype == "fp32" else None

        def run():
            if g32 is not None:
                torch._foreach_addcmul_(scores, g32, g32)
            else:  # 16-bit grads: upcast per tensor, the one rounding into fp32 scores
                torch._foreach_add_(scores, torch._foreach_mul([g.float() for g in grads], [g.float() for g in grads]))

    elif provider == "ref_compile":
        f = _compiled("sensitivity_accumulate")

        def run():  # per tensor: compiling the whole 300-tensor list takes minutes on a 2-core CPU
            for s, g in zip(scores, grads):
                f([s], [g], None, "grad_sq")

    else:
        run = _forced(provider, lambda: sensitivity_accumulate(scores, grads, mode="grad_sq"))
    return Case(run, sensitivity_bytes(inp), {"mode": "grad_sq", "score_dtype": "fp32"})


def select_case(inp: Inputs, provider: str, density: float) -> Case:
    from ppt_fast import select_pivots
    from ppt_fast.ops.select_pivots import resolve_k

    scores = ensure_scores(inp)
    n = sum(s.numel() for s in scores)
    k = resolve_k(n, density, None)
    if provider == "dense_masked":
        numels = [s.numel() for s in scores]

        def run():
            flat = torch.cat([s.reshape(-1) for s in scores])
            top = torch.topk(flat, k, sorted=False).indices
            del flat
            mask = torch.zeros(n, dtype=torch.bool, device=inp.device)
            mask[top] = True
            return [m.view(s.shape) for m, s in zip(mask.split(numels), scores)]

    elif provider == "ref_compile":
        f = _compiled("select_pivots")

        def run():
            return f(scores, k)

    else:
        run = _forced(provider, lambda: select_pivots(scores, count=k, names=inp.names))
    return Case(run, select_bytes(n, k, len(scores)), {"k": k, "n": n})


def _fused_supported(device: torch.device) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _dense_masked_optimizer(names: list[str], params: list[torch.Tensor], pivots, fused: bool | None = None):
    """The dense masked baseline over `params` (named like `pivots`): ppt_fast.optim.DenseMaskedAdamW over torch's
    fused AdamW (`fused=None`: where the device supports it, the fastest torch AdamW) or foreach AdamW
    (`fused=False`). Returns (optimizer, label)."""
    from ppt_fast.optim import DenseMaskedAdamW

    if fused is None:
        fused = _fused_supported(params[0].device)
    opt = DenseMaskedAdamW(
        list(zip(names, params)), pivots, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD,
        **({"fused": True} if fused else {"foreach": True}),
    )  # fmt: skip
    return opt, "ppt_fast.optim.DenseMaskedAdamW (" + ("fused" if fused else "foreach") + ")"


def step_case(inp: Inputs, provider: str, density: float, pivots=None) -> Case:
    from ppt_fast import sparse_adamw_step

    pivots = pivots if pivots is not None else random_pivots(inp, density)
    floor = step_bytes(inp, pivots, cache_line(inp.device))
    info = {"k": pivots.count, "n": pivots.total, **{k: v for k, v in floor.items() if k != "bytes"}}
    # Every provider works on the shared params/grads (no copies, so none is charged memory for one): updates touch
    # the pivots only and DenseMaskedAdamW zeroes grads outside them, which changes no later provider's work.
    if provider in ("dense_masked", "dense_masked_foreach"):
        params = [torch.nn.Parameter(p, requires_grad=True) for p in inp.params]  # same storage
        for p, g in zip(params, inp.grads):
            p.grad = g
        fused = False if provider == "dense_masked_foreach" else None
        opt, impl = _dense_masked_optimizer(inp.names, params, pivots, fused=fused)
        info["dense_impl"] = impl
        return Case(opt.step, floor["bytes"], info)
    if provider in OPTIMIZER_PROVIDERS:
        from ppt_fast import SparseAdamW

        params = [torch.nn.Parameter(p, requires_grad=True) for p in inp.params]  # same storage
        for p, g in zip(params, inp.grads):
            p.grad = g
        opt = SparseAdamW(list(zip(inp.names, params)), pivots, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
        info["optimizer"] = "ppt_fast.SparseAdamW(nonfinite='skip')" + (
            " + clip_grad_norm_(1.0)" if provider == "optimizer_clip" else ""
        )
        if provider == "optimizer":
            return Case(opt.step, floor["bytes"], info)

        def clipped_step():
            opt.clip_grad_norm_(1.0)
            opt.step()

        return Case(clipped_step, floor["bytes"], info)
    params = inp.params
    k = pivots.count
    m = torch.zeros(k, dtype=torch.float32, device=inp.device)
    v = torch.zeros(k, dtype=torch.float32, device=inp.device)
    master = None
    if inp.dtype != "fp32":
        master = torch.cat([p.reshape(-1)[idx.long()].float() for p, (_, idx) in zip(params, pivots)])
    offsets = pivots.offsets_list
    indices = pivots.indices
    counter = [0]
    if provider == "ref_compile":
        f = _compiled("sparse_adamw_step")
        # Per tensor with its own state slices: a compiled graph over all ~300 tensors takes minutes to build here.
        per = []
        for i, p in enumerate(params):
            lo, hi = offsets[i], offsets[i + 1]
            if hi > lo:
                mi = None if master is None else master[lo:hi].clone()
                per.append((p, inp.grads[i], indices[lo:hi].clone(), m[lo:hi].clone(), v[lo:hi].clone(), mi))

        def run():
            counter[0] += 1
            for p, g, idx, mi, vi, ma in per:
                f([p], [g], [0, idx.numel()], idx, mi, vi, ma, None, None, None, None, None, LR, BETA1, BETA2, EPS, WD,
                  counter[0])  # fmt: skip

        return Case(run, floor["bytes"], info)

    def step():
        counter[0] += 1
        sparse_adamw_step(
            params, inp.grads, offsets, indices, m, v, master,
            step=counter[0], lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD,
        )  # fmt: skip

    return Case(_forced(provider, step), floor["bytes"], info)


def build_case(op: str, inp: Inputs, provider: str, density: float | None = None) -> Case:
    if op == "sensitivity_accumulate":
        return sensitivity_case(inp, provider)
    if op == "select_pivots":
        return select_case(inp, provider, density)
    if op == "sparse_adamw_step":
        return step_case(inp, provider, density)
    raise ValueError(f"unknown op {op!r}; choose one of {OPS}")


def fmt_density(d: float) -> str:
    """0.01 -> '1%', 0.001 -> '0.1%'."""
    pct = 100 * d
    return f"{pct:g}%" if not math.isclose(pct, round(pct, 3)) else f"{round(pct, 3):g}%"
