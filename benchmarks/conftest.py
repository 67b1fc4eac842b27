"""pytest-benchmark configuration shared by the suites: options, parametrization, input cache, the common runner.

Run through `python benchmarks/run.py --suite cpu|gpu` (which sets these options and writes the results JSON), or
directly: `pytest benchmarks/bench_sparse_adamw_step.py -o python_files='bench_*.py' --bench-sizes small
--bench-layers small=2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
from harness import _config, record_collected  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("ppt_fast benchmarks")
    g.addoption("--bench-device", default="cpu", help="cpu or cuda")
    g.addoption("--bench-sizes", default="small,medium,large", help="comma list of tiny,small,medium,large")
    g.addoption(
        "--bench-layers",
        default="",
        help="transformer layers per size, e.g. 'small=24,medium=4' (default: whole on GPU; CPU small=24, medium=2, "
        "large=1)",
    )
    g.addoption("--bench-densities", default="0.001,0.01,0.05", help="pivot densities (fractions)")
    g.addoption("--bench-dtypes", default="fp32", help="parameter dtypes: fp32,bf16")
    g.addoption("--bench-rounds", type=int, default=3, help="timed rounds per case (after one warm-up call)")
    g.addoption(
        "--bench-mem-sizes",
        default="small",
        help="sizes whose cases also get a peak-memory measurement (a fresh subprocess per op and shapes); '' for none",
    )
    g.addoption("--bench-case-seconds", type=float, default=10.0, help="time budget per case: fewer rounds if slow")
    g.addoption("--bench-optmem-size", default="small", help="model whose optimizer state is measured")
    g.addoption("--bench-e2e-models", default="tiny,small", help="end-to-end models: tiny,small")
    g.addoption("--bench-loss-models", default="tiny,small", help="models of the loss benchmark: tiny,small")
    g.addoption("--bench-peer-models", default="small", help="models of the PEFT peers' tune step: tiny,small,medium")
    g.addoption("--bench-dist-models", default="small",
                help="models of the several-process tune step (2 gloo processes): tiny,small")  # fmt: skip
    g.addoption(
        "--bench-e2e-sensitivity",
        default="tiny,small",
        help="end-to-end models whose sensitivity phase is measured too (the train phase always is)",
    )


@pytest.fixture(scope="session")
def bench_cfg(request):
    cfg = _config(request.config)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch.cuda.is_available() is False (no GPU or a CPU torch build)")
    return cfg


def pytest_generate_tests(metafunc):
    cfg = _config(metafunc.config)
    op = getattr(metafunc.module, "OP", None)
    if "provider" in metafunc.fixturenames and op is not None:
        metafunc.parametrize("provider", cases.PROVIDERS[op])
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", cfg.sizes)
    if "density" in metafunc.fixturenames:
        metafunc.parametrize("density", cfg.densities, ids=[cases.fmt_density(d) for d in cfg.densities])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", cfg.dtypes)
    if "e2e_model" in metafunc.fixturenames:
        metafunc.parametrize("e2e_model", cfg.e2e_models)
    if "peer_model" in metafunc.fixturenames:
        metafunc.parametrize("peer_model", cfg.peer_models)
    if "loss_model" in metafunc.fixturenames:
        metafunc.parametrize("loss_model", cfg.loss_models)
    if "dist_model" in metafunc.fixturenames:
        metafunc.parametrize("dist_model", cfg.dist_models)


_SIZE_ORDER = {"tiny": 0, "small": 1, "medium": 2, "large": 3}


def pytest_collection_modifyitems(config, items):
    """Group cases by shape set so each input set is built once (sizes outermost, then dtype, density, provider)."""

    def key(item):
        cs = getattr(item, "callspec", None)
        p = cs.params if cs else {}
        op = getattr(item.module, "OP", "")
        provs = cases.PROVIDERS.get(op, ())
        prov = p.get("provider")
        return (
            item.fspath.basename,
            _SIZE_ORDER.get(p.get("size"), 9),
            p.get("dtype", ""),
            p.get("density", 0.0),
            provs.index(prov) if prov in provs else 0,
        )

    items.sort(key=key)


def pytest_collection_finish(session):
    record_collected(session.items)  # after every deselection (-k, -m): the providers that will really run
