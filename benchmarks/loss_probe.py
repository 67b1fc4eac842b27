"""MusicGen's training loss, forward + backward, in a fresh process: MusicGenSolver's path vs the pattern layout.

    python benchmarks/loss_probe.py '{"model": "tiny"|"small", "provider": "solver"|"pattern", "device": "cpu",
                                      "steps": 3}'

- `solver` (the baseline): `LMModel.compute_predictions` (logits reverted from the pattern layout: a concatenation
  and a gather over the whole logits tensor) + `MusicGenSolver._compute_cross_entropy` (a select, copy and boolean
  gather per codebook; in backward a zero-filled full-size gradient per codebook).
- `pattern`: `ppt_fast.hosts.audiocraft.loss.pattern_cross_entropy` (targets scattered into the pattern layout, one
  cross-entropy over the logits as the model produced them). Same value and gradients (tests/test_musicgen_loss.py).

Models (random init, every LM parameter trained, as in pretraining):
- `tiny`: the embedded default's LM (`PretrainConfig()`: 4 layers, dim 256, 8 codebooks x 1024) on its pretraining
  batch: 16 x 4-s crops (200 frames).
- `small`: musicgen-small's shapes (24 layers, dim 1024, 4 codebooks x 2048) on 1 x 5 s (250 frames), the batch of
  the end-to-end tune-step benchmark.
Peak memory: CPU peak RSS (VmHWM reset after the model and batch are built), GPU `torch.cuda.max_memory_allocated`;
`peak_extra_bytes` is over the built model and batch. Prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

import provenance  # noqa: E402
import torch  # noqa: E402

BATCH = {"tiny": (16, 4.0), "small": (1, 5.0)}


def _lm(model: str, device: str):
    if model == "tiny":
        from ppt_fast.tiny.pretrain import PretrainConfig, build_lm

        cfg = PretrainConfig()
        torch.manual_seed(0)
        return build_lm(cfg).to(device), cfg.codec.frame_rate
    from ppt_fast.hosts.audiocraft import build as models

    mg = models.build_shapes("musicgen-small-shapes", seed=0, device=device)
    return mg.lm, mg.compression_model.frame_rate


def measure(spec: dict) -> dict:
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver

    from ppt_fast.hosts.audiocraft.loss import pattern_cross_entropy

    device, provider = spec["device"], spec["provider"]
    cuda = device.startswith("cuda")
    lm, frame_rate = _lm(spec["model"], device)
    lm.eval()  # no dropout: both paths see the same network
    batch, seconds = BATCH[spec["model"]]
    frames = int(round(seconds * frame_rate))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (batch, lm.num_codebooks, frames), generator=g).to(device)
    attrs = [ConditioningAttributes(text={"description": "a piece of music, slow piano"}) for _ in range(batch)]
    tokenized = lm.condition_provider.tokenize(attrs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def loss():
        with autocast:
            tensors = lm.condition_provider(tokenized)
            if provider == "pattern":
                return pattern_cross_entropy(lm, codes, tensors)[0]
            out = lm.compute_predictions(codes, [], tensors)
            mask = torch.ones_like(codes, dtype=torch.bool) & out.mask
            return MusicGenSolver._compute_cross_entropy(None, out.logits, codes, mask)[0]

    def step():
        lm.zero_grad(set_to_none=False)
        value = loss()
        value.backward()
        return float(value.detach())

    step()  # allocates the gradients (kept between steps: set_to_none=False), so they count in the base
    gc.collect()
    base = provenance.memory_mark(device)
    values = []
    times = provenance.timed_steps(lambda: values.append(step()), int(spec.get("steps", 3)), device)
    peak, memory_kind = provenance.memory_peak(device)
    logits_bytes = batch * lm.num_codebooks * frames * lm.card * (2 if cuda else 4)
    return {
        "step_seconds": statistics.median(times),
        "step_times": times,
        "loss": values[-1],
        "peak_bytes": int(peak),
        "base_bytes": int(base),
        "peak_extra_bytes": int(peak - base),
        "memory_kind": memory_kind,
        "batch": batch,
        "frames": frames,
        "codebooks": lm.num_codebooks,
        "card": lm.card,
        "logits_bytes": logits_bytes,
        "lm_parameters": sum(p.numel() for p in lm.parameters()),
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
