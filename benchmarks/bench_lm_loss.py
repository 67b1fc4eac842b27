"""MusicGen's training loss, forward + backward: MusicGenSolver's path (baseline) vs `pattern_cross_entropy`, on the
embedded default's LM with its pretraining batch and on musicgen-small's shapes. Each configuration runs in a fresh
subprocess (`loss_probe.py`), twice: once for the median time (default allocator), once for the peak memory over
the built model and batch (glibc's mmap threshold lowered, so freed blocks leave RSS).
"""

import importlib.util
import json
import os
import subprocess
import sys

import provenance
import pytest
from harness import HERE, versions_brief

OP = "lm_loss"
STEPS = {"tiny": 5, "small": 3}


def _probe(spec: dict, mmap_threshold: bool) -> dict:
    env = dict(os.environ)
    if mmap_threshold:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, str(HERE / "loss_probe.py"), json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=1200)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"loss_probe failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("loss_path", ["solver", "pattern"])
def test_lm_loss(benchmark, bench_cfg, loss_model, loss_path):
    if importlib.util.find_spec("audiocraft") is None:
        pytest.skip("audiocraft is not installed (the loss runs an audiocraft MusicGen LM)")
    spec = {"model": loss_model, "provider": loss_path, "device": bench_cfg.device, "steps": STEPS.get(loss_model, 3)}
    # Two fresh processes: time with the default allocator (the mmap threshold below page-faults every large
    # buffer afresh and slows the path that allocates more), peak memory with it (freed blocks leave RSS).
    res = _probe(spec, mmap_threshold=False)
    mem = _probe(spec, mmap_threshold=True)
    res.update({k: v for k, v in mem.items() if k.endswith("_bytes") and k != "logits_bytes"})
    res["memory_kind"] = mem["memory_kind"]
    res["step_seconds_under_mmap_threshold"] = mem["step_seconds"]
    benchmark.group = f"lm_loss | {loss_model}"
    # Timed inside the probe; its median goes to pytest-benchmark so the JSON has one schema.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "op": OP,
            "provider": loss_path,
            "baseline": "solver",
            "model": loss_model,
            "device": bench_cfg.device,
            "device_name": provenance.device_name(bench_cfg.device),
            "versions": versions_brief(),
            "median_seconds": res["step_seconds"],
            **res,
        }
    )
