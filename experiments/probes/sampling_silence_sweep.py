"""Silence vs text control across sampling temperatures on the default model (issue 29).

For each temperature (top-k 64, no guidance): the share of silent half-second windows in 48 clips of instrument
prompts (base) and of "a piece of music, <v1>" with a concept (`--concept`), and the text-control top-1 (musicnn
retrieval of the prompted instrument among the 16 trained ones, validation sampling seed 1 as the sweep in
`python -m ppt_fast.eval.default_model` uses).

    python experiments/probes/sampling_silence_sweep.py --concept out/demo/concept.ppt \
        --out experiments/probes/sampling_silence_sweep.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

import ppt_fast
from ppt_fast.audio import silent_windows
from ppt_fast.eval import default_model as DM
from ppt_fast.eval import features
from ppt_fast.tiny import pretrain as P


def silent(audio: torch.Tensor, sr: int) -> float:
    """Share of silent half-second windows (RMS < SILENCE_RMS)."""
    return float(silent_windows(audio, sr).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", required=True)
    ap.add_argument("--temperatures", default="0.7,0.85,1.0")
    ap.add_argument("--resample", type=int, default=0, help="generate()'s resample_silent (0: the model as it is)")
    ap.add_argument("--no-text-control", action="store_true", help="only the silence figures")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    mg = ppt_fast.load_model("tiny")
    sr = mg.sample_rate
    names = list(P.TRAIN_CONCEPTS)
    if not args.no_text_control:
        emb = features.get_embedder("musicnn")
        table = DM.gallery(names, sr, emb)
    rows = []
    for t in (float(x) for x in args.temperatures.split(",")):
        t0 = time.perf_counter()
        prompts = [P.INSTRUMENT_WORDS[names[i % 16]][0] for i in range(48)]
        base = ppt_fast.generate(prompts, model=mg, duration=4.0, seed=11, temperature=t, resample_silent=args.resample)
        conc = ppt_fast.generate(["a piece of music, <v1>"] * 48, model=mg, concepts=[args.concept], duration=4.0,
                                 seed=11, temperature=t, resample_silent=args.resample)  # fmt: skip
        row = {"temperature": t, "top_k": 64, "resample_silent": args.resample, "silent_base": silent(base, sr),
               "silent_concept": silent(conc, sr)}
        if not args.no_text_control:
            tc = DM.text_control(mg, names, table, emb, clips=3, duration=5.0, seed=1, top_k=64, temperature=t)
            row.update(text_control_top1=tc["top1"], diversity=tc["diversity"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"concept": args.concept, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
