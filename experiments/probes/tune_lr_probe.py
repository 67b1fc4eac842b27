"""tune()'s learning rate on the default model, chosen on the held-out **marimba** (not the violin the figures use),
on the validation sampling seed: audio alignment of `<v1>` clips and text control / diversity of the 16 instrument
prompts without the identifier (concept applied), next to the base model. ~3 min on 2 CPU cores.

    .venv/bin/python experiments/probes/tune_lr_probe.py

tiny-v4, 2026-11-29 (before prior preservation): base (no concept) 0.304 / 0.438 / 0.380; ppt 1 % at lr 1e-4: 0.542 /
0.594 / 0.331; at 3e-4 (the default from tiny-v2 to this check): 0.562 / 0.469 / 0.287. 1e-4 is the default since.
The text-control column moves by ~0.1 between runs of the same model (2 clips per prompt), so the choice was checked
on teacher-forced losses too (experiments/probes/prior_probe.py). Passes prior=0.0 to measure what it measured then.
"""

import os

from ppt_fast import _env, generate, load_model, tune
from ppt_fast.audio import read_audio
from ppt_fast.eval import features
from ppt_fast.eval.dataset import build
from ppt_fast.eval.default_model import gallery, text_control
from ppt_fast.eval.metrics import audio_alignment
from ppt_fast.tiny import pretrain as P

root = os.path.join(_env.cache_dir(), "eval-default-dataset-marimba")  # as make eval-default builds the violin's
build(root, concepts=["marimba"], seconds=120.0, heldout=0, sample_rate=32000)  # deterministic, a few seconds
ref = os.path.join(root, "marimba", "reference.wav")
emb = features.get_embedder("musicnn")
model = load_model("tiny")
train = list(P.TRAIN_CONCEPTS)
table = gallery(train, model.sample_rate, emb, seed=0)
ra, rsr = read_audio(ref)
for lr in (None, 1e-4, 3e-4):
    cs = (
        []
        if lr is None
        else [tune(ref, model="tiny", preset="ppt", ratio=0.01, lr=lr, prior=0.0, seed=1, verbose=False)]
    )
    m = load_model("tiny")
    tc = text_control(m, train, table, emb, clips=2, duration=5.0, seed=1, concepts=cs)
    w = generate(["a piece of music, <v1>"] * 4, model=m, concepts=cs, duration=5.0, seed=8)
    aa = audio_alignment(w, ra, m.sample_rate, reference_sample_rate=rsr, pad="repeat")
    print(
        f"lr {lr}: alignment {aa:.3f}, text control no-id {tc['top1']:.3f}, diversity {tc['diversity']:.3f}", flush=True
    )
