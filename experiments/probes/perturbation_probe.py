"""Is the text-control drop of a tuned `tiny` a cost of what was learnt, or the sampling of a small LM reacting to any
change of its weights? Tune the violin with tune()'s defaults, then move the **same delta values to random entries**
of the same tensors and rows (the scope), and score text control without the identifier (16 instrument prompts x 3
clips) for the base, the concept and the random twin on several sampling seeds, with the held-in loss beside it.

    .venv/bin/python experiments/probes/perturbation_probe.py  # ~7 min on 2 CPU cores

Output of the run quoted in experiments/default_model/history.md ("What tuning costs").
"""

import os

from ppt_fast import _env, load_model, tune
from ppt_fast.eval import features
from ppt_fast.eval.dataset import build
from ppt_fast.eval.default_model import gallery, held_in_set, random_twin, teacher_forced_loss, text_control
from ppt_fast.tiny import pretrain as P

SEEDS = (0, 2)
train = list(P.TRAIN_CONCEPTS)
root = os.path.join(_env.cache_dir(), "eval-default-dataset")  # make eval-default's violin
build(root, concepts=["violin"], seconds=120.0, heldout=0, sample_rate=32000)
concept = tune(os.path.join(root, "violin", "reference.wav"), model="tiny", seed=0, verbose=False)

base = load_model("tiny")
twin = load_model("tiny")
moved = random_twin(twin, concept, seed=0)
print(f"concept: {moved} changed entries; twin: the same values at random entries", flush=True)

held, right, wrong = held_in_set(base, train, seed=0)
base_held = teacher_forced_loss(base, held, right)
info = teacher_forced_loss(base, held, wrong) - base_held
concept.apply(base)
c_held = teacher_forced_loss(base, held, right) - base_held
concept.remove(base)
t_held = teacher_forced_loss(twin, held, right) - base_held
print(f"held-in loss rise: concept {c_held:+.4f} ({100 * c_held / info:.1f} %), twin {t_held:+.4f} "
      f"({100 * t_held / info:.1f} %)", flush=True)  # fmt: skip
emb = features.get_embedder("musicnn")
table = gallery(train, base.sample_rate, emb, seed=0)
for seed in SEEDS:
    row = []
    for label, model, cs in (("base", base, []), ("concept", base, [concept]), ("twin", twin, [])):
        tc = text_control(model, train, table, emb, clips=3, duration=5.0, seed=seed, concepts=cs)
        row.append(f"{label} {tc['top1']:.3f}")
    print(f"seed {seed}: text control " + ", ".join(row), flush=True)
