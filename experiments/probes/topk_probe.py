"""Validation for the model's sampling setting at 192 clips: text control of the base `tiny` model (16 instrument
prompts x 12 clips, sampling seed 1, not the figures' 0) at its own setting (top-k 64, temperature 0.7) and at the
48-clip sweep's leader (top-k 8, temperature 0.7). Rule stated before the run: switch to 8 / 0.7 only if it beats
64 / 0.7 and reaches the 60 % target here.

    .venv/bin/python experiments/probes/topk_probe.py  # ~4 min on 2 CPU cores

Output (2026-11-29, tiny-v4): top-k 64 / 0.7: 0.578 (diversity 0.349); top-k 8 / 0.7: 0.516 (diversity 0.381).
64 / 0.7 stays; quoted in experiments/default_model/history.md.
"""

from ppt_fast import load_model
from ppt_fast.eval import features
from ppt_fast.eval.default_model import gallery, sampling_sweep
from ppt_fast.tiny import pretrain as P

model = load_model("tiny")
emb = features.get_embedder("musicnn")
train = list(P.TRAIN_CONCEPTS)
table = gallery(train, model.sample_rate, emb, seed=0)
rows = sampling_sweep(model, train, table, emb, grid=((64, 0.7), (8, 0.7)), clips=12, duration=5.0, seed=1)
for r in rows:
    print(f"top-k {r['top_k']}, temperature {r['temperature']}: top-1 {r['top1']:.3f}, diversity {r['diversity']:.3f}")
