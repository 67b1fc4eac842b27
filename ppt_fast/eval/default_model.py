"""Figures of the trained default model (`model="tiny"`): codec round trip, text control, prior preservation.

    python -m ppt_fast.eval.default_model --out benchmarks/results/default-model-eval.json   (make eval-default)

All retrieval is top-1 by cosine between a clip's musicnn embedding (the normalised mean of its 3-s segments, the
audio-alignment embedder) and a **gallery**: one freshly rendered 20-s composition per instrument (seeds no corpus
clip uses), i.e. the original soundfont audio, never codec output.

- Codec round trip: new compositions of all 20 instruments (16 trained + 4 held out, which the codec never saw),
  re-synthesised through the codec (encode -> decode), retrieved among the 20 instruments. Originals are scored too
  (the embedder's own ceiling).
- Text control: clips generated for a prompt naming a trained instrument, retrieved among the 16 trained ones
  (chance 1/16); 12 clips per prompt (`--text-clips`, 192 clips: binomial noise ~0.036; the 48 clips used until
  2026-11-29 read 60.4 % where 192 of the same seed read 50.5 %).
- Sampling sweep: the text-control figure for a grid of (top-k, temperature) on **validation** sampling seeds
  (`--sweep-seed`, not the figures' seed): how the model's recommended settings (`build_musicgen`) were chosen.
- Long clips: text-control top-1 per 3-s stretch of 9-s clips (validation seed), generated in windows of the
  model's training segment and in one pass: why `max_duration` is the training segment.
- Prior preservation: the same text-control figure and the diversity of those clips with a concept for a held-out
  instrument applied (one per method), next to the base model: what tuning costs the model's general ability. Two
  teacher-forced losses go with it, free of sampling noise: the **held-in loss** (new compositions of the 16 trained
  instruments under their instrument word; its rise is what tuning costs, in units of the **prompt information**:
  the same clips' loss under a wrong instrument word minus under the right one) and the **reference loss** (the
  reference's segments under "a piece of music, <v1>"; its fall is what the concept learnt). Text control is scored
  on 12 clips per prompt (192 clips per row: its binomial noise, ~0.036, is a third of the margin below), and a
  **random twin** row scores the base model with the default concept's deltas moved to random entries
  (`random_twin`): the same change with nothing learnt, the control arm for the sampled figures.
  Margins for the defaults, stated before the figures are measured: held-in loss rise <= 10 % of the prompt
  information; diversity and text control without the identifier within +-0.1 of the base model; audio alignment
  above the base model's and the tokens-only concept's.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import _env
from . import features
from .heldin import HELD_IN_INDEX, held_in_set, teacher_forced_loss  # noqa: F401 (re-exported)

GALLERY_INDEX = 300_000
TEST_INDEX = 200_000


def _embed(audio: torch.Tensor, sample_rate: int, emb) -> torch.Tensor:
    mono = features.to_mono_16k(features.as_batch(audio, "audio"), sample_rate)
    out = []
    for seg, silent in features.embed_clips(mono, emb, pad="repeat"):
        keep = seg[~silent] if bool((~silent).any()) else seg
        out.append(F.normalize(keep.mean(0), dim=0))
    return torch.stack(out)


def gallery(names: Sequence[str], sample_rate: int, emb, seconds: float = 12.0, seed: int = 0) -> torch.Tensor:
    """`[K, D]`: per instrument the normalised mean embedding of three new compositions, one per register (an octave
    down, as written, an octave up), since corpus and test clips shift registers too."""
    from ..tiny.pretrain import clip_seed, render_clip

    rows = []
    for n in names:
        clips = [
            render_clip(n, clip_seed(n, seed, GALLERY_INDEX + j), seconds, sample_rate, shift=j - 1) for j in range(3)
        ]
        rows.append(F.normalize(torch.cat([_embed(a.view(1, -1), sample_rate, emb) for a in clips]).mean(0), dim=0))
    return torch.stack(rows)


def _top1(embs: torch.Tensor, table: torch.Tensor, truth: Sequence[int]) -> tuple[float, list[int]]:
    pred = (embs @ table.T).argmax(1).tolist()
    return sum(int(p == t) for p, t in zip(pred, truth)) / max(1, len(truth)), pred


def codec_roundtrip(model, names: Sequence[str], table: torch.Tensor, emb, *, clips: int = 3, seconds: float = 8.0,
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    from ..tiny.pretrain import clip_seed, render_clip

    sr = model.sample_rate
    orig, coded, truth = [], [], []
    for k, n in enumerate(names):
        for i in range(clips):
            a = render_clip(n, clip_seed(n, seed, TEST_INDEX + i), seconds, sr).view(1, 1, -1)
            with torch.no_grad():
                codes, _ = model.compression_model.encode(a)
                y = model.compression_model.decode(codes)
            orig.append(_embed(a[0], sr, emb))
            coded.append(_embed(y[0], sr, emb))
            truth.append(k)
    acc_o, _ = _top1(torch.cat(orig), table, truth)
    acc_c, pred = _top1(torch.cat(coded), table, truth)
    per = {n: sum(int(pred[j] == k) for j in range(len(truth)) if truth[j] == k) / clips for k, n in enumerate(names)}
    return {"top1_codec": acc_c, "top1_original": acc_o, "n": len(truth), "per_instrument": per,
            "confusions": [(names[t], names[p]) for t, p in zip(truth, pred) if t != p]}  # fmt: skip


def text_control(model, names: Sequence[str], table: torch.Tensor, emb, *, clips: int = 3, duration: float = 5.0,
                 seed: int = 0, concepts: Sequence[Any] = (), top_k: int | None = None,
                 temperature: float | None = None, cfg_coef: float | None = None) -> dict[str, Any]:  # fmt: skip
    from .. import generate
    from ..audio import silent_windows
    from ..tiny.pretrain import INSTRUMENT_WORDS
    from .metrics import diversity

    embs, truth, divs, silent = [], [], [], []
    for k, n in enumerate(names):
        audio = generate([INSTRUMENT_WORDS[n][0]] * clips, model=model, concepts=list(concepts), duration=duration,
                         seed=seed * 1000 + k, top_k=top_k, temperature=temperature, cfg_coef=cfg_coef)  # fmt: skip
        silent.append(silent_windows(audio, model.sample_rate).float().reshape(-1))
        embs.append(_embed(audio, model.sample_rate, emb))
        truth += [k] * clips
        if clips > 1:
            divs.append(diversity(audio, model.sample_rate, pad="repeat"))
    acc, pred = _top1(torch.cat(embs), table, truth)
    per = {n: sum(int(pred[j] == k) for j in range(len(truth)) if truth[j] == k) / clips for k, n in enumerate(names)}
    return {"top1": acc, "chance": 1 / len(names), "n": len(truth), "per_instrument": per,
            "diversity": sum(divs) / len(divs) if divs else None,
            "silent_window_share": float(torch.cat(silent).mean()) if silent else None,
            "confusions": [(names[t], names[p]) for t, p in zip(truth, pred) if t != p]}  # fmt: skip


#: The preservation rows of `make eval-default` (`--rows` picks some): label, tune preset, tune options.
PRESERVATION_ROWS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "base": ("base", None, {}), "tokens": ("tokens", "tokens", {}), "ppt": ("ppt (defaults)", "ppt", {}),
    "twin": ("ppt (defaults), random twin", "twin", {"of": "ppt (defaults)"}),
    "ppt-1%": ("ppt-1%", "ppt", {"ratio": 0.01}), "prior": ("ppt-1% + prior", "ppt", {"ratio": 0.01, "prior": 1.0}),
    "dreamstyler": ("dreamstyler", "dreamstyler", {"ratio": 0.01}), "full": ("full", "full", {}),
}  # fmt: skip

SWEEP_GRID = ((64, 0.85), (64, 1.0), (64, 0.7), (32, 0.85), (16, 0.85), (64, 0.6))


def long_clips(model, names: Sequence[str], table: torch.Tensor, emb, *, clips: int = 3, seconds: float = 9.0,
               window: float = 3.0, seed: int = 1) -> dict[str, Any]:  # fmt: skip
    """Text-control top-1 per `window`-second stretch of `seconds`-long clips, generated in windows of the model's
    `max_duration` (its training segment; audiocraft's extension) and in one pass (positions past the training
    segment): how far the model drifts from the prompt over time, and what the windowing buys."""
    from .. import generate
    from ..tiny.pretrain import INSTRUMENT_WORDS

    out: dict[str, Any] = {"seconds": seconds, "window": window, "seed": seed, "max_duration": model.max_duration}
    own = model.max_duration
    for label, max_duration in (("windowed", own), ("single_pass", max(30.0, seconds + 1))):
        model.max_duration = max_duration
        hits = [0] * int(seconds // window)
        try:
            for k, n in enumerate(names):
                audio = generate([INSTRUMENT_WORDS[n][0]] * clips, model=model, duration=seconds, seed=seed * 1000 + k)
                for w in range(len(hits)):
                    seg = audio[..., int(w * window * model.sample_rate) : int((w + 1) * window * model.sample_rate)]
                    hits[w] += int(((_embed(seg, model.sample_rate, emb) @ table.T).argmax(1) == k).sum())
        finally:
            model.max_duration = own
        out[label] = [h / (clips * len(names)) for h in hits]
        print(f"[long clips] {label}: top-1 per {window:g}-s window {[round(x, 3) for x in out[label]]}", flush=True)
    return out


def sampling_sweep(model, names: Sequence[str], table: torch.Tensor, emb, *, grid=SWEEP_GRID, clips: int = 3,
                   duration: float = 5.0, seed: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """Text-control top-1 for each (top_k, temperature) of `grid`, sampled with `seed` (use one the figures do not)."""
    rows = []
    for top_k, temperature in grid:
        tc = text_control(model, names, table, emb, clips=clips, duration=duration, seed=seed, top_k=top_k,
                          temperature=temperature)  # fmt: skip
        rows.append({"top_k": top_k, "temperature": temperature, "top1": tc["top1"], "diversity": tc["diversity"],
                     "silent_window_share": tc["silent_window_share"]})
        print(f"[sweep] top-k {top_k}, temperature {temperature}: top-1 {tc['top1']:.3f}", flush=True)
    return rows


def random_twin(model, concept, *, seed: int = 0) -> int:
    """Add `concept`'s weight deltas to `model` (a base model, in place) at **random entries** of the same tensors,
    within the rows the `ppt` scope allows (all rows where the scope has none for a tensor): the same values, the
    same amount of change, none of what was learnt. The control arm that tells a concept's cost from the response of
    the sampling to any weight change. Identifier embeddings are left out (prompts without the identifier never read
    them). Returns the number of entries moved."""
    from ..scope import Scope

    lm = model.lm
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    concept.apply(model)
    try:
        deltas = {n: p.detach() - before[n] for n, p in lm.named_parameters()
                  if n in before and not torch.equal(p, before[n])}  # fmt: skip
    finally:
        concept.remove(model)
    params = dict(lm.named_parameters())
    in_scope = {e.name: e.flat_range for e in Scope.preset("ppt").resolve([(n, params[n]) for n in deltas])}
    g = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for n, delta in deltas.items():
            p = params[n]
            lo, hi = in_scope.get(n, (0, p.numel()))
            vals = delta[delta != 0]
            if vals.numel() > hi - lo:
                raise ValueError(f"{n}: {vals.numel()} changed entries, {hi - lo} in scope: a random twin needs a "
                                 "sparse concept (ppt), not a dense one")  # fmt: skip
            p.view(-1)[lo + torch.randperm(hi - lo, generator=g)[: vals.numel()]] += vals
            moved += vals.numel()
    return moved


def preservation(model_name: str, reference: str, names, table, emb, *, methods: Sequence[tuple[str, Any, dict]],
                 clips: int, duration: float, seed: int,
                 base_text_control: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """`base_text_control`: the base model's `text_control` at the same names, table, clips, duration and seed, when
    the caller has measured it already (the headline figure); the base row takes it instead of generating again."""
    from .. import generate, load_model, tune
    from .. import reference as data
    from ..audio import read_audio
    from .metrics import audio_alignment

    rows = []
    ref_audio, ref_sr = read_audio(reference)
    base = load_model(model_name, device="cpu")
    held, right, wrong = held_in_set(base, names, seed=seed)
    base_held = teacher_forced_loss(base, held, right)
    info = teacher_forced_loss(base, held, wrong) - base_held
    ref_codes = data.encode_reference(base, reference, segment_seconds=2.0, codec_fingerprint="eval",
                                      use_cache=False).codes  # fmt: skip
    # the base model has no <v1>: its reference loss is under the prompt without it
    base_ref = teacher_forced_loss(base, ref_codes, ["a piece of music"] * ref_codes.shape[0])
    tuned: dict[str, Any] = {}
    for label, preset, kw in methods:
        t0 = time.perf_counter()
        concept = None
        if preset not in (None, "twin"):
            concept = tuned[label] = tune(reference, model=model_name, preset=preset, seed=seed, verbose=False, **kw)
        tune_s = time.perf_counter() - t0
        model = load_model(model_name, device="cpu")
        cs = [concept] if concept is not None else []
        held_loss, ref_loss, aa = base_held, base_ref, None
        entries = None if concept is None else _trained_entries(concept)
        if preset == "twin":  # a base model with the named concept's deltas at random entries (no identifier)
            entries = random_twin(model, tuned[kw["of"]], seed=seed)
            held_loss, ref_loss = teacher_forced_loss(model, held, right), None
        elif concept is not None:
            concept.apply(model)
            held_loss = teacher_forced_loss(model, held, right)
            ref_loss = teacher_forced_loss(model, ref_codes, ["a piece of music, <v1>"] * ref_codes.shape[0])
            concept.remove(model)
        if preset is None and base_text_control is not None:
            tc = base_text_control
        else:
            tc = text_control(model, names, table, emb, clips=clips, duration=duration, seed=seed, concepts=cs)
        if preset != "twin":
            with_id = generate(["a piece of music, <v1>"] * clips, model=model, concepts=cs, duration=duration,
                               seed=seed + 7)  # fmt: skip
            aa = audio_alignment(with_id, ref_audio, model.sample_rate, reference_sample_rate=ref_sr, pad="repeat")
        rows.append({"method": label, "preset": preset, "options": kw, "tune_seconds": round(tune_s, 2),
                     "audio_alignment_with_id": aa, "text_control_top1_no_id": tc["top1"],
                     "diversity_no_id": tc["diversity"], "held_in_loss": held_loss,
                     "held_in_loss_rise": held_loss - base_held, "forgetting": (held_loss - base_held) / info,
                     "reference_loss": ref_loss, "n_text_control": tc["n"],
                     "settings": None if concept is None else {k: concept.meta.get(k) for k in
                                                               ("lr", "prior", "prior_clips", "steps", "ratio")},
                     "trained_entries": entries})  # fmt: skip
        print(
            f"[preservation] {label}: audio alignment {_f(aa)}, text control {tc['top1']:.3f}, "
            f"diversity {_f(tc['diversity'])}, held-in loss {held_loss - base_held:+.4f} "
            f"({100 * (held_loss - base_held) / info:.1f} % of the prompt information), reference loss "
            f"{_f(ref_loss)} (tune {tune_s:.0f} s)",
            flush=True,
        )
    return {"held_in_clips": held.shape[0], "held_in_loss_base": base_held, "prompt_information": info,
            "rows": rows}  # fmt: skip


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _trained_entries(concept) -> int:
    return int(concept.touched_count())


def main(argv: Sequence[str] | None = None) -> int:
    from .. import load_model
    from ..tiny import pretrain as P
    from .dataset import build
    from .protocol import write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/default-model-eval.json")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clips", type=int, default=3, help="clips per prompt / instrument: codec, sweep, long clips")
    ap.add_argument("--text-clips", type=int, default=12,
                    help="clips per prompt of the text-control figure (12 x 16 prompts = 192 clips)")  # fmt: skip
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", default="violin", help="held-out instrument for the preservation rows")
    ap.add_argument("--sweep-seed", type=int, default=1, help="sampling seed of the sampling sweep (validation)")
    ap.add_argument("--preservation-clips", type=int, default=12, help="clips per prompt in the preservation rows")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: codec,sweep,long,text,preservation")
    ap.add_argument("--rows", default=",".join(PRESERVATION_ROWS),
                    help="comma list of the preservation rows to run (the base row always runs; twin needs ppt): "
                         + ",".join(PRESERVATION_ROWS))  # fmt: skip
    args = ap.parse_args(argv)
    for name in ("clips", "text_clips", "preservation_clips"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    skip = set(filter(None, args.skip.split(",")))
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(PRESERVATION_ROWS))
    if unknown:
        ap.error(f"--rows: unknown row(s) {unknown}; choose from {','.join(PRESERVATION_ROWS)}")
    if "twin" in rows and "ppt" not in rows:
        ap.error("--rows: twin moves the ppt row's deltas; add ppt")
    from .._io import UnwritablePathError, check_writable

    try:  # refused before the model loads and anything is measured, not when the first figure is saved
        check_writable(args.out)
    except UnwritablePathError as e:
        ap.error(f"--out: {e}")
    from ..hosts.audiocraft.build import require_audiocraft

    require_audiocraft()  # importing audiocraft (~10 s) is not loading the model
    t_load = time.perf_counter()
    model = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - t_load
    emb = features.get_embedder("musicnn")
    train, held = list(P.TRAIN_CONCEPTS), list(P.HELDOUT_CONCEPTS)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads()}  # fmt: skip
    report: dict[str, Any] = {"model": args.model, "load_seconds": round(load_s, 3), "seed": args.seed}
    report["environment"] = env
    t0 = time.perf_counter()

    def save(done: bool = False) -> None:
        """Write what is measured so far (atomically; `"complete": false` until the last part), so a run that fails
        or is stopped late keeps its finished parts."""
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["complete"] = done
        write_json(args.out, report)  # strict JSON: a figure with nothing to measure is null, never NaN

    table_all = gallery(train + held, model.sample_rate, emb, seed=args.seed)
    if "codec" not in skip:
        rt = codec_roundtrip(model, train + held, table_all, emb, clips=args.clips, seed=args.seed)
        k = len(train)
        per = rt["per_instrument"]
        rt["top1_codec_trained"] = sum(per[n] for n in train) / k
        rt["top1_codec_heldout"] = sum(per[n] for n in held) / len(held)
        report["codec_roundtrip"] = rt
        print(f"[codec] round trip top-1 {rt['top1_codec']:.3f} (trained {rt['top1_codec_trained']:.3f}, held-out "
              f"{rt['top1_codec_heldout']:.3f}); originals {rt['top1_original']:.3f}", flush=True)  # fmt: skip
        save()
    table_train = table_all[: len(train)]
    if "sweep" not in skip:
        if args.sweep_seed == args.seed:
            raise SystemExit("--sweep-seed must differ from --seed: the sweep chooses settings the figures then test")
        sweep = sampling_sweep(model, train, table_train, emb, clips=args.clips, duration=args.duration,
                               seed=args.sweep_seed)  # fmt: skip
        report["sampling_sweep"] = {"seed": args.sweep_seed, "rows": sweep}
        save()
    if "long" not in skip:
        report["long_clips"] = long_clips(model, train, table_train, emb, clips=args.clips, seed=args.sweep_seed)
        save()
    tc = None
    if "text" not in skip:
        tc = text_control(model, train, table_train, emb, clips=args.text_clips, duration=args.duration, seed=args.seed)
        report["text_control"] = tc
        print(f"[text] top-1 {tc['top1']:.3f} (chance {tc['chance']:.3f}); diversity {tc['diversity']:.3f}", flush=True)
        cold = text_control(model, train, table_train, emb, clips=args.text_clips, duration=args.duration,
                            seed=args.seed, temperature=0.5)  # fmt: skip
        report["text_control_temperature_0.5"] = cold
        print(f"[text] at temperature 0.5: top-1 {cold['top1']:.3f}", flush=True)
        save()
    if "preservation" not in skip:
        ds = build(os.path.join(_env.cache_dir(), "eval-default-dataset"), concepts=[args.heldout], seconds=120.0,
                   heldout=0, sample_rate=32000)  # fmt: skip
        from .dataset import load_manifest

        ref = load_manifest(ds).reference_path(args.heldout)
        # the table's order; the base row always runs
        methods = [v for k, v in PRESERVATION_ROWS.items() if k == "base" or k in rows]
        report["preservation"] = {"concept": args.heldout, **preservation(
            args.model, ref, train, table_train, emb, methods=methods, clips=args.preservation_clips,
            duration=args.duration, seed=args.seed,
            base_text_control=tc if args.text_clips == args.preservation_clips else None)}  # fmt: skip
    save(done=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
