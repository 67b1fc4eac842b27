"""Pretraining the embedded default model (`model="tiny"`): corpus -> codec -> LM, resumable, on a 2-core CPU.

No pretrained MusicGen / EnCodec / T5 weights can be had offline, so the default model is trained here from data the
project renders itself (`ppt_fast.synth`: seeded MIDI compositions through a General MIDI soundfont):

1. Corpus: `clips` compositions of `clip_seconds` for each of the 16 training instruments (registers shifted an
   octave down or up at random), each with a varied text description (instrument words, tempo word, register,
   playing style). Four instruments are **held out** (never seen by the codec or the LM) for concept learning:
   violin, marimba, trumpet, nylon guitar.
2. Codec: :class:`~ppt_fast.tiny.melcodec.MelRVQCodec` (residual VQ over log-mel frames, Griffin-Lim decoder;
   why not a small EnCodec: see that module) fitted by k-means on the corpus' frames.
3. LM: audiocraft's `LMModel` (delay pattern, cross-attention on a LUT text conditioner with a word-hash tokenizer),
   trained with `MusicGenSolver`'s cross-entropy (the coarsest codebook weighted 3x, `codebook_weights`), AdamW,
   warmup + cosine, CFG dropout (so classifier-free guidance works at generation).

Everything is deterministic from `PretrainConfig.seed`. The LM phase writes a checked checkpoint (magic header +
sha256, atomic) every `checkpoint_every` steps and resumes from it; a corrupted checkpoint is refused with a clear
message; a checkpoint or weights file whose config differs from the run's is refused.

The result is one checked file (`ppt_fast/assets/tiny-v8.pt`: fp16 LM weights, the codec's codebooks as int8
with per-vector scales, the config) and a JSON sidecar with provenance (command, seed, versions, timings, losses).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import torch

from .. import _env
from .._io import CorruptFileError, atomic_write_bytes, check_writable, load_checked, save_checked
from .melcodec import MelRVQCodec
from .model import (  # noqa: F401 - the config, word lists and loader are part of the pipeline's names
    ADDED_LATER,
    ASSET,
    FORMAT,
    HELDOUT_CONCEPTS,
    INSTRUMENT_WORDS,
    QUICK,
    STYLE_WORDS,
    TEMPLATES,
    TINY_V4_DESCRIPTIONS,
    TRAIN_CONCEPTS,
    LMConfig,
    PretrainConfig,
    PretrainError,
    _check_config,
    build_lm,
    build_musicgen,
    descriptions_digest,
    load_trained,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------------
def clip_seed(name: str, base_seed: int, index: int) -> int:
    """Seeds of pretraining compositions, disjoint from the concept dataset's (which use indices < 1000)."""
    from ..synth import concept_seed

    return concept_seed(name, base_seed, 100_000 + index)


def _clip_spec(name: str, seed: int, shift: int | None = None):
    """The concept spec of one corpus clip (register shifted -12 / 0 / +12 by the seed, or by `shift` in octaves)
    and its register word."""
    import numpy as np

    from ..synth import CONCEPTS

    spec = CONCEPTS[name]
    if spec.is_drum:
        return spec, ""
    if shift is None:
        shift = int(np.random.default_rng(seed ^ 0x5EED).integers(-1, 2))
    if not (12 <= spec.low + 12 * shift and spec.high + 12 * shift <= 108):
        shift = 0
    word = {-1: "low", 0: "", 1: "high"}[shift]
    return replace(spec, low=spec.low + 12 * shift, high=spec.high + 12 * shift), word


def tempo_word(bpm: float) -> str:
    return "slow" if bpm < 85 else ("medium tempo" if bpm < 115 else "fast")


