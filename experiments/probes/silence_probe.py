"""Where do the silent stretches in generations come from? (issue 29)

Measures the share of silent half-second windows (RMS below SILENCE_RMS, -80 dBFS) in
- the pretraining corpus (rendered clips of the training instruments, as the LM saw them, and after the codec's
  round trip),
- clips the default model generates for instrument prompts, without and with a demo-like concept,
and, for generated clips, whether the silent windows are exact zeros and which codes the LM sampled there.

    python experiments/probes/silence_probe.py --clips 48 --out experiments/probes/silence_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ppt_fast
from ppt_fast.audio import SILENCE_RMS
from ppt_fast.tiny import pretrain as P

WINDOW = 0.5


def silent_share(audio: torch.Tensor, sr: int) -> tuple[float, float]:
    """(share of silent half-second windows, share of those that are exact digital zeros)."""
    x = audio.reshape(audio.shape[0], -1)
    w = int(WINDOW * sr)
    n = x.shape[-1] // w
    win = x[:, : n * w].reshape(x.shape[0], n, w)
    rms = win.pow(2).mean(-1).sqrt()
    silent = rms < SILENCE_RMS
    zeros = (win.abs().amax(-1) == 0) & silent
    return float(silent.float().mean()), float(zeros.sum() / silent.sum().clamp_min(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--concept", default=None, help="a concept file (e.g. out/demo/concept.ppt) for the second arm")
    args = ap.parse_args()
    t0 = time.perf_counter()
    mg = ppt_fast.load_model("tiny")
    sr = mg.sample_rate
    codec = mg.compression_model
    out: dict = {"clips": args.clips, "seconds": args.seconds, "window_s": WINDOW, "silence_rms": SILENCE_RMS}

    # corpus: rendered clips of the training instruments, raw and through the codec
    names = [P.TRAIN_CONCEPTS[i % len(P.TRAIN_CONCEPTS)] for i in range(args.clips)]
    raw = torch.stack([P.render_clip(n, P.clip_seed(n, 0, 7000 + i), args.seconds, sr) for i, n in enumerate(names)])
    with torch.no_grad():
        codes, _ = codec.encode(raw.unsqueeze(1))
        coded = codec.decode(codes)
    out["corpus_raw"] = silent_share(raw, sr)
    out["corpus_codec"] = silent_share(coded, sr)

    prompts = [P.INSTRUMENT_WORDS[n][0] for n in names]
    arms = {"base": ([], prompts)}
    if args.concept:
        arms["concept"] = ([args.concept], ["a piece of music, <v1>"] * args.clips)
    captured: list[torch.Tensor] = []
    real_decode = codec.decode

    def spy(c, scale=None):
        captured.append(c.detach().cpu())
        return real_decode(c, scale)

    codec.decode = spy
    try:
        for arm, (concepts, ps) in arms.items():
            captured.clear()
            audio = ppt_fast.generate(ps, model=mg, concepts=concepts, duration=args.seconds, seed=11)
            share, zero = silent_share(audio, sr)
            c = torch.cat(captured)  # [B, K, F]
            frames = c.shape[-1]
            fw = int(WINDOW * codec.frame_rate)
            x = audio.reshape(audio.shape[0], -1)
            w = int(WINDOW * sr)
            n = min(x.shape[-1] // w, frames // fw)
            rms = x[:, : n * w].reshape(x.shape[0], n, w).pow(2).mean(-1).sqrt()
            silent_codes = []
            for b in range(c.shape[0]):
                for j in range(n):
                    if rms[b, j] < SILENCE_RMS:
                        silent_codes += c[b, 0, j * fw : (j + 1) * fw].tolist()
            top = torch.tensor(silent_codes).bincount().topk(5) if silent_codes else None
            out[arm] = {
                "silent_window_share": share,
                "exact_zero_share_of_silent": zero,
                "top_level0_codes_in_silence": None if top is None else [[int(i), int(v)] for v, i in zip(*top)],
                "frames_in_silence": len(silent_codes),
            }
            print(arm, out[arm], flush=True)
    finally:
        codec.decode = real_decode
    # which level-0 code does the codec give a silent frame?
    with torch.no_grad():
        zc, _ = codec.encode(torch.zeros(1, 1, sr))
    out["code_of_silence"] = zc[0, :, 5].tolist()
    out["seconds_total"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
