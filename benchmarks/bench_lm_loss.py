"""MusicGen's training loss, forward + backward: MusicGenSolver's path (baseline) vs `pattern_cross_entropy`, on the
embedded default's LM with its pretraining batch and on musicgen-small's shapes. Each configuration runs in a fresh
subprocess (`loss_probe.py`), twice: once for the median time (default allocator), once for the peak memory over
the built model and batch (glibc's mmap threshold lowered, so freed blocks leave RSS).
"""

import importlib.util

import pytest
from harness import record_probe, run_probe

OP = "lm_loss"
STEPS = {"tiny": 5, "small": 3}


@pytest.mark.parametrize("loss_path", ["solver", "pattern"])
def test_lm_loss(benchmark, bench_cfg, loss_model, loss_path):
    if importlib.util.find_spec("audiocraft") is None:
        pytest.skip("audiocraft is not installed (the loss runs an audiocraft MusicGen LM)")
    spec = {"model": loss_model, "provider": loss_path, "device": bench_cfg.device, "steps": STEPS.get(loss_model, 3)}
    # Two fresh processes: time with the default allocator (the mmap threshold below page-faults every large
    # buffer afresh and slows the path that allocates more), peak memory with it (freed blocks leave RSS).
    res = run_probe("loss_probe.py", spec, mmap_threshold=False)
    mem = run_probe("loss_probe.py", spec, mmap_threshold=True)
    res.update({k: v for k, v in mem.items() if k.endswith("_bytes") and k != "logits_bytes"})
    res["memory_kind"] = mem["memory_kind"]
    res["step_seconds_under_mmap_threshold"] = mem["step_seconds"]
    record_probe(benchmark, bench_cfg, f"lm_loss | {loss_model}", res, op=OP, provider=loss_path, baseline="solver",
                 model=loss_model)  # fmt: skip