def describe(name: str, seed: int, g: torch.Generator) -> str:
    """A random text description of corpus clip (name, seed): instrument words, tempo, register, style."""
    from ..synth import CONCEPTS, composition_tempo

    spec, register = _clip_spec(name, seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    template = pick(TEMPLATES)
    if "{register}" in template and not register:
        template = "{inst}, {style}, {tempo}"
    text = template.format(
        inst=pick(INSTRUMENT_WORDS[name]),
        tempo=tempo_word(composition_tempo(CONCEPTS[name], seed)),
        style=pick(STYLE_WORDS.get(spec.style, ("music",))),
        register=f"{register} register" if register else "",
    )
    return " ".join(text.split())


def render_clip(name: str, seed: int, seconds: float, sample_rate: int, shift: int | None = None) -> torch.Tensor:
    """Mono float32 `[T]` of one composition of `name` (register as in the corpus, or `shift` octaves)."""
    from ..synth import compose, render

    spec, _ = _clip_spec(name, seed, shift)
    return torch.from_numpy(render(compose(spec, seed, seconds), spec, seconds, sample_rate=sample_rate))


@dataclass
class Corpus:
    names: list[str]  # instrument of each clip
    seeds: list[int]
    codes: torch.Tensor  # int16 [N, K, F]


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def _lr(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _load_run_file(path: str, cfg: PretrainConfig, what: str, fix: str) -> dict:
    """A checked file of this run (corpus cache or checkpoint): refused when corrupted or made with another config."""
    try:
        data = load_checked(path, f"pretraining {what}", fix)
    except CorruptFileError as e:
        raise PretrainError(str(e)) from e
    _check_config(data["config"], cfg, path, what)
    return data


def _check_descriptions(cfg: PretrainConfig) -> None:
    if cfg.descriptions != descriptions_digest():
        raise PretrainError(
            f"this config's descriptions come from other word lists (digest {cfg.descriptions}) than this code's "
            f"({descriptions_digest()}): it cannot be re-made from here; check out the commit that made it, or use "
            "the code's lists (leave `descriptions` at its default)"
        )


def prepare(cfg: PretrainConfig, workdir: str, *, verbose: bool = True) -> tuple[MelRVQCodec, Corpus, dict]:
    """Render the corpus, fit the codec and encode the corpus (cached in `workdir/data.pt`)."""
    _check_descriptions(cfg)
    path = os.path.join(workdir, "data.pt")
    codec = MelRVQCodec(cfg.codec)
    if os.path.isfile(path):
        data = _load_run_file(path, cfg, "corpus cache", "delete it (or pass --fresh) to rebuild it")
        codec.load_state_dict(data["codec"])
        return codec, Corpus(data["names"], data["seeds"], data["codes"]), data["timings"]
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    names, seeds, audio = [], [], []
    for name in cfg.train_concepts:
        for i in range(cfg.clips_of(name)):
            s = clip_seed(name, cfg.seed, i)
            names.append(name)
            seeds.append(s)
            audio.append(render_clip(name, s, cfg.clip_seconds, cfg.codec.sample_rate))
    timings["render_s"] = time.perf_counter() - t0
    if verbose:
        logger.info(f"[pretrain] corpus: {len(audio)} clips x {cfg.clip_seconds:g} s rendered in "
                    f"{timings['render_s']:.1f} s")
    t0 = time.perf_counter()
    batch = torch.stack(audio).unsqueeze(1)  # [N, 1, T]
    with torch.no_grad():
        frames = torch.cat([codec.log_mel(batch[i : i + 32]).flatten(0, 1) for i in range(0, batch.shape[0], 32)])
    fit = codec.fit(frames, iters=cfg.kmeans_iters, sample=cfg.kmeans_sample, seed=cfg.seed,
                    refine_passes=cfg.codec_refine_passes)  # fmt: skip
    timings["codec_fit_s"] = time.perf_counter() - t0
    if verbose:
        res = ", ".join(f"{e:.3f}" for e in fit["residual_energy"])
        if "refined_error" in fit:
            res += "; coding error before / after each refinement pass: " + ", ".join(
                f"{e:.4f}" for e in fit["refined_error"]
            )
        logger.info(f"[pretrain] codec: {cfg.codec.n_q} x {cfg.codec.bins} codes fitted on {frames.shape[0]} frames in "
              f"{timings['codec_fit_s']:.1f} s (residual energy per level: {res})")  # fmt: skip
    t0 = time.perf_counter()
    with torch.no_grad():
        codes = torch.cat([codec.encode(batch[i : i + 32])[0] for i in range(0, batch.shape[0], 32)]).to(torch.int16)
    timings["encode_s"] = time.perf_counter() - t0
    data = {"config": cfg.to_dict(), "codec": codec.state_dict(), "names": names, "seeds": seeds, "codes": codes,
            "timings": timings, "residual_energy": fit["residual_energy"],
            "refined_error": fit.get("refined_error")}  # fmt: skip
    save_checked(data, path)
    return codec, Corpus(names, seeds, codes), timings


def _batch(corpus: Corpus, cfg: PretrainConfig, g: torch.Generator):
    from audiocraft.modules.conditioners import ConditioningAttributes

    n, _, f = corpus.codes.shape
    seg = min(f, int(round(cfg.segment_seconds * cfg.codec.frame_rate)))
    pick = torch.randint(0, n, (cfg.batch_size,), generator=g).tolist()
    starts = torch.randint(0, f - seg + 1, (cfg.batch_size,), generator=g).tolist()
    codes = torch.stack([corpus.codes[i, :, s : s + seg] for i, s in zip(pick, starts)]).long()
    attrs = [ConditioningAttributes(text={"description": describe(corpus.names[i], corpus.seeds[i], g)}) for i in pick]
    return codes, attrs


def _loss(lm, codes, attrs, weights: tuple[float, ...] = ()) -> tuple[torch.Tensor, float]:
    """(the loss to minimise, MusicGenSolver's loss) after classifier-free-guidance dropout (train mode), as the
    solver does. The solver's loss is the mean of the per-codebook cross-entropies (`tune._loss`); with `weights`
    the loss to minimise is their weighted mean instead (the same value when the weights are equal)."""
    from ..hosts.audiocraft.loss import pattern_cross_entropy

    provider = lm.condition_provider
    cond = provider(provider.tokenize(lm.cfg_dropout(attrs)))
    loss, per_codebook = pattern_cross_entropy(lm, codes, cond, weights=weights or None)
    return loss, float(per_codebook.mean())


def train_lm(cfg: PretrainConfig, corpus: Corpus, workdir: str, *, verbose: bool = True, stop_after: int | None = None):
    """Train the LM; resume from `workdir/checkpoint.pt` when present. Returns (lm, losses, seconds)."""
    torch.manual_seed(cfg.seed + 1)
    lm = build_lm(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    ckpt = os.path.join(workdir, "checkpoint.pt")
    step, losses, seconds = 0, [], 0.0
    if os.path.isfile(ckpt):
        state = _load_run_file(
            ckpt, cfg, "checkpoint", "delete it (or pass --fresh) to restart the LM phase from step 0"
        )
        lm.load_state_dict(state["lm"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        lm.cfg_dropout.rng.set_state(state["cfg_dropout_rng"])  # audiocraft's CFG dropout has its own generator
        step, losses, seconds = state["step"], list(state["losses"]), float(state["seconds"])
        if verbose:
            logger.info(f"[pretrain] resuming the LM phase at step {step}/{cfg.steps} from {ckpt}")
    lm.train()
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="pretrain lm", unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    while step < cfg.steps:
        codes, attrs = _batch(corpus, cfg, g)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        loss, solver_loss = _loss(lm, codes, attrs, cfg.codebook_weights)
        if not torch.isfinite(loss):
            raise PretrainError(f"LM loss became {float(loss)} at step {step}; lower --lr or check the corpus")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
        opt.step()
        step += 1
        losses.append(solver_loss)  # the solver's (unweighted) loss, comparable across weightings
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{_lr(step - 1, cfg):.1e}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"config": cfg.to_dict(), "step": step, "lm": lm.state_dict(), "opt": opt.state_dict(),
                     "generator": g.get_state(), "torch_rng": torch.get_rng_state(),
                     "cfg_dropout_rng": lm.cfg_dropout.rng.get_state(), "losses": losses,
                     "seconds": seconds}  # fmt: skip
            save_checked(state, ckpt)
            t_last = time.perf_counter()  # checkpoint time is not training time
        if stop_after is not None and step >= stop_after:
            break
    if bar is not None:
        bar.close()
    return lm.eval(), losses, seconds


def export(cfg: PretrainConfig, codec: MelRVQCodec, lm, out: str, provenance: dict) -> dict:
    """Write the weights file (fp16 LM floats, the codec packed: int8 codebooks with per-vector scales, fp32
    standardisation; the config) and its JSON sidecar (returned)."""
    lm_state = {k: (v.half() if v.is_floating_point() else v) for k, v in lm.state_dict().items()}
    payload = {"format": FORMAT, "config": cfg.to_dict(), "codec": codec.packed_state(), "lm": lm_state}
    sha = save_checked(payload, out)
    provenance = dict(provenance, sha256=sha, bytes=os.path.getsize(out), format=FORMAT, config=cfg.to_dict())
    atomic_write_bytes(os.path.splitext(out)[0] + ".json", (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance


def _versions() -> dict[str, str]:
    import numpy

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": str(torch.get_num_threads()),
    }
    for mod in ("audiocraft", "tinysoundfont"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "unknown"
    return out


def _cli_command() -> str | None:
    """The `ppt-fast ...` command line this process runs (the console script or `python -m ppt_fast.cli`), else
    None (pretrain() called from Python)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith("ppt-fast") or argv0.replace(os.sep, "/").endswith("ppt_fast/cli.py"):
        return " ".join(["ppt-fast", *sys.argv[1:]])
    return None


def pretrain(cfg: PretrainConfig = PretrainConfig(), *, out: str = ASSET, workdir: str | None = None,  # noqa: B008
             fresh: bool = False, verbose: bool = True, stop_after: int | None = None) -> dict:  # fmt: skip
    """The whole pretraining (corpus, codec, LM), resumable; writes `out` (+ `.json`). Returns the provenance dict.

    `stop_after`: stop the LM phase after that many steps (as an interruption would) without exporting.
    """
    # The weights and their JSON are written ~50 min from now: an output that cannot be written is refused first.
    check_writable(out)
    check_writable(os.path.splitext(out)[0] + ".json")
    workdir = workdir or os.path.join(_env.cache_dir(), "pretrain", cfg.digest())
    if fresh:
        for f in ("data.pt", "checkpoint.pt"):
            if os.path.exists(os.path.join(workdir, f)):
                os.unlink(os.path.join(workdir, f))
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    codec, corpus, timings = prepare(cfg, workdir, verbose=verbose)
    lm, losses, lm_seconds = train_lm(cfg, corpus, workdir, verbose=verbose, stop_after=stop_after)
    if len(losses) < cfg.steps:
        return {"stopped_at": len(losses), "workdir": workdir}
    provenance = {
        "command": _cli_command(),
        "workdir": workdir,
        "seed": cfg.seed,
        # pipeline_s: render + codec fit + encode + LM training, summed over every (resumed) run that made them
        "timings": dict(
            timings,
            lm_s=lm_seconds,
            pipeline_s=sum(timings.values()) + lm_seconds,
            this_run_wall_s=time.perf_counter() - t0,
        ),
        "losses_every_10": [
            round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)
        ],
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "corpus": {
            "clips": len(corpus.names),
            "seconds": len(corpus.names) * cfg.clip_seconds,
            "frames": int(corpus.codes.shape[0] * corpus.codes.shape[2]),
        },  # fmt: skip
        "versions": _versions(),
        "lm_parameters": sum(p.numel() for p in lm.parameters()),
    }
    provenance = export(cfg, codec, lm, out, provenance)
    if verbose:
        size = os.path.getsize(out) / 2**20
        logger.info(f"[pretrain] wrote {out} ({size:.1f} MiB); final loss {provenance['final_loss']:.3f}")
    return provenance
