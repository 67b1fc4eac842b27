"""End to end: one tuning step (forward, backward, and the optimizer step or the sensitivity scoring) on the tiny
model and on musicgen-small's shapes (random init, B = 1, 5 s of codes), dense masked vs ppt_fast, recipe `ppt` at
1 % of the in-scope entries. Every configuration runs in a fresh subprocess (`tune_probe.py`), which reports the
median step time and the peak memory (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated).
"""

import importlib.util
import json
import os
import subprocess
import sys

import provenance
import pytest
from harness import HERE, versions_brief

OP = "tune_step"
DENSITY = 0.01
STEPS = {"tiny": 3, "small": 1}  # small: ~1 min to build per fresh process, seconds per step


@pytest.mark.parametrize("phase", ["train", "sensitivity"])
@pytest.mark.parametrize("method", ["dense_masked", "ppt_fast"])
def test_tune_step(benchmark, bench_cfg, e2e_model, phase, method):
    if phase == "sensitivity" and e2e_model not in bench_cfg.e2e_sensitivity:
        pytest.skip(f"the sensitivity phase of {e2e_model} is not in this suite (--bench-e2e-sensitivity)")
    if importlib.util.find_spec("audiocraft") is None:
        pytest.skip("audiocraft is not installed (the end-to-end step runs an audiocraft MusicGen LM)")
    spec = {"model": e2e_model, "method": method, "phase": phase, "density": DENSITY, "device": bench_cfg.device,
            "seconds": 5.0, "steps": STEPS.get(e2e_model, 2)}  # fmt: skip
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    proc = subprocess.run([sys.executable, str(HERE / "tune_probe.py"), json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=1200)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"tune_probe failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    res = json.loads(lines[-1])
    benchmark.group = f"tune_step | {e2e_model} | {phase}"
    # The step was timed inside the probe; hand its median to pytest-benchmark so the JSON has one schema.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "op": OP,
            "provider": method,
            "baseline": "dense_masked",
            "model": e2e_model,
            "phase": phase,
            "density": DENSITY,
            "recipe": "ppt",
            "batch": 1,
            "seconds_of_audio": 5.0,
            "device": bench_cfg.device,
            "device_name": provenance.device_name(bench_cfg.device),
            "versions": versions_brief(),
            "median_seconds": res["step_seconds"],
            **res,
        }  # fmt: skip
    )
