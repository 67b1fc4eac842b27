"""End to end: one tuning step (forward, backward, and the optimizer step or the sensitivity scoring) on the tiny
model and on musicgen-small's shapes (random init, B = 1, 5 s of codes), dense masked vs ppt_fast, recipe `ppt` at
1 % of the in-scope entries, on each host: audiocraft's MusicGen and transformers' MusicgenForConditionalGeneration
(recorded as model `hf-<model>`). Every configuration runs in a fresh subprocess (`tune_probe.py`), which reports the
median step time and the peak memory (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated).
"""

import importlib.util

import pytest
from harness import record_probe, run_probe

OP = "tune_step"
DENSITY = 0.01
STEPS = {"tiny": 3, "small": 1}  # small: ~1 min to build per fresh process, seconds per step


@pytest.mark.parametrize("host", ["audiocraft", "transformers"])
@pytest.mark.parametrize("phase", ["train", "sensitivity"])
@pytest.mark.parametrize("method", ["dense_masked", "ppt_fast"])
def test_tune_step(benchmark, bench_cfg, e2e_model, phase, method, host):
    if phase == "sensitivity" and e2e_model not in bench_cfg.e2e_sensitivity:
        pytest.skip(f"the sensitivity phase of {e2e_model} is not in this suite (--bench-e2e-sensitivity)")
    if importlib.util.find_spec(host) is None:
        pytest.skip(f"{host} is not installed (this end-to-end step runs its MusicGen)")
    spec = {"model": e2e_model, "method": method, "phase": phase, "density": DENSITY, "device": bench_cfg.device,
            "seconds": 5.0, "steps": STEPS.get(e2e_model, 2), "host": host}  # fmt: skip
    res = run_probe("tune_probe.py", spec)
    model = e2e_model if host == "audiocraft" else f"hf-{e2e_model}"
    record_probe(benchmark, bench_cfg, f"tune_step | {model} | {phase}", res, op=OP, provider=method,
                 baseline="dense_masked", model=model, phase=phase, density=DENSITY, recipe="ppt", batch=1,
                 seconds_of_audio=5.0, host=host)  # fmt: skip
