"""The evaluation protocol: tune each method on the dataset's reference clips, generate, and score four metrics.

Methods side by side (each a ``tune(preset=...)`` recipe): ``base`` (no concept: the floor), ``tokens``,
``ppt`` at ρ ∈ {0.1 %, 1 %, 5 %}, ``dreamstyler`` and ``full``; plus two concepts tuned together with 1 vs 3
identifier tokens (``pair-1tok`` / ``pair-3tok``), scored on prompts that name both identifiers.

Everything goes through the public ``ppt_fast.tune`` / ``ppt_fast.generate`` / ``ppt_fast.load_model``, so the
same code runs on the tiny built-in model (tests, CI) and on real MusicGen checkpoints (``model=`` a checkpoint
directory). ``tiny`` is the default model trained here (16 rendered instruments; violin, marimba, trumpet and nylon
guitar held out): its numbers measure the methods on a small model; ``tiny-random`` (untrained) only shows that the
pipeline runs. Every report says which.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import metrics
from .arms import ARMS, Arm

log = logging.getLogger(__name__)

#: Generation prompts; ``{}`` is where the identifier(s) go. The text part carries MTT tag words so that the tag
#: proxy has something to measure when CLAP is not available.
DEFAULT_PROMPTS = ("a piece of music, {}", "{}, slow and soft", "{}, fast, with drums", "{}, electronic techno")
PAIR_PROMPTS = ("{}, a piece of music", "{}, slow and soft")


#: The protocol's arms (`ppt_fast.eval.arms`: ours and the peers, one table with the benchmarks).
Method = Arm
METHODS: dict[str, Arm] = {a.name: a for a in ARMS.values() if a.protocol}


@dataclass
class Settings:
    """Knobs of one protocol run (recorded in the JSON)."""

    model: Any = "tiny"
    steps: int | None = None
    duration: float = 5.0
    clips_per_prompt: int = 2
    prompts: Sequence[str] = DEFAULT_PROMPTS
    seed: int = 0
    embedder: str = "musicnn"
    pad: str = "error"  # short generations: 'repeat' tiles them to the embedders' 3-s window
    clap_checkpoint: str | None = None
    top_k: int | None = None  # None: the model's own sampling settings
    allow_unverified: bool = False  # apply concept files without a base-model fingerprint (see generate())
    tune_kwargs: Mapping[str, Any] = field(default_factory=dict)
    held_in_clips: int = 2  # per held-in prompt (0: no held-in cost); see `held_in`
    report_clips: int = 1  # clips per prompt and arm kept as WAV + spectrogram for report.html (0: none)


def text_part(prompt: str) -> str:
    """The prompt without identifiers (``<v1>``) and the punctuation around them: what text alignment scores."""
    text = re.sub(r"<[^<>\s]+>", " ", prompt)
    return " ".join(re.sub(r"\s*,\s*(,\s*)+", ", ", text).strip(" ,").split())


class _BaseArmIdentifiers(logging.Filter):
    """Drops generate()'s "prompt ... names <v1> but no applied concept defines it" for the base arm, which keeps the
    identifier in its prompts on purpose (a like-for-like text); the protocol says so once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "but no applied concept defines it" not in record.getMessage()


def _generate(prompts: list[str], concepts: Sequence[Any], s: Settings, seed: int) -> torch.Tensor:
    from ppt_fast import generate

    quiet = _BaseArmIdentifiers() if not concepts else None
    gen_log = logging.getLogger("ppt_fast.generation")
    if quiet is not None:
        gen_log.addFilter(quiet)
    try:
        return generate(prompts, model=s.model, concepts=list(concepts), duration=s.duration, seed=seed,
                        top_k=s.top_k, allow_unverified=s.allow_unverified)  # fmt: skip
    finally:
        if quiet is not None:
            gen_log.removeFilter(quiet)


