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
from ppt_fast.audio import SILENCE_RMS
from ppt_fast.eval import default_model as DM
from ppt_fast.eval import features
from ppt_fast.tiny import pretrain as P


def silent(audio: torch.Tensor, sr: int) -> float:
    x = audio.reshape(audio.shape[0], -1)
    w = sr // 2
    n = x.shape[-1] // w
    return float((x[:, : n * w].reshape(x.shape[0], n, w).pow(2).mean(-1).sqrt() < SILENCE_RMS).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", required=True)
    ap.add_argument("--temperatures", default="0.7,0.85,1.0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    mg = ppt_fast.load_model("tiny")
    sr = mg.sample_rate
    names = list(P.TRAIN_CONCEPTS)
    emb = features.get_embedder("musicnn")
    table = DM.gallery(names, sr, emb)
    rows = []
    for t in (float(x) for x in args.temperatures.split(",")):
        t0 = time.perf_counter()
        prompts = [P.INSTRUMENT_WORDS[names[i % 16]][0] for i in range(48)]
        base = ppt_fast.generate(prompts, model=mg, duration=4.0, seed=11, temperature=t)
        conc = ppt_fast.generate(["a piece of music, <v1>"] * 48, model=mg, concepts=[args.concept], duration=4.0,
                                 seed=11, temperature=t)  # fmt: skip
        tc = DM.text_control(mg, names, table, emb, clips=3, duration=5.0, seed=1, top_k=64, temperature=t)
        row = {"temperature": t, "top_k": 64, "silent_base": silent(base, sr), "silent_concept": silent(conc, sr),
               "text_control_top1": tc["top1"], "diversity": tc["diversity"], "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"concept": args.concept, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
