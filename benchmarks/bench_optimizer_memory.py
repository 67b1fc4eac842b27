"""Optimizer memory: `SparseAdamW.state_bytes()` vs the dense masked AdamW baseline's (`DenseMaskedAdamW`: torch
AdamW's exp_avg/exp_avg_sq/step + the bool masks) over every tensor of musicgen-small (`--bench-optmem-size`), at
each density, for fp32 and bf16 parameters. Both optimizers are real and the dense one has taken a step (torch
allocates its state lazily), so the bytes are those of the tensors that exist, not a formula.

Expected (DESIGN §6): fp32 params, dense 8 B/param (+1 B mask) vs ~12 B/pivot -> ~66x at 1 %; bf16 params: torch
keeps bf16 moments (4 B/param + mask) vs 16 B/pivot (fp32 moments + fp32 master + index) -> ~25x.
"""

import gc
import importlib.util

import cases
import provenance
import pytest
import shapes
import torch
from harness import versions_brief

OP = "optimizer_memory"
DTYPES = ("fp32", "bf16")
_DENSE: dict[tuple, tuple[int, str, float]] = {}


@pytest.mark.parametrize("param_dtype", DTYPES)
def test_optimizer_memory(benchmark, bench_cfg, density, param_dtype):
    if importlib.util.find_spec("ppt_fast.optim") is None:
        pytest.skip("ppt_fast.optim (SparseAdamW / DenseMaskedAdamW) is not in this checkout yet")
    from ppt_fast.optim import SparseAdamW

    SIZE = bench_cfg.optmem_size  # noqa: N806 - musicgen-small unless the suite says otherwise
    layers = bench_cfg.layers_for(SIZE)
    named = shapes.model_shapes(SIZE, layers)
    dt = cases.DTYPES[param_dtype]
    dev = bench_cfg.device
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dt, device=dev)) for _, s in named]
    names = [n for n, _ in named]
    inp = cases.Inputs(SIZE, layers, param_dtype, dev, names, [s for _, s in named], params=params)
    pivots = cases.random_pivots(inp, density)
    sparse = SparseAdamW(list(zip(names, params)), pivots, lr=cases.LR, weight_decay=cases.WD)
    sparse_bytes = sparse.state_bytes()
    del sparse
    gc.collect()
    # The dense masked optimizer holds the same tensors at every density (moments and a bool mask per entry): built
    # once per parameter dtype and layout, at the first density this suite runs.
    key = (SIZE, layers, param_dtype, dev)
    if key not in _DENSE:
        dense, impl = cases._dense_masked_optimizer(names, params, pivots)
        for p in params:
            p.grad = torch.zeros_like(p)
        dense.step()  # torch AdamW creates exp_avg / exp_avg_sq at the first step
        _DENSE[key] = (dense.state_bytes(), impl, density)
        del dense
        for p in params:
            p.grad = None
        gc.collect()
    dense_bytes, impl, dense_density = _DENSE[key]
    n = pivots.total
    m = shapes.MODELS[SIZE]
    benchmark.group = f"optimizer_memory | {shapes.describe(SIZE, layers)} | {param_dtype}"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "op": OP,
            "provider": "sparse_adamw",
            "baseline": "dense_masked",
            "model": m.name,
            "size": SIZE,
            "layers": m.num_layers if layers is None else min(layers, m.num_layers),
            "layers_total": m.num_layers,
            "tensors": len(names),
            "numel": n,
            "k": pivots.count,
            "density": density,
            "dtype": param_dtype,
            "device": dev,
            "device_name": provenance.device_name(dev),
            "versions": versions_brief(),
            "sparse_state_bytes": sparse_bytes,
            "dense_state_bytes": dense_bytes,
            "dense_impl": impl,
            "dense_measured_at_density": dense_density,
            "sparse_bytes_per_pivot": sparse_bytes / max(1, pivots.count),
            "dense_bytes_per_param": dense_bytes / n,
            "ratio_dense_over_sparse": dense_bytes / max(1, sparse_bytes),
        }  # fmt: skip
    )