def score_clips(
    clips: torch.Tensor,
    sample_rate: int,
    prompt: str,
    references: Mapping[str, tuple[torch.Tensor, int]],
    s: Settings,
) -> dict[str, Any]:
    """All four metrics for the clips ``[B, C, T]`` of one prompt. ``references``: name -> (``[C, T]``, rate)."""
    out: dict[str, Any] = {"prompt": prompt, "clips": int(clips.shape[0])}
    # Per clip (the means are over clips, so these give the standard errors; `_clip_stats`).
    for name, (ref, ref_sr) in references.items():
        suffix = "" if len(references) == 1 else f"[{name}]"
        aa = [metrics.audio_alignment(c[None], ref, sample_rate, reference_sample_rate=ref_sr, embedder=s.embedder,
                                      pad=s.pad) for c in clips]  # fmt: skip
        cp = [metrics.copying(c[None], ref, sample_rate, reference_sample_rate=ref_sr) for c in clips]
        out["audio_alignment" + suffix], out["audio_alignment" + suffix + "_clips"] = sum(aa) / len(aa), aa
        out["copying" + suffix], out["copying" + suffix + "_clips"] = sum(cp) / len(cp), cp
    tas = [metrics.text_alignment(c[None], text_part(prompt), sample_rate, clap_checkpoint=s.clap_checkpoint,
                                  pad=s.pad) for c in clips]  # fmt: skip
    ta = tas[0]
    vals = [t.value for t in tas]
    out["text_alignment"] = sum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else math.nan
    out["text_alignment_clips"] = vals
    out["text_alignment_method"] = ta.method
    out["text_alignment_tags"] = list(ta.tags)
    out["diversity"] = metrics.diversity(clips, sample_rate, embedder=s.embedder, pad=s.pad) if len(clips) > 1 else None
    return out


