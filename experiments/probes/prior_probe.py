"""What tune() teaches and what it costs on the default model, on **validation** seeds (tune seed 1, held-in clips
seed 1, sampling seed 1; the figures of `make eval-default` use seed 0): how tune()'s ratio on `tiny` was chosen and
what prior preservation does. Teacher-forced losses, free of sampling noise:

- learnt: the fall of the reference's loss under "a piece of music, <v1>" (base: the prompt without the identifier);
- cost: the rise of the loss of new compositions of the 16 trained instruments under their own instrument word, as a
  share of the **prompt information** (the same clips' loss under a wrong instrument word minus under the right one).

With --sample, also the sampled figures: audio alignment of 8 "a piece of music, <v1>" clips to the reference, and
text control / diversity of the 16 instrument prompts without the identifier (3 clips each).

    .venv/bin/python experiments/probes/prior_probe.py [--sample] [violin|marimba ...]  # ~4 min; --sample ~12 min

Output of the runs quoted in experiments/default_model/history.md ("What tuning costs"; those were tiny-v4's).

Output (2026-11-29, tiny-v8, `--sample violin`, 14 min; held-in loss 3.165 nats, prompt information 0.444; base:
reference loss 4.720, alignment 0.239, text control 0.521), reference loss fall / held-in rise (share) / alignment /
text control: tokens 0.471 / 0 (0 %) / 0.285 / 0.521; ppt 0.1 % 0.554 / 0.0050 (1.1 %) / 0.418 / 0.500; ppt 0.3 %
0.618 / 0.0264 (5.9 %) / 0.440 / 0.521; ppt 1 % 0.709 / 0.0785 (17.7 %) / 0.466 / 0.500; ppt 1 % + prior 0.3 0.702 /
0.0460 (10.4 %) / 0.432 / 0.479; + prior 1 0.681 / 0.0212 (4.8 %) / 0.211 / 0.521; dreamstyler 1.103 / 0.0048 (1.1 %)
/ 0.504 / 0.625. By the rule written before the run (session 12's note), ppt 0.1 % stays tune()'s default on `tiny`:
its cost stays <= 5 %, it learns more than the tokens, and 0.3 % costs more than 5 %.
"""

import argparse
import os
import time

from ppt_fast import _env, generate, load_model, tune
from ppt_fast import reference as data
from ppt_fast.audio import read_audio
from ppt_fast.eval import features
from ppt_fast.eval.dataset import build
from ppt_fast.eval.default_model import gallery, held_in_set, teacher_forced_loss, text_control
from ppt_fast.eval.metrics import audio_alignment
from ppt_fast.tiny import pretrain as P

VARIANTS = [
    ("violin", "tokens", dict(preset="tokens")),
    ("violin", "ppt 0.1 %", dict(preset="ppt", ratio=0.001)),
    ("violin", "ppt 0.3 %", dict(preset="ppt", ratio=0.003)),
    ("violin", "ppt 1 %", dict(preset="ppt", ratio=0.01)),
    ("violin", "ppt 1 %, prior 0.3", dict(preset="ppt", ratio=0.01, prior=0.3)),
    ("violin", "ppt 1 %, prior 1", dict(preset="ppt", ratio=0.01, prior=1.0)),
    ("violin", "dreamstyler", dict(preset="dreamstyler", ratio=0.01)),
    ("marimba", "ppt 1 %", dict(preset="ppt", ratio=0.01)),
    ("marimba", "ppt 1 %, prior 1", dict(preset="ppt", ratio=0.01, prior=1.0)),
]

ap = argparse.ArgumentParser()
ap.add_argument("--sample", action="store_true", help="also the sampled figures (slow)")
ap.add_argument("concepts", nargs="*", default=["violin", "marimba"])
args = ap.parse_args()

train = list(P.TRAIN_CONCEPTS)
base = load_model("tiny")
held, right, wrong = held_in_set(base, train, seed=1)
base_held = teacher_forced_loss(base, held, right)
info = teacher_forced_loss(base, held, wrong) - base_held
print(f"held-in loss {base_held:.4f} nats; prompt information {info:.4f}", flush=True)
if args.sample:
    emb = features.get_embedder("musicnn")
    table = gallery(train, base.sample_rate, emb, seed=0)


def sampled(model, concepts, ref) -> str:
    if not args.sample:
        return ""
    tc = text_control(model, train, table, emb, clips=3, duration=5.0, seed=1, concepts=concepts)
    w = generate(["a piece of music, <v1>"] * 8, model=model, concepts=concepts, duration=5.0, seed=8)
    ra, rsr = read_audio(ref)
    aa = audio_alignment(w, ra, model.sample_rate, reference_sample_rate=rsr, pad="repeat")
    return f"; alignment {aa:.3f}, text control {tc['top1']:.3f}, diversity {tc['diversity']:.3f}"


refs = {}
for concept in args.concepts:
    root = os.path.join(_env.cache_dir(), f"eval-default-dataset-{concept}")
    build(root, concepts=[concept], seconds=120.0, heldout=0, sample_rate=32000)  # deterministic, a few seconds
    ref = os.path.join(root, concept, "reference.wav")
    codes = data.encode_reference(base, ref, segment_seconds=2.0, codec_fingerprint="probe", use_cache=False).codes
    refs[concept] = (ref, codes, teacher_forced_loss(base, codes, ["a piece of music"] * codes.shape[0]))
    print(f"{concept}, base: reference loss {refs[concept][2]:.3f}{sampled(base, [], ref)}", flush=True)
for concept, label, kw in VARIANTS:
    if concept not in refs:
        continue
    ref, codes, base_ref = refs[concept]
    t0 = time.perf_counter()
    c = tune(ref, model="tiny", seed=1, verbose=False, **kw)
    tune_s = time.perf_counter() - t0
    m = load_model("tiny")
    c.apply(m)
    learnt = base_ref - teacher_forced_loss(m, codes, ["a piece of music, <v1>"] * codes.shape[0])
    cost = teacher_forced_loss(m, held, right) - base_held
    c.remove(m)
    print(f"{concept}, {label}: reference loss -{learnt:.3f} nats; held-in loss {cost:+.4f} "
          f"({100 * cost / info:.0f} % of the prompt information){sampled(m, [c], ref)}; tune {tune_s:.0f} s",
          flush=True)  # fmt: skip
