"""The machinery the benchmark suites share: configuration, input cache, peak-memory subprocess, and the runner
that times one op-level case and fills extra_info. (Kept out of conftest.py: `tests/conftest.py` is also imported
as `conftest`, so bench files import from here.)"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # the repo, after anything on PYTHONPATH (a worktree may shadow it on purpose)

import cases  # noqa: E402
import provenance  # noqa: E402
import shapes  # noqa: E402

# CPU defaults: musicgen-small whole (300 tensors, 420 M entries); medium and large as a slice of layers (+ heads),
# because the whole models need 7-13 GB per fp32 copy and a dense AdamW step holds four copies (params, grads, m, v).
DEFAULT_LAYERS = {"cpu": {"small": 24, "medium": 2, "large": 1, "tiny": 2}, "cuda": {}}


@dataclass
class BenchConfig:
    device: str
    sizes: list[str]
    layers: dict[str, int | None]
    densities: list[float]
    dtypes: list[str]
    rounds: int
    mem_sizes: list[str]
    case_seconds: float
    e2e_models: list[str]
    optmem_size: str
    e2e_sensitivity: list[str]
    peer_models: list[str]
    loss_models: list[str]
    dist_models: list[str]

    def layers_for(self, size: str) -> int | None:
        return self.layers.get(size)


def _parse_layers(text: str, device: str) -> dict[str, int | None]:
    out: dict[str, int | None] = dict(DEFAULT_LAYERS["cuda" if device.startswith("cuda") else "cpu"])
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        out[name.strip()] = None if value.strip() in ("", "all") else int(value)
    return out


def _config(config) -> BenchConfig:
    device = config.getoption("--bench-device")
    return BenchConfig(
        device=device,
        sizes=[s for s in config.getoption("--bench-sizes").split(",") if s],
        layers=_parse_layers(config.getoption("--bench-layers"), device),
        densities=[float(x) for x in config.getoption("--bench-densities").split(",") if x],
        dtypes=[d for d in config.getoption("--bench-dtypes").split(",") if d],
        rounds=config.getoption("--bench-rounds"),
        mem_sizes=[s for s in config.getoption("--bench-mem-sizes").split(",") if s],
        case_seconds=config.getoption("--bench-case-seconds"),
        e2e_models=[m for m in config.getoption("--bench-e2e-models").split(",") if m],
        optmem_size=config.getoption("--bench-optmem-size"),
        e2e_sensitivity=[m for m in config.getoption("--bench-e2e-sensitivity").split(",") if m],
        peer_models=[m for m in config.getoption("--bench-peer-models").split(",") if m],
        loss_models=[m for m in config.getoption("--bench-loss-models").split(",") if m],
        dist_models=[m for m in config.getoption("--bench-dist-models").split(",") if m],
    )


class _InputCache:
    """Holds the one input set in use; building another frees the previous (a whole musicgen-small is 3.4 GB)."""

    def __init__(self):
        self.key = None
        self.value = None
        self.pivots: dict = {}

    def get(self, size, layers, dtype, device) -> cases.Inputs:
        key = (size, layers, dtype, device)
        if key != self.key:
            self.key, self.value, self.pivots = None, None, {}
            gc.collect()
            self.value = cases.make_inputs(size, layers, dtype, device)
            self.key = key
        return self.value

    def release(self) -> None:
        self.key, self.value, self.pivots = None, None, {}
        gc.collect()

    def pivots_for(self, density: float):
        if density not in self.pivots:
            self.pivots = {density: cases.random_pivots(self.value, density)}
        return self.pivots[density]


_CACHE = _InputCache()


def versions_brief() -> dict:
    import importlib.util

    triton = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton as _t

            triton = _t.__version__
        except Exception:  # noqa: BLE001
            triton = "unimportable"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton}


_MEM_CACHE: dict[tuple, dict] = {}
# (op, size, dtype) -> the providers this session runs, in run order (filled at collection, after `-k` / `-m`).
COLLECTED: dict[tuple[str, str, str], list[str]] = {}


def record_collected(items) -> None:
    """Note which providers of each (op, size, dtype) the session will run, so one memory probe measures them all."""
    COLLECTED.clear()
    for item in items:
        cs = getattr(item, "callspec", None)
        op = getattr(item.module, "OP", None)
        if cs is None or op is None or "provider" not in cs.params:
            continue
        key = (op, cs.params.get("size"), cs.params.get("dtype"))
        provs = COLLECTED.setdefault(key, [])
        if cs.params["provider"] not in provs:
            provs.append(cs.params["provider"])


def _mem_providers(spec: dict) -> list[str]:
    """The providers the memory probe of `spec`'s group measures: those collected for its (op, size, dtype) that can
    run here, except ref_compile (inductor's compile-time memory would be counted); `spec`'s own provider always."""
    found = COLLECTED.get((spec["op"], spec["size"], spec["dtype"]), [])
    out = [p for p in found if p != "ref_compile" and cases.skip_reason(spec["op"], p, spec["device"]) is None]
    return out if spec["provider"] in out else out + [spec["provider"]]


def peak_memory_for(spec: dict, densities: list[float] | None) -> dict:
    """Peak memory of one case. The first case of an (op, shapes, dtype) group runs `memprobe.py` once for all of
    the group's providers and the suite's densities (one fresh process builds the shared inputs once); the others
    read its result. A provider the probe did not cover (run alone, say) gets a probe of its own."""
    group = tuple((k, spec[k]) for k in ("op", "size", "layers", "dtype", "device"))
    key = group + (("provider", spec["provider"]),)
    if key not in _MEM_CACHE:
        providers = [p for p in _mem_providers(spec) if group + (("provider", p),) not in _MEM_CACHE]
        res = measure_peak_memory({**spec, "providers": providers, "densities": densities or [None]},
                                  timeout=900.0 * len(providers))  # fmt: skip
        for p in providers:
            _MEM_CACHE[group + (("provider", p),)] = res if "error" in res else res["by_provider"][p]
    res = _MEM_CACHE[key]
    if "error" in res:
        return res
    return res["by_density"].get(str(spec.get("density")), {"error": "density not measured"})


def measure_peak_memory(spec: dict, timeout: float = 900.0) -> dict:
    """Run `memprobe.py` for one case group in a fresh interpreter; returns its JSON (or {'error': ...})."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # fixed threshold: freed big blocks leave RSS at once
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "memprobe.py"), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memprobe timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"memprobe exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "memprobe printed no JSON"}


