"""Does a trained default model know its own corpus better than fresh music of the same instruments? Teacher-forced
LM loss (the training loss, no sampling noise) on the first 4 s of 8 corpus compositions per training instrument
(re-rendered from their seeds and encoded with the model's own codec: the very codes it trained on) and on 8 fresh
compositions per instrument (seeds the corpus never used), with descriptions drawn by the corpus' generator.

    .venv/bin/python experiments/probes/generalisation_probe.py [WEIGHTS.pt ...]  # default: `tiny`; ~30 s each

Output (2026-11-29): tiny-v4: corpus 2.588, fresh 3.033 (gap 0.445 after ~13.5 passes over 1536 clips); the tiny-v6
candidate (3x the compositions, ~4.3 passes): corpus 2.682, fresh 2.819 (gap 0.138). tiny-v6 generalises better and
still renders fewer prompts as their instrument (52.6 % vs 57.8 %, `model_validation.py`;
experiments/default_model/history.md). Assumes the models' corpus settings (seed 0, 8-s compositions, the recorded
registers), as tiny-v4's and tiny-v6's.
"""

import statistics
import sys

import torch
from audiocraft.modules.conditioners import ConditioningAttributes

from ppt_fast import load_model
from ppt_fast.hosts.audiocraft.loss import pattern_cross_entropy
from ppt_fast.tiny import pretrain as P

PER_INSTRUMENT, FRAMES, SECONDS = 8, 200, 8.0


def loss_of(lm, codes, names, seeds, g):
    attrs = [ConditioningAttributes(text={"description": P.describe(n, s, g)}) for n, s in zip(names, seeds)]
    with torch.no_grad():
        cond = lm.condition_provider(lm.condition_provider.tokenize(attrs))
        ce, _ = pattern_cross_entropy(lm, codes[:, :, :FRAMES].long(), cond)
    return float(ce)


def encode(codec, name, seeds):
    audio = torch.stack([P.render_clip(name, s, SECONDS, codec.sample_rate) for s in seeds]).unsqueeze(1)
    with torch.no_grad():
        return codec.encode(audio)[0]


def main(paths):
    for path in paths or ["tiny"]:
        mg = load_model(path)
        lm, codec = mg.lm.eval(), mg.compression_model
        g = torch.Generator().manual_seed(5)
        own, fresh = [], []
        for name in P.TRAIN_CONCEPTS:
            seeds = [P.clip_seed(name, 0, i) for i in range(PER_INSTRUMENT)]
            new = [P.clip_seed(name, 0, 50_000 + i) for i in range(PER_INSTRUMENT)]
            own.append(loss_of(lm, encode(codec, name, seeds), [name] * PER_INSTRUMENT, seeds, g))
            fresh.append(loss_of(lm, encode(codec, name, new), [name] * PER_INSTRUMENT, new, g))
            print(f"  {name:16s} corpus {own[-1]:.3f} fresh {fresh[-1]:.3f}", flush=True)
        a, b = statistics.mean(own), statistics.mean(fresh)
        print(f"{path}: corpus {a:.3f}, fresh {b:.3f}, gap {b - a:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
