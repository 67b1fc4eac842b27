"""What separates the default model's samples from real music of the instrument its prompt names? For each training
instrument, 12 samples of 4 s for its canonical prompt (sampling seed 1, the model's settings) against 12 fresh
compositions of it (encoded with the model's codec):

- musicnn's top-1 among the 16 instruments (the text-control figure's judge) and the LM's own (the prompt whose
  teacher-forced loss on the sample is lowest, `discrimination_probe.per_clip_loss`);
- best of 4: in groups of 4 samples, the one with the highest PMI with its prompt (LM loss without the prompt minus
  with it), scored by musicnn;
- the decoded frames' loudness dynamics: mean level, its spread over time, mean rise per frame and the number of
  rises > 0.5 (standardised log-magnitude, averaged over the bands) per 4 s: the attacks.

    .venv/bin/python experiments/probes/sample_probe.py [WEIGHTS.pt]  # default: the shipped model; ~4 min

Output (2026-11-29, tiny-v4): the LM takes its own samples for its prompt's instrument in 191 of 192 (every
instrument 12/12 but saxophone 11/12), while musicnn hears piano 0, harp 1, harpsichord 1, clarinet, strings and synth
lead 3 of 12. Attacks per 4 s, real -> sampled: piano 20.4 -> 5.6, harp 11.5 -> 6.9, harpsichord 5.8 -> 6.9,
vibraphone 3.8 -> 9.9, electric piano 10.5 -> 9.9, flute 5.0 -> 14.3, strings 19.8 -> 21.4, clarinet 13.5 -> 18.1.
The LM's piano has a quarter of a piano's attacks: it fits the spectra it was prompted for (its own judgement) but
not the temporal pattern of struck and plucked notes, which musicnn hears. The PMI of a sample with its prompt (loss
without the prompt minus with it) does not pick musicnn's hits either (best-of-4 by PMI: no gain), so re-ranking
samples by the LM's own score cannot lift text control: 27 of 48 groups of 4 (56 %) against 57.8 % of the samples.
"""

import sys

import torch

from ppt_fast import load_model
from ppt_fast.eval import features
from ppt_fast.eval.default_model import _embed, gallery
from ppt_fast.generation import set_sampling
from ppt_fast.tiny import pretrain as P

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from discrimination_probe import per_clip_loss  # noqa: E402

N, SECONDS = 12, 4.0


def dynamics(z):
    """(level, level spread over time, mean rise, rises > 0.5 per clip) of decoded frames `z` [B, D, T]."""
    e = z.mean(1)
    d = e.diff(dim=1)
    return float(e.mean()), float(e.std(1).mean()), float(d.clamp(min=0).mean()), float((d > 0.5).float().sum(1).mean())


def main(path):
    mg = load_model(path)
    lm, codec = mg.lm.eval(), mg.compression_model
    emb = features.get_embedder("musicnn")
    names = list(P.TRAIN_CONCEPTS)
    prompts = [P.INSTRUMENT_WORDS[n][0] for n in names]
    table = gallery(names, mg.sample_rate, emb, seed=0)
    set_sampling(mg, SECONDS)
    for k, n in enumerate(names):
        torch.manual_seed(1000 + k)
        with torch.no_grad():
            audio, tokens = mg.generate([prompts[k]] * N, return_tokens=True)
        losses = torch.stack([per_clip_loss(lm, tokens.long(), p) for p in prompts], 1).mean(2)  # [N, 16]
        own = losses.argmin(1)
        pmi = (per_clip_loss(lm, tokens.long(), "").mean(1) - losses[:, k]).view(-1, 4)  # groups of 4 samples
        hits = ((_embed(audio.float(), mg.sample_rate, emb) @ table.T).argmax(1) == k).view(-1, 4)
        best_of_4 = int(hits.gather(1, pmi.argmax(1, keepdim=True)).sum())
        seeds = [P.clip_seed(n, 0, 60_000 + i) for i in range(N)]
        real = torch.stack([P.render_clip(n, s, 2 * SECONDS, codec.sample_rate) for s in seeds]).unsqueeze(1)
        with torch.no_grad():
            zr = codec.decode_latent(codec.encode(real)[0][:, :, : tokens.shape[-1]])
            zg = codec.decode_latent(tokens)
        r, s = dynamics(zr), dynamics(zg)
        print(f"{n:16s} musicnn {int(hits.sum()):2d}/{N} (best of 4 by PMI {best_of_4}/{N // 4})  "
              f"LM {int((own == k).sum()):2d}/{N}  level {r[0]:+.2f} -> {s[0]:+.2f}  "
              f"spread {r[1]:.2f} -> {s[1]:.2f}  rise {r[2]:.3f} -> {s[2]:.3f}  attacks {r[3]:.1f} -> {s[3]:.1f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