def evaluate(
    concepts: Sequence[Any],
    references: Mapping[str, tuple[torch.Tensor, int]],
    identifiers: Sequence[str],
    s: Settings,
    prompts: Sequence[str] | None = None,
    on_clips: Callable[[int, str, torch.Tensor, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``s.clips_per_prompt`` clips for each prompt (``{}`` -> ``', '.join(identifiers)``) with `concepts`
    applied, and score them against `references`. Returns one dict per prompt. `on_clips(i, prompt, clips,
    sample_rate)` sees each prompt's clips (the protocol keeps some for report.html)."""
    from ppt_fast import load_model

    sample_rate = load_model(s.model).sample_rate
    rows = []
    for i, template in enumerate(prompts or s.prompts):
        prompt = template.format(", ".join(identifiers)) if "{}" in template else template
        clips = _generate([prompt] * s.clips_per_prompt, concepts, s, seed=s.seed * 1000 + i)
        if on_clips is not None:
            on_clips(i, prompt, clips, sample_rate)
        rows.append(score_clips(clips, sample_rate, prompt, references, s))
    return rows


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Mean of the finite numbers under `key` (missing, None / null and NaN rows left out); None when none are."""
    vals = [r[key] for r in rows if _number(r.get(key)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def json_ready(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN: a metric with nothing to score, inf) as None, so it is written as
    JSON `null`; tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """Strict JSON (missing or non-finite values as `null`, never a bare `NaN`), indented; what the eval package
    writes. `allow_nan=False` after the conversion: a value the conversion misses fails loudly here."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: str, obj: Any) -> None:
    """:func:`dumps_json` of `obj` into `path`, atomically (a reader never sees half a file)."""
    from .._io import atomic_write_bytes

    atomic_write_bytes(path, dumps_json(obj).encode())


#: The files run_protocol and evaluate_concept_file write into their output folder.
REPORT_FILES = ("results.json", "report.md")
#: run_protocol also writes the listening page (and its clips, spectrograms and loss curves under clips/).
PROTOCOL_FILES = (*REPORT_FILES, "report.html")


def check_outputs(out_dir: str, names: Sequence[str] = REPORT_FILES) -> None:
    """Raise ppt_fast._io.UnwritablePathError when `out_dir` or a file `names` in it cannot be written: called before
    the measurements start, so a run does not fail at its end."""
    from .._io import check_writable

    check_writable(out_dir, folder=True)
    for name in names:
        check_writable(os.path.join(out_dir, name))


def _write_report(out_dir: str, report: Mapping[str, Any]) -> None:
    from .._io import atomic_write_bytes

    write_json(os.path.join(out_dir, "results.json"), report)
    atomic_write_bytes(os.path.join(out_dir, "report.md"), markdown_report(report).encode())


def _load_refs(manifest, names: Sequence[str]) -> dict[str, tuple[torch.Tensor, int]]:
    from ..synth import read_wav

    refs = {}
    for n in names:
        audio, sr = read_wav(manifest.reference_path(n))
        refs[n] = (torch.from_numpy(audio), sr)
    return refs


def run_protocol(
    manifest_path: str,
    out_dir: str,
    *,
    concepts: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    pair: Sequence[str] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run the methods side by side on a concept dataset; write ``results.json`` and ``report.md`` in `out_dir`.

    Args:
        manifest_path: a manifest from :func:`ppt_fast.eval.dataset.build`.
        concepts: single-concept methods run on each (default: the first two of the manifest).
        methods: names from :data:`METHODS` (default all).
        pair: the two concepts for ``pair-*`` methods (default: the first two of `concepts`, else of the manifest).
    Returns the results dict (also in ``results.json``).
    """
    from ppt_fast import tune

    from .dataset import load_manifest

    s = settings or Settings()
    check_outputs(out_dir, PROTOCOL_FILES)
    m = load_manifest(manifest_path)
    names = list(concepts) if concepts is not None else m.concepts[:2]
    for n in names:
        m.concept(n)  # KeyError naming what exists
    chosen = list(methods) if methods is not None else list(METHODS)
    unknown = [x for x in chosen if x not in METHODS]
    if unknown:
        raise ValueError(f"methods {unknown}: choose from {', '.join(METHODS)}")
    if any(METHODS[x].peer for x in chosen):
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            peers_named = ", ".join(x for x in chosen if METHODS[x].peer)
            raise ValueError(f"methods {peers_named} need PEFT: pip install 'ppt_fast[peers]' (peft==0.21.2), or "
                             "leave them out of --methods")  # fmt: skip
    pair_names = list(pair) if pair is not None else (names[:2] if len(names) >= 2 else m.concepts[:2])
    if any(METHODS[x].pair for x in chosen) and len(pair_names) != 2:
        raise ValueError(f"pair methods need two concepts, got {pair_names}")
    os.makedirs(out_dir, exist_ok=True)
    refs = _load_refs(m, sorted(set(names) | set(pair_names)))
    reference_clips = {n: _keep_reference(out_dir, n, *refs[n]) for n in refs} if s.report_clips else {}
    held_in, base_held = held_in_set_for(s), None
    if held_in is not None:
        base_held = _loss(held_in, [])
    results: list[dict[str, Any]] = []
    for method_name in chosen:
        method = METHODS[method_name]
        targets = [tuple(pair_names)] if method.pair else [(n,) for n in names]
        for target in targets:
            idents = [f"<v{i + 1}>" for i in range(len(target))]
            t0 = time.perf_counter()
            concept_objs: list[Any] = []
            extra: dict[str, Any] = {}
            losses: list[float] = []  # the training loss per step, for report.html's curves
            if method.peer is not None:
                from .peers import tune_peer

                tag = f"{method_name}-{'+'.join(target)}"
                run = tune_peer(m.reference_path(target[0]), method, model=s.model, identifier=idents[0],
                                steps=s.steps, seed=s.seed, verbose=False, n_tokens=method.n_tokens,
                                callback=_recorder(losses),
                                adapter_dir=os.path.join(out_dir, "adapters", tag) if "lora" in method.peer else None,
                                **dict(s.tune_kwargs))  # fmt: skip
                concept_objs = [run.concept]
                extra = {"trainable": run.trainable, "adapter_bytes": run.adapter_bytes, "impl": run.impl,
                         "rank": run.rank, "optimizer_state_bytes": run.optimizer_state_bytes}  # fmt: skip
            elif method.preset is not None:
                kwargs: dict[str, Any] = dict(s.tune_kwargs)
                kwargs["n_tokens"] = method.n_tokens
                if method.ratio is not None:
                    kwargs["ratio"] = method.ratio
                ref_arg: Any = (
                    {i: m.reference_path(n) for i, n in zip(idents, target)}
                    if method.pair
                    else m.reference_path(target[0])
                )
                tuned = tune(
                    ref_arg, model=s.model, identifier=idents[0], preset=method.preset, steps=s.steps, seed=s.seed,
                    verbose=False, callback=_recorder(losses), **kwargs,
                )  # fmt: skip
                concept_objs = list(tuned) if isinstance(tuned, list) else [tuned]
            tune_s = time.perf_counter() - t0
            files = _save_concepts(out_dir, method_name, target, concept_objs)
            held = _held_in_rise(concept_objs, held_in, base_held) if held_in is not None else None
            target_refs = {n: refs[n] for n in target}
            prompts = PAIR_PROMPTS if method.pair else s.prompts
            # base: the identifier means nothing to the untuned model; prompts keep it for a like-for-like text
            if not concept_objs:
                log.info("%s: prompts keep %s for a like-for-like text; the untuned model ignores it",
                         method_name, ", ".join(idents))  # fmt: skip
            kept: list[str] = []
            keep = functools.partial(_keep_first, out_dir, f"{method_name}-{'+'.join(target)}", s.report_clips, kept)
            rows = evaluate(concept_objs, target_refs, idents, s, prompts=prompts,
                            on_clips=keep if s.report_clips else None)  # fmt: skip
            summary = {
                "method": method_name,
                "concepts": list(target),
                "preset": method.preset,
                "ratio": method.ratio,
                "n_tokens": method.n_tokens if method.preset else None,
                "tune_seconds": round(tune_s, 3),
                "concept_bytes": files,
                "trainable": extra.pop("trainable", None) or _trained_count(concept_objs),
                **extra,
                "held_in_loss_rise": held,
                "prompts": rows,
                "losses": losses,
                "clip_files": kept,
            }
            for key in {k for r in rows for k in r if k.startswith(("audio_alignment", "copying"))
                        and not k.endswith("_clips")} | {"text_alignment", "diversity"}:  # fmt: skip
                summary[key] = _mean(rows, key)
                summary.update(_clip_stats(rows, key))
            if method.pair:
                a, b = (f"audio_alignment[{n}]" for n in target)
                if summary.get(a) is not None and summary.get(b) is not None:
                    summary["pair_balance"] = min(summary[a], summary[b])
            results.append(summary)
            log.info(
                "%s on %s: %s", method_name, "+".join(target), {k: v for k, v in summary.items() if k != "prompts"}
            )
    report = {
        "manifest": os.path.abspath(m.path),
        "renderer": m.data.get("renderer"),
        "soundfont": m.data.get("soundfont", {}).get("name"),
        "settings": {
            k: (
                v
                if isinstance(v, (int, float, str, type(None)))
                else list(v)
                if isinstance(v, (list, tuple))
                else str(v)
            )
            for k, v in asdict(s).items()
        },  # fmt: skip
        "text_alignment_method": results[0]["prompts"][0]["text_alignment_method"] if results else None,
        **_kind_keys(s.model),
        "model": str(s.model),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "reference_clips": reference_clips,
        "results": results,
    }
    _write_report(out_dir, report)
    write_html_report(out_dir, report)
    return report


def _clip_stats(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """`key`'s standard error over every clip of `rows` (`<key>_se`, `<key>_n`); {} where there are no per-clip
    values (diversity: one number per prompt, whose spread over the prompts is its noise)."""
    vals = [v for r in rows for v in (r.get(key + "_clips") or []) if _number(v) and math.isfinite(v)]
    if key == "diversity":
        vals = [r[key] for r in rows if _number(r.get(key)) and math.isfinite(r[key])]
    if len(vals) < 2:
        return {}
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return {f"{key}_se": sd / math.sqrt(len(vals)), f"{key}_n": len(vals)}


def _trained_count(concepts: Sequence[Any]) -> int | None:
    """LM entries the concepts change (pivots + dense entries), None for the base arm."""
    if not concepts:
        return None
    return sum(int(c.pivots.count) + sum(int(t.numel()) for t in c.dense.values()) for c in concepts)


def _save_concepts(out_dir: str, method: str, target: Sequence[str], concepts: Sequence[Any]) -> int | None:
    """Write the arm's concept files under `out_dir/concepts/` and return their total size in bytes."""
    if not concepts:
        return None
    folder = os.path.join(out_dir, "concepts")
    os.makedirs(folder, exist_ok=True)
    total = 0
    for i, c in enumerate(concepts):
        path = os.path.join(folder, f"{method}-{'+'.join(target)}-{i + 1}.ppt")
        c.save(path)
        total += os.path.getsize(path)
    return total


#: The held-in prompts of models whose training data is not at hand: the protocol's prompts' text parts.
HELD_IN_FALLBACK_PROMPTS = ("a piece of music", "slow and soft", "fast, with drums", "electronic techno")


def held_in_set_for(s: Settings) -> tuple[Any, torch.Tensor, list[str]] | None:
    """(model, codes, prompts) the held-in cost is measured on, or None (`s.held_in_clips` = 0). The trained default
    `tiny`: new compositions of its training instruments under their words (`heldin.held_in_set`); any other
    model: its own samples for `HELD_IN_FALLBACK_PROMPTS` (`heldin.base_samples_set`)."""
    from ppt_fast import load_model
    from ppt_fast.models import model_kind

    from . import heldin

    if not s.held_in_clips:
        return None
    model = load_model(s.model)
    if s.model == "tiny" or (isinstance(s.model, str) and model_kind(s.model) == "trained"):
        from ppt_fast.tiny import pretrain

        codes, words, _ = heldin.held_in_set(model, list(pretrain.TRAIN_CONCEPTS), clips=s.held_in_clips,
                                             seed=s.seed)  # fmt: skip
        return model, codes, words
    codes, texts = heldin.base_samples_set(model, HELD_IN_FALLBACK_PROMPTS, clips=s.held_in_clips, seed=s.seed)
    return model, codes, texts


def _loss(held_in: tuple[Any, torch.Tensor, list[str]], concepts: Sequence[Any]) -> float:
    from . import heldin

    model, codes, prompts = held_in
    for c in concepts:
        c.apply(model)
    try:
        return heldin.teacher_forced_loss(model, codes, prompts)
    finally:
        for c in reversed(concepts):
            c.remove(model)


def _held_in_rise(concepts: Sequence[Any], held_in: Any, base: float | None) -> float | None:
    """The concepts' held-in cost: teacher-forced loss rise (nats per code) on the held-in set, no identifier."""
    if base is None:
        return None
    return _loss(held_in, concepts) - base if concepts else 0.0


def _with_se(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """The mean over `rows` (concepts) of `key` ± its standard error (the concepts' errors combined)."""
    m = _mean(rows, key)
    ses = [r.get(f"{key}_se") for r in rows]
    if m is None or not ses or not all(_number(x) for x in ses):
        return _fmt(m)
    return f"{_fmt(m)} ± {math.sqrt(sum(x * x for x in ses)) / len(ses):.3f}"


def _count(n: float | None) -> str:
    return "-" if n is None else f"{round(n):,}"


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:.0f} KB" if n < 10 * 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


def _file_cell(rows: Sequence[Mapping[str, Any]]) -> str:
    adapter, concept = _mean(rows, "adapter_bytes"), _mean(rows, "concept_bytes")
    return f"{_kb(adapter)} / {_kb(concept)}" if adapter is not None else _kb(concept)


def _fmt(v: Any) -> str:
    """A table cell: "n/a" for a missing value (None / JSON null, NaN from an older results.json, inf)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _kind_keys(model: Any) -> dict[str, Any]:
    """The report's `model_kind` (`ppt_fast.models.model_kind`) and `tiny_model` (any tiny kind) keys."""
    from ..models import model_kind

    kind = model_kind(model)
    return {"tiny_model": kind != "other", "model_kind": kind}


def _caveats(report: Mapping[str, Any]) -> list[str]:
    notes = []
    kind = report.get("model_kind")  # reports written before the key existed: by the model's name
    if kind is None:
        kind = "trained" if report.get("model") == "tiny" else "tiny-random" if report.get("tiny_model") else "other"
    if kind == "trained":
        notes.append(
            "**The model is the small default one trained here** (`ppt-fast pretrain`: a mel-RVQ codec and an 8.6 M-"
            "parameter MusicGen LM trained on 16 soundfont-rendered instruments; violin, marimba, trumpet and nylon "
            "guitar held out). The numbers compare the methods on it; expect different absolute values on MusicGen."
        )
    elif kind == "tiny-random":
        notes.append(
            "**The model is the tiny random-init one.** These numbers show that the pipeline "
            "runs end to end (tune -> generate -> embed -> score); they say nothing about whether a method works. "
            "Run the same command with a real MusicGen checkpoint (`--model DIR`) for meaningful numbers."
        )
    if report.get("text_alignment_method") == metrics.TAG_PROXY:
        notes.append(
            "Text alignment is the **musicnn tag proxy, not CLAP**: the mean MagnaTagATune tag probability of the "
            "tag words the prompt (without identifiers) names; n/a when it names none. Pass a LAION-CLAP checkpoint "
            "(`--clap-checkpoint`, with `pip install laion-clap`) for CLAP scores."
        )
    return notes


_METRIC_HELP = (
    "audio alignment: cosine of musicnn embeddings, generated 3-s segments vs the reference centroid (higher = "
    "closer to the concept); text alignment: see above; diversity: mean pairwise 1 - cosine among the clips of one "
    "prompt (higher = more varied); copying: best normalised log-mel cross-correlation of 2-s windows against the "
    "reference (≈1 = verbatim copy of the reference; new music of the same concept scores well below)."
)


_SINGLE_NOTE = ("± one standard error over the clips (diversity: over the prompts); held-in cost: the teacher-forced "
                "loss rise in nats per code on held-in clips under prompts without the identifier; file: the concept "
                "file (LoRA: PEFT's adapter folder from save_pretrained, the concept file of its merged weights after "
                "the slash).")  # fmt: skip


def _single_table(singles: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the single-concept table: one row per method, means over its concepts ± standard errors."""
    headers = ["method", "audio alignment ↑", "text alignment ↑", "diversity ↑", "copying ↓", "held-in cost ↓",
               "trained entries", "file", "tune s"]  # fmt: skip
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in singles:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for name, rs in by_method.items():
        cells = [_with_se(rs, k) for k in ("audio_alignment", "text_alignment", "diversity", "copying")]
        rows.append([name, *cells, _fmt(_mean(rs, "held_in_loss_rise")), _count(_mean(rs, "trainable")),
                     _file_cell(rs), _fmt(_mean(rs, "tune_seconds"))])  # fmt: skip
    return headers, rows


def _pair_table(pairs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the two-concepts table."""
    headers = ["method", "concepts", "tokens", "alignment to 1st", "alignment to 2nd", "balance (min) ↑",
               "text alignment", "diversity", "copying 1st / 2nd"]  # fmt: skip
    rows = []
    for r in pairs:
        a, b = r["concepts"]
        rows.append([r["method"], f"{a} + {b}", str(r["n_tokens"]), _fmt(r.get(f"audio_alignment[{a}]")),
                     _fmt(r.get(f"audio_alignment[{b}]")), _fmt(r.get("pair_balance")), _fmt(r.get("text_alignment")),
                     _fmt(r.get("diversity")), f"{_fmt(r.get(f'copying[{a}]'))} / {_fmt(r.get(f'copying[{b}]'))}"])
    return headers, rows


def markdown_report(report: Mapping[str, Any]) -> str:
    """The protocol's results as a markdown page (one table for single concepts, one for pairs)."""
    lines = ["# ppt_fast evaluation", ""]
    s = report.get("settings", {})
    lines.append(
        f"Model `{s.get('model')}`, {s.get('steps') or 'default'} tuning steps, {s.get('clips_per_prompt')} clips of "
        f"{s.get('duration')} s per prompt, embedder `{s.get('embedder')}`, dataset `{report.get('manifest')}` "
        f"(renderer {report.get('renderer')}, soundfont {report.get('soundfont')})."
    )
    lines.append("")
    for note in _caveats(report):
        lines += [f"> {note}", ""]
    singles = [r for r in report["results"] if len(r["concepts"]) == 1]
    pairs = [r for r in report["results"] if len(r["concepts"]) == 2]
    if singles:
        lines += ["## Single concepts (mean over concepts and prompts)", ""]
        headers, table = _single_table(singles)
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        lines += ["", _SINGLE_NOTE]
        lines += ["", "Per concept:", ""]
        lines += [
            "| method | concept | audio alignment | text alignment | diversity | copying |",
            "|---|---|---|---|---|---|",
        ]
        for r in singles:
            cells = [r.get(k) for k in ("audio_alignment", "text_alignment", "diversity", "copying")]
            lines.append(f"| {r['method']} | {r['concepts'][0]} | " + " | ".join(_fmt(c) for c in cells) + " |")
        lines.append("")
    if pairs:
        lines += ["## Two concepts together (prompts name both identifiers)", ""]
        headers, table = _pair_table(pairs)
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        lines.append("")
    lines += ["Metrics: " + _METRIC_HELP, ""]
    env = report.get("environment", {})
    lines.append(f"torch {env.get('torch')}, python {env.get('python')}, {env.get('machine')}.")
    return "\n".join(lines) + "\n"


def evaluate_concept_file(
    concept_paths: Sequence[str],
    reference: tuple[torch.Tensor, int],
    out_dir: str,
    *,
    identifiers: Sequence[str] = ("<v1>",),
    settings: Settings | None = None,
    reference_name: str = "reference",
) -> dict[str, Any]:
    """``ppt-fast eval --concept``: score existing concept file(s) against a reference; write JSON + markdown.

    Also scores the base model (no concept) on the same prompts and seeds, as the floor to compare with. The outputs
    are checked writable and the concept files read and checked (fingerprinted unless
    ``settings.allow_unverified``) before anything is generated.
    """
    from ppt_fast.concept import _check_verified
    from ppt_fast.generation import _as_concepts

    s = settings or Settings()
    check_outputs(out_dir)
    concepts = _as_concepts(list(concept_paths))
    if not s.allow_unverified:  # refused now, not after the base row has been generated and scored
        for c in concepts:
            _check_verified(c)
    os.makedirs(out_dir, exist_ok=True)
    refs = {reference_name: reference}
    results = []
    for name, cs in (("base", []), ("concept", concepts)):
        rows = evaluate(cs, refs, identifiers, s)
        summary = {"method": name, "concepts": [reference_name], "n_tokens": None, "prompts": rows}
        for key in ("audio_alignment", "text_alignment", "diversity", "copying"):
            summary[key] = _mean(rows, key)
        results.append(summary)
    report = {
        "manifest": None,
        "concept_files": [os.path.abspath(p) for p in concept_paths],
        "settings": {
            k: (
                v
                if isinstance(v, (int, float, str, type(None)))
                else list(v)
                if isinstance(v, (list, tuple))
                else str(v)
            )
            for k, v in asdict(s).items()
        },  # fmt: skip
        "text_alignment_method": results[0]["prompts"][0]["text_alignment_method"],
        **_kind_keys(s.model),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "results": results,
    }
    _write_report(out_dir, report)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# report.html: the listening page (ppt_fast.report_html), clips and curves under clips/
# ---------------------------------------------------------------------------------------------------------------------
#: Seconds of each reference kept beside report.html (the references are minutes long; the page needs a taste).
REFERENCE_EXCERPT_SECONDS = 30.0
CLIPS_DIR = "clips"


def _clip_name(text: str) -> str:
    """A file name for an arm and its concepts: "ppt-1%-violin+marimba" -> "ppt-1pct-violin+marimba"."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.replace("%", "pct")).strip("_") or "clip"


def _keep_reference(out_dir: str, name: str, audio: torch.Tensor, sample_rate: int) -> str:
    """The first REFERENCE_EXCERPT_SECONDS of a reference as `clips/reference-<name>.wav` (+ its spectrogram PNG),
    written as it is; returns the WAV's path relative to `out_dir`."""
    from ..audio import write_wav
    from ..report_html import spectrogram_png

    rel = f"{CLIPS_DIR}/reference-{_clip_name(name)}.wav"
    excerpt = audio[..., : int(REFERENCE_EXCERPT_SECONDS * sample_rate)]
    os.makedirs(os.path.join(out_dir, CLIPS_DIR), exist_ok=True)
    write_wav(os.path.join(out_dir, rel), excerpt, sample_rate, normalize="peak")
    spectrogram_png(excerpt, sample_rate, os.path.join(out_dir, rel[:-4] + ".png"), title=f"reference: {name}")
    return rel


def _keep_clips(out_dir: str, tag: str, prompt_index: int, clips: torch.Tensor, sample_rate: int) -> list[str]:
    """Write `clips` `[B, C, T]` as `clips/<tag>-p<i>-<j>.wav` (each at -14 LUFS, `write_wav`'s default) with their
    spectrogram PNGs; return the WAVs' paths relative to `out_dir`."""
    from ..audio import write_wav
    from ..report_html import spectrogram_png

    os.makedirs(os.path.join(out_dir, CLIPS_DIR), exist_ok=True)
    kept = []
    for j, clip in enumerate(clips):
        rel = f"{CLIPS_DIR}/{_clip_name(tag)}-p{prompt_index + 1}-{j + 1}.wav"
        write_wav(os.path.join(out_dir, rel), clip, sample_rate)
        spectrogram_png(clip, sample_rate, os.path.join(out_dir, rel[:-4] + ".png"), title=tag)
        kept.append(rel)
    return kept


def _recorder(losses: list[float]) -> Callable[[int, float], None]:
    """tune()'s callback(step, loss) that appends each step's loss to `losses`."""
    return lambda step, loss: losses.append(float(loss))


def _keep_first(out_dir: str, tag: str, n: int, kept: list[str], prompt_index: int, prompt: str, clips: torch.Tensor,
                sample_rate: int) -> None:  # fmt: skip
    """`evaluate`'s on_clips for one arm: keep the first `n` clips of each prompt (their paths appended to `kept`)."""
    kept.extend(_keep_clips(out_dir, tag, prompt_index, clips[:n], sample_rate))


def _clip_caption(result: Mapping[str, Any], rel: str) -> str:
    """The prompt (and this clip's audio alignment) of a kept clip, read from its name's prompt index."""
    m = re.search(r"-p(\d+)-(\d+)\.wav$", rel)
    if not m:
        return ""
    i, j = int(m.group(1)) - 1, int(m.group(2)) - 1
    rows = result.get("prompts") or []
    if i >= len(rows):
        return ""
    row = rows[i]
    aa = (row.get("audio_alignment_clips") or [None] * (j + 1))[j] if "audio_alignment_clips" in row else None
    score = f"; audio alignment {aa:.3f}" if _number(aa) and math.isfinite(aa) else ""
    return f"'{row.get('prompt', '')}'{score}"


def _reference_caption(path: str) -> str:
    import soundfile as sf

    seconds = sf.info(path).duration if os.path.isfile(path) else 0.0
    if seconds >= REFERENCE_EXCERPT_SECONDS - 0.01:
        return f"the reference's first {REFERENCE_EXCERPT_SECONDS:g} s"
    return f"the whole reference ({seconds:.0f} s)"


def html_report_sections(out_dir: str, report: Mapping[str, Any]) -> list[Any]:
    """The sections of the protocol's report.html: the references, every arm's kept clips with spectrograms, the
    metrics tables with their standard errors, the loss curves (drawn here, as `clips/loss-<target>.png`)."""
    from ..report_html import Clip, Figure, Section, Table, loss_curves_png

    sections: list[Any] = []
    refs = report.get("reference_clips") or {}
    if refs:
        sections.append(Section("References", [
            [Clip(name, rel, rel[:-4] + ".png", _reference_caption(os.path.join(out_dir, rel)))
             for name, rel in refs.items()]]))  # fmt: skip
    singles = [r for r in report["results"] if len(r["concepts"]) == 1]
    pairs = [r for r in report["results"] if len(r["concepts"]) == 2]
    metrics = []
    if singles:
        headers, rows = _single_table(singles)
        metrics.append(Table(headers, rows, caption="Single concepts, mean over concepts and prompts. " + _SINGLE_NOTE))
    if pairs:
        headers, rows = _pair_table(pairs)
        metrics.append(Table(headers, rows, caption="Two concepts together (prompts name both identifiers)."))
    if metrics:
        sections.append(Section("Metrics", [*metrics, "Metrics: " + _METRIC_HELP]))
    clips = []
    for r in report["results"]:
        files = [f for f in r.get("clip_files") or [] if os.path.isfile(os.path.join(out_dir, f))]
        if files:
            clips.append(f"{r['method']} on {' + '.join(r['concepts'])}:")
            clips.append([Clip(f"{r['method']}, prompt {i + 1}", f, f[:-4] + ".png", _clip_caption(r, f))
                          for i, f in enumerate(files)])  # fmt: skip
    if clips:
        sections.append(Section("Clips (each written at -14 LUFS)", clips))
    figures = []
    by_target: dict[str, dict[str, list[float]]] = {}
    for r in report["results"]:
        if r.get("losses"):
            by_target.setdefault(" + ".join(r["concepts"]), {})[r["method"]] = list(r["losses"])
    for target, curves in by_target.items():
        rel = f"{CLIPS_DIR}/loss-{_clip_name(target)}.png"
        os.makedirs(os.path.join(out_dir, CLIPS_DIR), exist_ok=True)
        loss_curves_png(curves, os.path.join(out_dir, rel), title=f"training loss on {target}")
        figures.append(Figure(rel, f"training loss per step of every arm tuned on {target}"))
    if figures:
        sections.append(Section("Loss curves", figures))
    s = report.get("settings", {})
    sections.append(Section("Run", [
        f"Model `{s.get('model')}`, {s.get('steps') or 'default'} tuning steps, {s.get('clips_per_prompt')} clips of "
        f"{s.get('duration')} s per prompt, embedder `{s.get('embedder')}`. Every number: results.json; the same "
        "tables in markdown: report.md.", *_caveats(report)]))  # fmt: skip
    return sections


def write_html_report(out_dir: str, report: Mapping[str, Any]) -> str:
    """`out_dir/report.html` for a protocol run (`ppt_fast.report_html`); every file it shows sits in `out_dir`."""
    from ..report_html import write_report

    return write_report(out_dir, "ppt_fast evaluation: the methods side by side", html_report_sections(out_dir, report),
                        intro="Listen to each arm's clips beside the reference, with the metrics and their noise. "
                        "Everything sits in this folder: zip it to share.")  # fmt: skip
