"""Why concept clips of the default model start in silence (issue 29): the first frame's distribution.

At frame 0 the LM has nothing but the text condition. This probe measures, for the trained default:
- the probability of the codec's silence code (level-0 code 8, `silence_probe.py`) at frame 0 after top-k 64 at
  temperatures 0.7 / 0.85 / 1.0, for the 16 instrument prompts, for "a piece of music", and with a concept applied
  ("a piece of music, <v1>"; its tokens alone, without its pivots);
- the teacher-forced cross-entropy and silence probability at frames 0-5 on the concept's reference segments, base
  vs tuned (how far tuning moves frame 0);
- where the silent half-second windows sit in 48 generated 4-s clips (share per window position).

    ppt-fast demo --out /tmp/demo
    python experiments/probes/first_frame_probe.py --concept /tmp/demo/concept.ppt --reference /tmp/demo/reference.wav \
        --out experiments/probes/first_frame_probe.json
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.nn.functional as F

import ppt_fast
from ppt_fast.audio import silent_windows
from ppt_fast.models import load_host
from ppt_fast.pivots import PivotSet
from ppt_fast.tiny import pretrain as P

SILENCE_CODE = 8
TEMPERATURES = (0.7, 0.85, 1.0)


def p_silence_first(lm, prompt: str, temp: float, top_k: int = 64) -> float:
    from audiocraft.modules.conditioners import ConditioningAttributes

    codes = torch.zeros(1, lm.num_codebooks, 8, dtype=torch.long)
    with torch.no_grad():
        logits = lm.compute_predictions(codes, [ConditioningAttributes(text={"description": prompt})]).logits
    top = (logits[0, 0, 0] / temp).topk(top_k)
    probs = torch.softmax(top.values, -1)
    hit = (top.indices == SILENCE_CODE).nonzero()
    return float(probs[hit[0, 0]]) if len(hit) else 0.0


def teacher_forced(lm, codes: torch.Tensor, prompt: str, frames: int = 6) -> dict:
    from audiocraft.modules.conditioners import ConditioningAttributes

    conds = [ConditioningAttributes(text={"description": prompt})] * codes.shape[0]
    with torch.no_grad():
        logits = lm.compute_predictions(codes, conds).logits[:, 0, :frames].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes[:, 0, :frames].reshape(-1), reduction="none")
    return {"ce": ce.view(-1, frames).mean(0).tolist(), "p_silence": torch.softmax(logits, -1)[..., SILENCE_CODE]
            .mean(0).tolist()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    host = load_host("tiny")
    mg, lm = host.model, host.model.lm
    prompts = [P.INSTRUMENT_WORDS[n][0] for n in P.TRAIN_CONCEPTS]
    out: dict = {"silence_code": SILENCE_CODE, "top_k": 64, "first_frame": {}}
    concept = ppt_fast.Concept.load(args.concept)
    ref_codes = host.encode_reference(args.reference, concept.meta.get("segment_seconds", 2.0), True)
    out["reference_silence_code_share"] = float((ref_codes[:, 0] == SILENCE_CODE).float().mean())
    out["teacher_forced_base"] = teacher_forced(lm, ref_codes, "a piece of music")
    for t in TEMPERATURES:
        out["first_frame"][str(t)] = {
            "instrument_prompts": sum(p_silence_first(lm, p, t) for p in prompts) / len(prompts),
            "a piece of music": p_silence_first(lm, "a piece of music", t),
        }
    concept.apply(mg)
    out["teacher_forced_tuned"] = teacher_forced(lm, ref_codes, "a piece of music, <v1>")
    for t in TEMPERATURES:
        out["first_frame"][str(t)]["with the concept"] = p_silence_first(lm, "a piece of music, <v1>", t)
    concept.remove(mg)
    empty = PivotSet([], [], torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.int32))
    tokens_only = ppt_fast.Concept(concept.identifiers, concept.tokens, empty, torch.zeros(0))
    tokens_only.apply(mg)
    out["first_frame"]["0.85"]["tokens only"] = p_silence_first(lm, "a piece of music, <v1>", 0.85)
    tokens_only.remove(mg)
    clips = ppt_fast.generate(["a piece of music, <v1>"] * 48, model=mg, concepts=[concept], duration=4.0, seed=11,
                              temperature=0.85)  # fmt: skip
    out["silent_by_window_0.85"] = silent_windows(clips, mg.sample_rate).float().mean(0).tolist()
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