def run_probe(script: str, spec: dict, *, mmap_threshold: bool = True, timeout: float = 1200.0) -> dict:
    """Run a probe script (`tune_probe.py`, `loss_probe.py`) on `spec` in a fresh interpreter and return its last JSON
    line; the test fails with the probe's stderr otherwise. `mmap_threshold`: glibc maps (and returns) every large
    block, so freed memory leaves RSS (for peak memory); off, large buffers are reused as usual (for timing)."""
    env = dict(os.environ)
    if mmap_threshold:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, str(HERE / script), json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{script} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def record_probe(benchmark, cfg: BenchConfig, group: str, res: dict, **info) -> None:
    """Hand a probe's result to pytest-benchmark: the step was timed inside the probe, so the benchmark runs a no-op
    once and its median goes to extra_info (with `info`, the device and versions) to keep one JSON schema."""
    benchmark.group = group
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            **info,
            "device": cfg.device,
            "device_name": provenance.device_name(cfg.device),
            "versions": versions_brief(),
            "median_seconds": res["step_seconds"],
            **res,
        }  # fmt: skip
    )


def run_op_benchmark(benchmark, cfg: BenchConfig, op: str, provider: str, size: str, dtype: str, density=None):
    """The body of every op-level benchmark: skip with a reason where the provider cannot run, time the case with
    pytest-benchmark, and record bytes moved / GB/s / % of a memory copy / peak memory / device in extra_info."""
    reason = cases.skip_reason(op, provider, cfg.device)
    if reason:
        pytest.skip(reason)
    layers = cfg.layers_for(size)
    inp = _CACHE.get(size, layers, dtype, cfg.device)
    torch.set_grad_enabled(False)
    if op == "select_pivots":
        cases.ensure_scores(inp)
    if op == "sparse_adamw_step":
        case = cases.step_case(inp, provider, density, pivots=_CACHE.pivots_for(density))
    else:
        case = cases.build_case(op, inp, provider, density)

    def run():
        out = case.run()
        provenance.sync(cfg.device)
        return out

    t0 = time.perf_counter()
    try:
        run()  # warm-up: compiles ref_compile, allocates lazily created optimizer state
    except Exception as exc:
        if provider == "ref_compile":
            pytest.skip(f"torch.compile of the reference failed here: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    first_call = time.perf_counter() - t0
    benchmark.group = f"{op} | {shapes.describe(size, layers)} | {dtype}" + (
        f" | density {cases.fmt_density(density)}" if density is not None else ""
    )
    # Slow providers (a Python loop over 300 tensors, a dense topk) get fewer rounds so the suite fits its time; the
    # number of rounds is recorded, and every provider gets at least one timed call after the warm-up, except: a
    # call that alone takes the whole case budget (the dense topk over musicgen-small: ~20 s) is its own measurement,
    # since its one-time costs are a vanishing part of it (not for ref_compile, whose first call compiles).
    first_is_timing = first_call >= cfg.case_seconds and provider != "ref_compile"
    rounds = 0 if first_is_timing else max(1, min(cfg.rounds, int(cfg.case_seconds // max(first_call, 1e-9))))
    benchmark.pedantic((lambda: None) if first_is_timing else run, rounds=max(1, rounds), iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if first_is_timing:
        median = first_call
    elif stats is None:  # --benchmark-disable (the smoke test): pytest-benchmark ran it untimed; time one call here
        t0 = time.perf_counter()
        run()
        median = time.perf_counter() - t0
    else:
        median = stats.stats.median
    m = shapes.MODELS[size]
    n_layers = m.num_layers if layers is None else min(layers, m.num_layers)
    info = {
        "op": op,
        "provider": provider,
        "baseline": cases.BASELINE[op],
        "model": m.name,
        "size": size,
        "layers": n_layers,
        "layers_total": m.num_layers,
        "tensors": len(inp.names),
        "numel": inp.numel,
        "density": density,
        "dtype": dtype,
        "device": cfg.device,
        "device_name": provenance.device_name(cfg.device),
        "versions": versions_brief(),
        "first_call_seconds": first_call,
        "median_seconds": median,
        "rounds": rounds,
        "timing": "the first call (it alone exceeds --bench-case-seconds)" if first_is_timing else "after a warm-up",
        **case.info,
    }
    bytes_moved = case.bytes_moved
    case = None  # free the provider's buffers (masks, optimizer state) before the copy reference and the next case
    gc.collect()
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
    info.update(provenance.bandwidth_info(bytes_moved, median, cfg.device))
    if cuda and size in cfg.mem_sizes:
        # The probe runs in another process on the same GPU: give it the memory this process holds for inputs.
        _CACHE.release()
        torch.cuda.empty_cache()
    if size in cfg.mem_sizes and provider == "ref_compile":
        info["mem_note"] = "not measured: inductor's compile-time memory in the same process would be counted"
    elif size in cfg.mem_sizes:
        spec = {"op": op, "provider": provider, "size": size, "layers": layers, "dtype": dtype, "device": cfg.device}
        spec["density"] = density
        mem = peak_memory_for(spec, cfg.densities if density is not None else None)
        info.update({f"mem_{k}": v for k, v in mem.items()})
    benchmark.extra_info.update(info)
