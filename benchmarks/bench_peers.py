"""Against what users would pick instead: one tuning step through the transformers host (Hugging Face
MusicgenForConditionalGeneration at musicgen-small / -medium shapes, random init, B = 1, 5 s of codes), each arm of
`ppt_fast.eval.arms` in a fresh subprocess (`tune_probe.py`), side by side in one run:

- `ppt_fast`: what `tune()` runs (SparseAdamW, pivots gathered in backward, row-scoped gradients), recipe `ppt` at 1 %;
- `dense_masked`: the same update with full gradients and a masked dense AdamW;
- `dreamstyler`, `tokens`, `full`: our other recipes as tune() trains them (SparseAdamW over self-attn V pivots +
  cross-attn K/V rows; the identifier tokens only; every LM weight with torch AdamW);
- `lora`: PEFT LoRA, the musicgen-dreamboothing recipe (r 16, alpha 16, dropout 0.05 on q/k/v/out_proj, fc1, fc2 of
  every decoder layer), torch AdamW;
- `lora_matched`: PEFT LoRA on ppt's tensors, rank nearest ppt's pivot count;
- `shira`: PEFT SHiRA on ppt's tensors, PEFT's sizing (r (m + n) entries per layer, r nearest ppt's count).

Recorded per arm: step time, peak memory (CPU: peak RSS; GPU: max allocated), trainable entries, optimizer state
bytes, and the size of the file the user keeps (ppt: the concept file; peers: PEFT's save_pretrained folder).
"""

import importlib.util

import pytest
from harness import record_probe, run_probe

OP = "peer_tune_step"
DENSITY = 0.01
ARMS = ["dense_masked", "ppt_fast", "dreamstyler", "tokens", "full", "lora", "lora_matched", "shira"]
STEPS = {"tiny": 3, "small": 2, "medium": 1}


@pytest.mark.parametrize("method", ARMS)
def test_peer_tune_step(benchmark, bench_cfg, peer_model, method):
    if method == "full" and peer_model in ("medium", "large") and not bench_cfg.device.startswith("cuda"):
        pytest.skip("full on medium shapes needs ~29 GB for fp32 weights + AdamW state; more than this CPU machine")
    for lib in ("transformers", "peft"):
        if importlib.util.find_spec(lib) is None:
            pytest.skip(f"{lib} is not installed (the peers' step runs PEFT on transformers' MusicGen)")
    gpu = bench_cfg.device.startswith("cuda")
    spec = {"model": peer_model, "method": method, "phase": "train", "density": DENSITY, "device": bench_cfg.device,
            "seconds": 5.0, "steps": STEPS.get(peer_model, 1), "host": "transformers",
            "dtype": "bfloat16" if gpu and peer_model == "medium" else "float32"}  # fmt: skip
    res = run_probe("tune_probe.py", spec, timeout=1800)
    model = f"hf-{peer_model}"
    record_probe(benchmark, bench_cfg, f"peer_tune_step | {model}", res, op=OP, provider=method, baseline="ppt_fast",
                 model=model, phase="train", density=DENSITY, recipe="ppt", batch=1, seconds_of_audio=5.0,
                 host="transformers")  # fmt: skip
