"""Peak memory of op-level cases, measured in a fresh process (so no other benchmark's allocations interfere).

    python benchmarks/memprobe.py '{"op": ..., "providers": ["dense_masked", "cpp"], "size": ..., "layers": ...,
                                    "dtype": ..., "device": ..., "densities": [0.001, 0.01, 0.05]}'

One process per (op, shapes, dtype) group, for all of its providers: every provider's case is first run once on the
tiny layout (imports, thread pools, kernel caches exist before any baseline is taken). CPU: the inputs every provider
shares (params, grads; scores for select_pivots) are built once (musicgen-small: 420 M entries, ~10 s; one build per
provider was a tenth of `make bench`); then, for each provider and each density in turn (one value `null` for ops
without a density), the pivot set is built (an input of every step provider), the peak-RSS mark is reset (Linux
`/proc/self/clear_refs`), the provider's own structures are built (masks, optimizer state, pivot state) and its op
runs (twice for the stateful sparse step, whose first call allocates the optimizer state; once for the stateless
ops); `peak_extra_bytes` = peak RSS - RSS before the provider's structures. Everything the case built is freed before
the next (provider, density). GPU: the same with `torch.cuda.reset_peak_memory_stats` / `max_memory_allocated`. The
parent sets MALLOC_MMAP_THRESHOLD_ so glibc maps (and returns) every large block instead of keeping freed memory
resident, which would hide allocations from RSS (and carry one case's peak into the next).
Prints one JSON line: ``{"by_provider": {"<provider>": {"by_density": {"<density>": {...}}}}}``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repo, after anything on PYTHONPATH

import cases  # noqa: E402
import provenance  # noqa: E402
import torch  # noqa: E402


def _warm_up(spec: dict, providers: list[str]) -> None:
    """Run each provider's case twice on the tiny layout first, so imports, thread pools, kernel caches and (for
    ref_compile) the compiled graph exist before any baseline is taken and are not counted as an op's memory."""
    tiny = cases.make_inputs("tiny", None, spec["dtype"], spec["device"])
    for provider in providers:
        case = cases.build_case(spec["op"], tiny, provider, spec.get("density"))
        case.run()
        case.run()
        del case
    del tiny
    gc.collect()


def _one(spec: dict, provider: str, inp, density) -> dict:
    device = spec["device"]
    cuda = device.startswith("cuda")
    pivots = None
    if spec["op"] == "sparse_adamw_step":  # the pivot set is an input to every step provider, dense ones included
        pivots = cases.random_pivots(inp, density)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        if not provenance.reset_peak_rss():
            return {"error": "cannot reset peak RSS (/proc/self/clear_refs not writable)"}
        base = provenance.peak_rss_bytes()  # the mark just set: the peak read later cannot be below it
    if spec["op"] == "sparse_adamw_step":
        case = cases.step_case(inp, provider, density, pivots=pivots)
    else:
        case = cases.build_case(spec["op"], inp, provider, density)
    for _ in range(2 if spec["op"] == "sparse_adamw_step" else 1):
        out = case.run()
        del out
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kind = "torch.cuda.max_memory_allocated"
    else:
        peak = provenance.peak_rss_bytes()
        kind = "peak RSS (VmHWM, reset after the shared inputs)"
    del case, pivots
    return {"peak_extra_bytes": int(peak - base), "base_bytes": int(base), "peak_bytes": int(peak), "kind": kind}


def measure(spec: dict) -> dict:
    densities = spec.get("densities", [spec.get("density")])
    providers = list(spec.get("providers") or [spec["provider"]])
    _warm_up({**spec, "density": densities[0]}, providers)
    inp = cases.make_inputs(spec["size"], spec.get("layers"), spec["dtype"], spec["device"])
    if spec["op"] == "select_pivots":  # the scores are an input to every select provider
        cases.ensure_scores(inp)
    return {"by_provider": {p: {"by_density": {str(d): _one(spec, p, inp, d) for d in densities}} for p in providers}}


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    print(json.dumps(measure(json.loads(sys.argv[1]))))
