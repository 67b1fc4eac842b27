"""Tuning on several processes: bytes all-reduced per tune step and the all-reduce time, ppt_fast (one packed
buffer of the pivot and token gradients) against DDP over dense-masked tuning of the same tensors (every gradient
of every trained tensor), 2 gloo processes on this machine, side by side in one run (`dist_probe.py`).

The bytes are exact (the collectives' buffers) and do not depend on the machine; the times do (loopback here; the
docs turn the bytes into times for NVLink and Ethernet).
"""

import pytest
from harness import record_probe, run_probe

OP = "dist_tune_step"
DENSITY = 0.01
ARMS = ["ppt_fast", "ddp_dense_masked"]


@pytest.mark.parametrize("method", ARMS)
def test_dist_tune_step(benchmark, bench_cfg, dist_model, method):
    if bench_cfg.device != "cpu":
        pytest.skip("the several-process benchmark runs gloo on CPU processes (one GPU on the GPU machine)")
    spec = {"model": dist_model, "method": method, "world": 2, "steps": 2, "density": DENSITY,
            "seconds": 5.0 if dist_model != "tiny" else 1.0}  # fmt: skip
    res = run_probe("dist_probe.py", spec, mmap_threshold=False, timeout=1800)
    record_probe(benchmark, bench_cfg, f"dist_tune_step | {dist_model}", res, op=OP, provider=method,
                 baseline="ddp_dense_masked", model=dist_model, density=DENSITY, recipe="ppt", processes=2,
                 backend="gloo")  # fmt: skip
