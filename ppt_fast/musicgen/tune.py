"""`tune()`: teach a MusicGen a concept from reference audio with Pivotal Parameters Tuning.

Phases (DESIGN §2, §6):
1. Sensitivity: S batches of (reference codes, training prompt naming the identifier) in `eval()` mode; backward;
   only the in-scope rows of the attention projections' weight gradients are computed (`ppt_fast.rowgrad`,
   `row_grads`: on by default for models whose projections hold >= 8 M entries) and scored in backward; any other
   in-scope tensor is scored by a post-accumulate-grad hook that frees its gradient at once (no full gradient set
   ever lives).
2. Selection: a global top-k over all scores (`select_pivots`, ratio or count of the entries in scope); indices
   are mapped to flat indices of the whole parameter.
3. Training: the pivots (+ whatever the recipe trains densely, + the identifier tokens) with a sparse AdamW step
   (state only for pivots; gradients gathered at the pivots inside backward, from row-scoped blocks or from hooks
   that free each whole gradient), `MusicGenSolver`'s cross-entropy (computed in the pattern's layout by
   `loss.pattern_cross_entropy`: equal to the solver's own path, without its copies of the logits), gradient-norm
   clipping (`max_norm`)
   applied per kind of trained tensor: the LM pivots (norm over the pivot gradients only,
   `SparseAdamW.clip_grad_norm_`), dense LM tensors, and the identifier tokens (their gradients live on another
   scale); fp32 on CPU and bf16 autocast on GPU (fp32 where bf16 is unsupported). With prior preservation
   (`prior` > 0) each step adds a second batch: clips the base model sampled, before training, for the prompts
   without the identifier, weighted by `prior` (a second backward into the same gathered gradients).

Recipes (`preset=`):
- `ppt` (default): pivots chosen globally over self-attention V rows and cross-attention K/V rows; tokens.
- `dreamstyler`: sparse self-attention V; cross-attention K/V rows trained in full; tokens.
- `full`: every LM parameter trained densely (torch AdamW); tokens. The overfitting baseline.
- `tokens`: identifier embeddings only (textual inversion).

Several concepts: `tune({"<v1>": a, "<v2>": b})` runs one sensitivity pass and one pivot set per concept, trains
on the union of the pivot sets with batches that name single identifiers (target: that concept's segments) and
combinations (target: the mix of one segment of each named concept, encoded once), and returns one Concept each.
Note: entries in several concepts' pivot sets were trained jointly; each concept stores the jointly tuned value.

Defaults on the random-init tiny model: 150 steps, lr 3e-3 (pivots), token_lr 2e-2, batch 4, 2 s segments; on the
trained default `tiny`: 150 steps, ratio 0.001, lr 1e-4, token_lr 5e-3, batch 4, 2 s segments; on real models: 500
steps, ratio 0.01, lr 1e-4, token_lr 5e-3, batch 4, 10 s segments. No prior preservation unless asked (`prior`).
Weight decay 0 (decay would pull pivots to zero, not back to the base value).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import recipes
from ..concept import Concept, snapshot_base
from ..concept.fingerprint import state_digest as fingerprint
from ..pivots import PivotSet
from . import identifiers as ident_mod
from .loss import pattern_cross_entropy
from .models import load_model, model_kind, module_device

logger = logging.getLogger(__name__)

PRESETS = tuple(recipes.RECIPES)
DEFAULT_TEMPLATES = ("a piece of music, {}",)
COMBO_TEMPLATES = ("a piece of music, {}",)


class TuneError(ValueError):
    """Bad input to tune(), raised before any training; the message names the argument and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Data: batches of (codes, prompts)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Pool:
    identifiers: list[str]  # identifiers named by the prompt
    codes: torch.Tensor  # [N, K, F]


def _has_slot(template: str) -> bool:
    """Whether `template` holds the `{}` the identifiers go into (`_check_templates` allows at most one)."""
    return any(field == "" for _, field, _, _ in string.Formatter().parse(template))


def _prompts(templates: Sequence[str], idents: Sequence[str]) -> list[str]:
    joined = ", ".join(idents)
    return [t.format(joined) if _has_slot(t) else f"{t.format()}, {joined}" for t in templates]


def _check_templates(templates: Sequence[str]) -> None:
    """TuneError unless every template is a non-empty string with at most one `{}` and no other field: the
    identifiers go into the `{}` (or after a comma when there is none); `{{` and `}}` write literal braces."""
    for t in templates:
        if not isinstance(t, str) or not t.strip():
            raise TuneError(f"template {t!r} is not a non-empty string; e.g. 'a piece of music, {{}}'")
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(t) if f is not None]
        except ValueError as e:
            raise TuneError(f"template {t!r}: {e}; write '{{{{' and '}}}}' for literal braces") from None
        other = [f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") for f, spec, conv in fields
                 if f != "" or spec or conv]  # fmt: skip
        if other:
            raise TuneError(
                f"template {t!r} has a field {{{other[0]}}}: templates take one '{{}}' where the identifier goes "
                "and no other field; write '{{' and '}}' for literal braces"
            )
        if len(fields) > 1:
            raise TuneError(f"template {t!r} has {len(fields)} '{{}}': give one, where the identifier goes")


def _make_batch(pool: _Pool, templates: Sequence[str], batch_size: int, g: torch.Generator):
    from audiocraft.modules.conditioners import ConditioningAttributes

    n = pool.codes.shape[0]
    pick = torch.randint(0, n, (batch_size,), generator=g)
    codes = pool.codes[pick]
    texts = _prompts(templates, pool.identifiers)
    tsel = torch.randint(0, len(texts), (batch_size,), generator=g).tolist()
    attrs = [ConditioningAttributes(text={"description": texts[i]}) for i in tsel]
    return codes, attrs


def _loss(lm, codes: torch.Tensor, attrs, autocast) -> torch.Tensor:
    """The MusicGenSolver training loss (`compute_predictions`, `_compute_cross_entropy` on its mask) on precomputed
    condition tensors, computed in the pattern's layout (`loss.pattern_cross_entropy`: the same value, tested)."""
    provider = lm.condition_provider
    tokenized = provider.tokenize(attrs)
    with autocast():
        ce, _ = pattern_cross_entropy(lm, codes, provider(tokenized))
    return ce


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """What a tune run produced: the tuned model (in place), the pivots, tokens, and the loss history."""

    model: Any
    identifiers: list[str]
    pivots: dict[str, PivotSet]  # per identifier (empty PivotSet for preset 'tokens')
    trained: PivotSet  # union of all pivots and dense rows (as pivots): every LM entry that was trained
    dense_rows: dict[str, tuple[int, int]]  # name -> rows trained in full (dreamstyler / full)
    tokens: dict[str, torch.Tensor]  # identifier -> [n_tokens, dim] fp32
    losses: list[float]
    sensitivity_seconds: float
    train_seconds: float
    base_fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)
    base_snapshot: Any = None  # ppt_fast.concept.BaseSnapshot of the trained entries, taken before training
    prior_losses: list[float] = field(default_factory=list)  # prior-preservation loss per step (prior > 0)


def _merge(sets: Sequence[PivotSet]) -> PivotSet:
    """Union of PivotSets over the same layout."""
    out = sets[0]
    for other in sets[1:]:
        out = out | other
    return out


def _init_tokens(lm, text: str, n_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Initial identifier embeddings: the text conditioner's output for `text`, averaged, plus small noise."""
    bank = ident_mod.get_bank(lm)
    cond = lm.condition_provider.conditioners[bank.attribute]
    with torch.no_grad():
        emb, mask = cond(cond.tokenize([text]))
        m = mask.to(emb.dtype).unsqueeze(-1)
        mean = (emb * m).sum(1) / m.sum(1).clamp_min(1)  # [1, D]
    scale = float(mean.float().std()) or 1.0
    noise = torch.randn(n_tokens, mean.shape[-1], generator=g) * 0.1 * scale
    return (mean.float().cpu() + noise).contiguous()


def default_ratio(model: Any) -> float:
    """tune()'s pivot ratio when none is given: 0.001 on a trained default model (`model_kind`), 0.01 elsewhere. On
    tiny-v4 (held-out violin, validation seeds) 1 % learns most (audio alignment 0.56, base 0.15) but raises the loss
    of new trained-instrument clips under their own words by 28 % of what the word tells the model; 0.1 % still lifts
    alignment well above the base and the identifier tokens alone (0.38; tokens 0.31) at 1 %
    (experiments/probes/prior_probe.py, experiments/default_model). Kept for tiny-v8: held-in cost 1.3 % at 0.1 %,
    20 % at 1 %, alignment 0.39 / 0.55 (base 0.27). The tiny LM has 8.6 M parameters; on real MusicGens 1 % is the
    paper's scale."""
    return 0.001 if model_kind(model) == "trained" else 0.01


def _resolve_defaults(model: Any, steps, lr, token_lr, batch_size, segment_seconds, prior=None):
    kind = model_kind(model)
    trained, tiny = kind == "trained", kind != "other"
    return (
        steps if steps is not None else (150 if tiny else 500),
        # The trained default ("tiny") diverges at the random-init model's rates (loss on the reference rises, samples
        # collapse to silence). On tiny-v2 lr 3e-4 won on alignment alone (held-out marimba, "<v1>" clips, base 0.28:
        # ppt 1e-4 / 3e-4 / 1e-3 -> 0.44 / 0.61 / 0.60). On tiny-v4 (experiments/probes/tune_lr_probe.py, validation
        # seed) 1e-4 keeps alignment (0.54 vs 0.56, base 0.30) and the text control of prompts without "<v1>" (0.59
        # vs 0.47, base 0.44), so 1e-4 is the default (chosen on tiny-v4, kept for tiny-v8); token lr 5e-3.
        lr if lr is not None else (1e-4 if trained else 3e-3 if tiny else 1e-4),
        token_lr if token_lr is not None else (5e-3 if trained else 2e-2 if tiny else 5e-3),
        batch_size if batch_size is not None else 4,
        segment_seconds if segment_seconds is not None else (2.0 if tiny else 10.0),
        # Prior preservation is opt-in: on tiny-v4 (held-out violin, validation seed) it cuts what ppt 1 % costs
        # prompts without the identifier (held-in loss rise: 28 % -> 10 % of the prompt information) while the
        # reference loss falls about as far (0.87 / 0.84 nats), but the sampled "<v1>" clips then stay near the base
        # model (audio alignment 0.30 against 0.56-0.64 without it): a lower ratio is the better trade there.
        prior if prior is not None else 0.0,
    )


def class_prompts(templates: Sequence[str]) -> list[str]:
    """The prompts of `templates` with the identifier left out ("a piece of music, {}" -> "a piece of music"), tidied
    as the identifier bank tidies a prompt it cuts identifiers from (`identifiers.clean_prompt`): the text the
    conditioner reads of the training prompt, which the prior-preservation batches are generated from and trained on
    by default (DreamBooth's "class prompt")."""
    out: list[str] = []
    for t in templates:
        p = ident_mod.clean_prompt(t.format(" ") if _has_slot(t) else t.format())
        if p and p not in out:
            out.append(p)
    return out


def _check_prior(prior: float, prompts, clips: int, templates: Sequence[str], idents: Sequence[str]) -> list[str]:
    if not (isinstance(prior, (int, float)) and math.isfinite(prior) and prior >= 0):
        raise TuneError(f"prior={prior!r} must be a finite weight >= 0 (0 turns prior preservation off; 1 is usual)")
    if not prior:
        return []
    if clips < 1:
        raise TuneError(f"prior_clips={clips} must be >= 1 when prior > 0 (16 is usual)")
    prompts = list(prompts) if prompts is not None else class_prompts(templates)
    if not prompts:
        raise TuneError(
            "prior > 0 but no prior prompt: the templates are only the identifier; give prior_prompts=, e.g. "
            "['a piece of music']"
        )
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise TuneError(f"prior_prompts: {p!r} is not a non-empty string")
        named = [i for i in idents if ident_mod.mentions(i, p)]  # the bank cuts an identifier as a whole token
        if named:
            raise TuneError(
                f"prior prompt {p!r} names the identifier {named[0]!r}: prior prompts are what the model must keep "
                "doing without the concept; leave the identifier out"
                + ("" if _bracketed(named[0]) else f" (or pick an identifier that is no word, e.g. '<{named[0]}>')")
            )
        for ident in idents:
            clash = ident_mod.find_collisions(ident, [p])
            if clash:
                raise TuneError(
                    f"identifier {ident!r}: {clash[0][1]!r} is an ordinary word of the prior prompt {p!r}; pick an "
                    "identifier that is no word of the prompts, e.g. '<v1>' when no prompt says 'v1'"
                )
    return prompts


def _prior_pool(mg, prompts: Sequence[str], clips: int, seconds: float, seed: int, dev) -> tuple[torch.Tensor, list]:
    """`clips` token sequences of `seconds` that the base model samples for `prompts` (its own sampling settings),
    before any training: the prior-preservation targets. The global RNG is left as it was."""
    from .generate import set_sampling

    texts = [prompts[i % len(prompts)] for i in range(clips)]
    set_sampling(mg, seconds)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + 7919)
        if dev.type == "cuda":
            torch.cuda.manual_seed_all(seed + 7919)
        with torch.no_grad():
            _, codes = mg.generate(texts, return_tokens=True)
    return codes.to(dev).long(), texts


def _prior_batch(codes: torch.Tensor, texts: Sequence[str], batch_size: int, g: torch.Generator):
    from audiocraft.modules.conditioners import ConditioningAttributes

    pick = torch.randint(0, codes.shape[0], (batch_size,), generator=g).tolist()
    attrs = [ConditioningAttributes(text={"description": texts[i]}) for i in pick]
    return codes[pick], attrs


def _bracketed(ident: str) -> bool:
    return ident.strip("<>[]{}*") != ident


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_settings(**settings: Any) -> None:
    """TuneError for a setting of the wrong kind (after the defaults are resolved): counts are ints, rates finite and
    > 0, the rest finite and >= 0."""
    ints = {"steps": 0, "batch_size": 1, "sensitivity_batches": 0, "prior_clips": 0, "n_tokens": 1}
    for name, low in ints.items():
        v = settings[name]
        if not _is_int(v) or v < low:
            raise TuneError(f"{name}={v!r} must be a whole number >= {low}")
    if not _is_int(settings["seed"]) or not 0 <= settings["seed"] < 2**63:
        raise TuneError(f"seed={settings['seed']!r} must be a whole number in [0, 2**63)")
    for name in ("lr", "token_lr", "segment_seconds"):
        v = settings[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise TuneError(f"{name}={v!r} must be a finite number > 0")
    for name in ("max_norm", "weight_decay"):
        v = settings[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
            raise TuneError(f"{name}={v!r} must be a finite number >= 0 (0 turns it off)")
    if not isinstance(settings["init_text"], str) or not settings["init_text"].strip():
        raise TuneError(f"init_text={settings['init_text']!r} must be a non-empty string (e.g. 'music')")
    from ..ops.sensitivity_accumulate import MODES

    if settings["criterion"] not in MODES:
        raise TuneError(f"criterion={settings['criterion']!r} is not one of {', '.join(MODES)}")


def _check_inputs(
    refs: Mapping[str, Any], templates: Sequence[str], preset: str, ratio, count, n_tokens
) -> recipes.Recipe:
    """TuneError for a bad recipe, pivot amount, identifier or template; the recipe named by `preset` otherwise."""
    try:
        recipe = recipes.get(preset)
    except ValueError as e:
        raise TuneError(str(e)) from None
    if ratio is not None and count is not None:
        raise TuneError("give ratio= or count=, not both (count=None to use the ratio)")
    if count is None and (not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0 < ratio <= 1):
        raise TuneError(f"ratio={ratio!r} must lie in (0, 1] (a fraction of the entries in scope, e.g. 0.01)")
    if count is not None and (not _is_int(count) or count < 1):
        raise TuneError(f"count={count!r} must be a whole number >= 1")
    if not _is_int(n_tokens) or n_tokens < 1:
        raise TuneError(f"n_tokens={n_tokens} must be >= 1 (3 separates concepts best)")
    if not refs:
        raise TuneError("no reference given")
    if not templates:
        raise TuneError("templates= is empty; give at least one, e.g. 'a piece of music, {}'")
    _check_templates(templates)
    for ident in refs:
        try:
            ident_mod.check_identifier(ident)
        except ValueError as e:
            raise TuneError(str(e)) from None
        clash = ident_mod.find_collisions(ident, templates)
        if clash:
            template, word = clash[0]
            where = "names the identifier outside its '{}'" if word == ident else f"uses {word!r} as an ordinary word"
            raise TuneError(
                f"identifier {ident!r} collides with the template {template!r}, which {where}: the identifier would "
                "be cut out of (or compete with) that word in every prompt; pick an identifier that is no word of "
                "the templates, e.g. '<v1>'"
            )
    idents = list(refs)
    for a in idents:
        for b in idents:
            if a != b and a in b:
                raise TuneError(f"identifier {a!r} is part of {b!r}; make them distinct (e.g. '<v1>', '<v2>')")
    return recipe


def tune_model(
    reference: Any,
    *,
    model: Any = "tiny",
    identifier: str = "<v1>",
    preset: str = "ppt",
    ratio: float | None = None,
    count: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    token_lr: float | None = None,
    batch_size: int | None = None,
    sensitivity_batches: int = 8,
    criterion: str = "grad_sq",
    n_tokens: int = 3,
    init_text: str = "music",
    templates: Sequence[str] | None = None,
    segment_seconds: float | None = None,
    max_norm: float = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    verbose: bool = True,
    callback: Callable[[int, float], None] | None = None,
    activation_checkpointing: bool = False,
    row_grads: bool | None = None,
    prior: float | None = None,
    prior_prompts: Sequence[str] | None = None,
    prior_clips: int = 16,
) -> TuneResult:
    """tune() returning the tuned model and the run's details (see `tune` for the arguments)."""
    from tqdm.auto import tqdm

    from . import data

    refs: dict[str, Any] = dict(reference) if isinstance(reference, Mapping) else {identifier: reference}
    if isinstance(templates, str):
        raise TuneError(f"templates={templates!r} must be a list of strings, e.g. [{templates!r}]")
    templates = tuple(templates) if templates is not None else DEFAULT_TEMPLATES
    if ratio is None and count is None:
        ratio = default_ratio(model)
    recipe = _check_inputs(refs, templates, preset, ratio if count is None else None, count, n_tokens)
    steps, lr, token_lr, batch_size, segment_seconds, prior = _resolve_defaults(
        model, steps, lr, token_lr, batch_size, segment_seconds, prior
    )
    _check_settings(steps=steps, batch_size=batch_size, sensitivity_batches=sensitivity_batches,
                    prior_clips=prior_clips, n_tokens=n_tokens, seed=seed, lr=lr, token_lr=token_lr,
                    segment_seconds=segment_seconds, max_norm=max_norm, weight_decay=weight_decay,
                    init_text=init_text, criterion=criterion)  # fmt: skip
    prior_prompts = _check_prior(prior, prior_prompts, prior_clips, templates, list(refs))
    if not recipe.trains_weights:  # nothing the prompts without the identifier read is trained: nothing to preserve
        prior, prior_prompts = 0.0, []

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mg = load_model(model, device=device, seed=seed)
    lm = mg.lm
    dev = next(lm.parameters()).device
    bank = ident_mod.get_bank(lm)
    for ident in refs:
        if bank.has(ident):
            raise TuneError(
                f"identifier {ident!r} is already registered on this model (a concept applied?); remove it first"
            )

    # ---- data (all checks before any training) ---------------------------------------------------------------------
    codec_fp = fingerprint(mg.compression_model)
    encoded = {
        ident: data.encode_reference(
            mg, ref, segment_seconds=segment_seconds, codec_fingerprint=codec_fp, use_cache=use_cache
        )
        for ident, ref in refs.items()
    }
    base_fp = fingerprint(lm)
    pools = {ident: _Pool([ident], enc.codes.to(dev)) for ident, enc in encoded.items()}
    combos: list[_Pool] = []
    if len(refs) > 1:
        combos.append(_combo_pool(mg, refs, segment_seconds, g, dev))

    if dev.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    else:
        amp = None

    def autocast():
        if amp is None:
            return torch.autocast(device_type=dev.type, enabled=False)
        return torch.autocast(device_type=dev.type, dtype=amp)

    # ---- prior preservation: what the base model does for the prompts without the identifier --------------------
    prior_codes, prior_texts, prior_seconds = None, [], 0.0
    if prior:
        t_prior = time.perf_counter()
        seg_frames = next(iter(pools.values())).codes.shape[-1]
        prior_codes, prior_texts = _prior_pool(mg, prior_prompts, prior_clips, segment_seconds, seed, dev)
        prior_codes = prior_codes[..., :seg_frames]
        prior_seconds = time.perf_counter() - t_prior
        logger.info("prior preservation: %d base-model clips for %s in %.1f s", prior_clips, prior_prompts,
                    prior_seconds)  # fmt: skip

    # ---- identifier tokens -----------------------------------------------------------------------------------------
    tokens: dict[str, torch.nn.Parameter] = {}
    for ident in refs:
        t = torch.nn.Parameter(_init_tokens(lm, init_text, n_tokens, g).to(dev))
        tokens[ident] = t
        bank.add(ident, t)

    lm.eval()  # deterministic: no CFG / attribute dropout (they only act when conditions are passed raw)
    for p in lm.parameters():
        p.requires_grad_(False)

    from ..optim import SparseAdamW, freeze_unpivoted
    from ..rowgrad import RowGrads
    from ..scope import Scope
    from ..sensitivity import SensitivityAccumulator

    names = [n for n, _ in lm.named_parameters()]
    params = dict(lm.named_parameters())
    scope = Scope.preset(recipe.scope) if recipe.selects_pivots else None

    # ---- phase 1: sensitivity (eval mode, one pass per concept) ------------------------------------------------
    t0 = time.perf_counter()
    pivots: dict[str, PivotSet] = {}
    for ident in refs:
        if scope is None:
            pivots[ident] = _on_layout(names, params, {}, dev)
            continue
        with SensitivityAccumulator(lm, scope, mode=criterion) as acc:
            rg = _row_grads(lm, [(e.name, [e.rows], acc.row_sink(e.name)) for e in acc.entries], row_grads)
            bar = tqdm(range(sensitivity_batches), desc=f"sensitivity {ident}", disable=not verbose, leave=False)
            with rg, _checkpoint_routing(lm, rg):
                for _ in bar:
                    codes, attrs = _make_batch(pools[ident], templates, batch_size, g)
                    with rg.forward():
                        loss = _loss(lm, codes, attrs, autocast)
                    with rg.backward():
                        loss.backward()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            if acc.steps == 0:
                raise TuneError("sensitivity_batches=0: at least one batch is needed to choose pivots")
            # ---- phase 2: selection (global top-k over the scope) ----------------------------------------------
            sel = acc.pivots(ratio=None if count is not None else ratio, count=count)
        for t in tokens.values():
            t.grad = None
        pivots[ident] = _on_layout(names, params, dict(iter(sel)), dev)
        logger.info("%s: %d pivots of %d entries in scope", ident, sel.count, acc.numel)
    sens_seconds = time.perf_counter() - t0

    # ---- phase 3: training ---------------------------------------------------------------------------------------
    dense_entries = scope.resolve_dense(lm) if scope is not None else []
    dense_rows = {e.name: e.rows for e in dense_entries}
    trained = _merge(list(pivots.values()))
    if dense_entries:
        trained = trained | _on_layout(names, params, dict(iter(scope.dense_pivots(lm))), dev)
    dense_params = list(lm.parameters()) if recipe.dense_all else []
    if recipe.dense_all:
        dense_rows = {n: (0, p.shape[0] if p.dim() else 1) for n, p in lm.named_parameters()}
        trained = _on_layout(names, params, {n: torch.arange(p.numel(), device=dev) for n, p in params.items()}, dev)
    base_snapshot = _snapshot(lm, trained, dense_rows, recipe.dense_all)
    freeze = freeze_unpivoted(lm, trained) if not dense_params else None
    for p in dense_params:
        p.requires_grad_(True)
    sparse_opt = (
        SparseAdamW(lm, trained, lr=lr, weight_decay=weight_decay, gather_in_backward=True, nonfinite="raise")
        if trained.count and not dense_params
        else None
    )
    dense_opt = (
        torch.optim.AdamW(dense_params, lr=lr, weight_decay=weight_decay, foreach=False) if dense_params else None
    )
    rg = RowGrads()
    if sparse_opt is not None:
        rg = _row_grads(
            lm,
            [(n, [_pivot_rows(idx, params[n])], sparse_opt.row_sink(params[n])) for n, idx in trained if idx.numel()],
            row_grads,
        )
    rg.install()
    token_list = list(tokens.values())
    token_opt = torch.optim.AdamW(token_list, lr=token_lr, weight_decay=0.0, foreach=False)

    all_pools = list(pools.values()) + combos
    losses: list[float] = []
    prior_losses: list[float] = []
    transformer = getattr(lm, "transformer", None)
    saved_ckpt = getattr(transformer, "checkpointing", None)
    if activation_checkpointing and saved_ckpt is not None:
        # audiocraft's per-layer torch checkpointing: activations are recomputed in backward instead of kept; the
        # results are bitwise the same (tested), the peak memory lower, each step slower (one more forward).
        transformer.checkpointing = "torch"
    t1 = time.perf_counter()
    bar = tqdm(range(steps), desc="tune", disable=not verbose, dynamic_ncols=True)
    routing = contextlib.ExitStack()
    try:
        routing.enter_context(_checkpoint_routing(lm, rg))
        for step in bar:
            # Single-concept batches in turn, and a combination batch every 4th step when several train together.
            if combos and step % 4 == 3:
                pool = combos[(step // 4) % len(combos)]
            else:
                pool = all_pools[step % len(pools)]
            codes, attrs = _make_batch(pool, COMBO_TEMPLATES if pool in combos else templates, batch_size, g)
            with rg.forward():
                loss = _loss(lm, codes, attrs, autocast)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {loss.item()} at step {step}: lower lr (now {lr}) or token_lr")
            with rg.backward():
                loss.backward()
            if prior_codes is not None:
                # Prior preservation (DreamBooth's): the same step also fits the base model's own samples for the
                # prompts without the identifier, so what those prompts produce stays put. A second backward into
                # the same gradients (SparseAdamW's gathered buffers and the row sinks accumulate).
                pcodes, pattrs = _prior_batch(prior_codes, prior_texts, batch_size, g)
                with rg.forward():
                    ploss = _loss(lm, pcodes, pattrs, autocast)
                if not torch.isfinite(ploss):
                    raise RuntimeError(f"prior loss became {ploss.item()} at step {step}: lower lr (now {lr})")
                with rg.backward():
                    (prior * ploss).backward()
                prior_losses.append(float(ploss.item()))
            # Gradient clipping, per kind of trained tensor: LM pivots (their gathered gradients only), dense LM
            # tensors, and the identifier tokens (whose gradients live on another scale).
            if max_norm:
                if sparse_opt is not None:
                    sparse_opt.clip_grad_norm_(max_norm)
                if dense_params:
                    torch.nn.utils.clip_grad_norm_(dense_params, max_norm)
                torch.nn.utils.clip_grad_norm_(token_list, max_norm)
            for opt in (sparse_opt, dense_opt, token_opt):
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if callback is not None:
                callback(step, losses[-1])
    finally:
        routing.close()
        rg.remove()
        if saved_ckpt is not None:
            transformer.checkpointing = saved_ckpt
        if sparse_opt is not None:
            sparse_opt.remove_hooks()
        if freeze is not None:
            freeze.restore()
        for p in lm.parameters():
            p.requires_grad_(False)
            p.grad = None
    train_seconds = time.perf_counter() - t1
    bar.close()
    out_tokens = {ident: t.detach().float().cpu().clone() for ident, t in tokens.items()}
    for ident, t in out_tokens.items():
        bank.add(ident, t.to(dev))
    if verbose and steps:
        logger.info("tuned %d steps in %.1f s (%.2f steps/s), loss %.3f -> %.3f", steps, train_seconds,
                    steps / max(train_seconds, 1e-9), losses[0], losses[-1])  # fmt: skip
    return TuneResult(
        model=mg, identifiers=list(refs), pivots=pivots, trained=trained, dense_rows=dense_rows, tokens=out_tokens,
        losses=losses, sensitivity_seconds=sens_seconds, train_seconds=train_seconds, base_fingerprint=base_fp,
        settings=dict(
            # ratio / count only where a preset selects pivots (tokens and full train no pivots)
            preset=preset, ratio=ratio if scope is not None else None, count=count if scope is not None else None,
            steps=steps, lr=lr, token_lr=token_lr, batch_size=batch_size,
            sensitivity_batches=sensitivity_batches, criterion=criterion, n_tokens=n_tokens, templates=list(templates),
            segment_seconds=segment_seconds, max_norm=max_norm, weight_decay=weight_decay, seed=seed, prior=prior,
            prior_prompts=list(prior_prompts), prior_clips=prior_clips if prior else 0,
            model=model if isinstance(model, str) else getattr(model, "name", "object"),
        ),
        base_snapshot=base_snapshot, prior_losses=prior_losses,
    )  # fmt: skip


def _row_grad_weights(lm) -> dict[str, torch.Tensor]:
    """The LM weights row-scoped gradients can serve: the packed ``in_proj_weight`` of audiocraft's custom
    attention (``StreamingMultiheadAttention(custom=True)``, what MusicGen's memory-efficient layers use), which
    projects with ``F.linear`` on the whole weight (self-attention) or on row slices of it (cross-attention)."""
    out = {}
    for mname, mod in lm.named_modules():
        if type(mod).__name__ == "StreamingMultiheadAttention" and getattr(mod, "custom", False):
            w = getattr(mod, "in_proj_weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                out[f"{mname}.in_proj_weight" if mname else "in_proj_weight"] = w
    return out


# row_grads=None (auto) turns row-scoped gradients on when the weights they serve hold at least this many entries.
# Below it the Python dispatch of the torch-function mode (a microsecond or two per op) costs more than the matmul
# work saved: tiny (1.6 M entries) +14 % per step with it, musicgen-small (151 M) -15 % (benchmarks/tune_probe.py).
ROW_GRADS_AUTO_MIN = 8_000_000


def _row_grads(lm, targets, enable: bool | None = True):
    """A RowGrads over the eligible ones of ``targets`` [(name, rows, sink)]; the others keep whole gradients.
    ``enable=False``: an empty RowGrads; ``None``: only when the eligible weights hold >= ROW_GRADS_AUTO_MIN
    entries (else an empty RowGrads)."""
    from ..rowgrad import RowGrads

    rg = RowGrads()
    if enable is False:
        return rg
    eligible = _row_grad_weights(lm)
    chosen = [(name, rows, sink) for name, rows, sink in targets if name in eligible]
    if enable is None and sum(eligible[n].numel() for n, _, _ in chosen) < ROW_GRADS_AUTO_MIN:
        return rg
    for name, rows, sink in chosen:
        rg.add(name, eligible[name], rows, sink)
    return rg


@contextlib.contextmanager
def _checkpoint_routing(lm, rg):
    """While audiocraft's per-layer checkpointing is on (``transformer.checkpointing == "torch"``), run it with
    ``context_fn=rg.checkpoint_contexts`` so the recomputation in backward sees the row-scoped linears too."""
    transformer = getattr(lm, "transformer", None)
    method = getattr(transformer, "checkpointing", "none")
    if not len(rg) or method == "none":
        yield
        return
    if method != "torch":
        raise TuneError(
            f"row-scoped gradients do not support audiocraft's {method!r} checkpointing; use checkpointing='torch' "
            "or tune(..., row_grads=False)"
        )
    from torch.utils.checkpoint import checkpoint

    def apply_layer(layer, *args, **kwargs):
        return checkpoint(layer, *args, use_reentrant=False, context_fn=rg.checkpoint_contexts, **kwargs)

    transformer._apply_layer = apply_layer  # instance attribute: shadows StreamingTransformer._apply_layer
    try:
        yield
    finally:
        del transformer._apply_layer


def _pivot_rows(idx: torch.Tensor, param: torch.Tensor) -> tuple[int, int]:
    """The rows ``[first, last + 1)`` holding a tensor's (sorted, non-empty) pivots."""
    cols = param[0].numel()
    return int(idx[0]) // cols, int(idx[-1]) // cols + 1


def _snapshot(lm, trained: PivotSet, dense_rows: dict, dense_all: bool):
    """Base values + fingerprint of every entry the run will change (Concept.capture registers the concept as
    applied on the tuned model with them, so `concept.remove(model)` restores the base bitwise)."""
    if dense_all:
        return snapshot_base(lm, None, {n: None for n in dense_rows})
    return snapshot_base(lm, trained, dense_rows)


def _on_layout(names: list[str], params: dict, idx: dict[str, torch.Tensor], dev) -> PivotSet:
    parts, offsets = [], [0]
    for n in names:
        i = idx.get(n)
        i = torch.empty(0, dtype=torch.int32, device=dev) if i is None else i.to(torch.int32)
        parts.append(i)
        offsets.append(offsets[-1] + i.numel())
    return PivotSet(names, [params[n].shape for n in names], offsets, torch.cat(parts))


def _combo_pool(mg, refs: Mapping[str, Any], segment_seconds: float, g: torch.Generator, dev) -> _Pool:
    """Targets for prompts naming all identifiers: mixes of one segment of each reference, encoded once."""
    from . import data

    auds = []
    for ref in refs.values():
        audio, _, _ = data.load_reference(ref, mg.sample_rate, mg.audio_channels)
        auds.append(data.segments(audio, mg.sample_rate, segment_seconds))
    n = min(a.shape[0] for a in auds)
    size = min(a.shape[-1] for a in auds)
    mixes = []
    for _ in range(max(n, 2)):
        picks = [a[int(torch.randint(0, a.shape[0], (1,), generator=g))][..., :size] for a in auds]
        mixes.append(sum(picks) / len(picks))
    with torch.no_grad():
        codes, _ = mg.compression_model.encode(torch.stack(mixes).to(module_device(mg.compression_model)))
    return _Pool(list(refs), codes.long().to(dev))


def _capture(result: TuneResult) -> list[Any]:
    """One Concept per identifier from a finished run."""
    return [Concept.capture(result, ident) for ident in result.identifiers]


def tune(
    reference: Any,
    *,
    model: Any = "tiny",
    identifier: str = "<v1>",
    preset: str = "ppt",
    ratio: float | None = None,
    steps: int | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    verbose: bool = True,
    **kwargs: Any,
):
    """Teach `model` the concept in `reference` under `identifier`; return a Concept (or a list for several).

    Args:
        reference: an audio file (anything soundfile reads; any rate/channels), a `(tensor [C, T], sample_rate)`
            pair, or `{identifier: reference, ...}` for several concepts trained together (returns a list).
        model: `"tiny"` (default, built in code), a `load_model` name/path/id, or an audiocraft MusicGen object
            (tuned in place: its weights carry the concept afterwards; `concept.remove(model)` restores them).
        identifier: the word that names the concept in prompts, e.g. `"<v1>"`.
        preset: the recipe: `ppt` | `dreamstyler` | `full` | `tokens` (module docstring).
        ratio / count=: pivots as a fraction of the entries in scope, or a fixed number (count= wins over ratio);
            ratio None: 0.001 on the trained default `tiny`, 0.01 elsewhere (`default_ratio`).
        steps: training steps (default 150 on the tiny model, 500 otherwise).
        out: write the concept file here (for several concepts: a directory; one `concept_file_name(identifier)`,
            e.g. `v1.ppt`, each). Checked before any work (`ppt_fast._io.check_writable`): a path that cannot be
            written (a directory or device as the file, a path under a regular file, a folder where no file can be
            created) or two identifiers that would share a file name raise TuneError before tuning starts.
        seed: everything random (token init, batches) derives from it; on CPU a fixed seed gives the same file.
        verbose: a tqdm bar per phase (phase, step, loss, steps/s); False silences it.
        **kwargs: lr, token_lr, batch_size, sensitivity_batches, criterion, n_tokens, init_text, templates,
            segment_seconds, max_norm, weight_decay, device, use_cache, callback, activation_checkpointing
            (recompute activations in backward: lower peak memory, slower steps; the result is the same),
            row_grads (compute only the scored / trained rows of the attention projections' weight gradients,
            `ppt_fast.rowgrad`: True, False = whole gradients, None (default) = on when those weights hold >= 8 M
            entries, e.g. every real MusicGen, off for the tiny model, where it costs more than it saves),
            prior (prior-preservation weight, DreamBooth's: before training, the base model samples `prior_clips`
            (16) clips of one segment for `prior_prompts` (default: the templates without the identifier, e.g. "a
            piece of music"), and every step also fits them at this weight, so what prompts without the identifier
            produce stays closer to the base model; default 0 = off; ignored by preset "tokens") (see `tune_model`).
    """
    count = kwargs.pop("count", None)
    files = _check_out(out, reference, identifier)
    result = tune_model(
        reference, model=model, identifier=identifier, preset=preset, ratio=None if count is not None else ratio,
        count=count, steps=steps, seed=seed, verbose=verbose, **kwargs,
    )  # fmt: skip
    concepts = _capture(result)
    if out is not None:
        if not isinstance(reference, Mapping):
            concepts[0].save(files[identifier])
        else:
            os.makedirs(out, exist_ok=True)
            for ident, c in zip(result.identifiers, concepts):
                c.save(files[ident])
    return concepts if isinstance(reference, Mapping) else concepts[0]


def concept_file_name(identifier: str) -> str:
    """The file `tune(..., out=folder)` writes `identifier`'s concept to: its letters, digits, `-` and `_` (others
    become `_`, leading / trailing `_` dropped; `concept` when none is left) + `.ppt`: `<v1>` -> `v1.ppt`. The name
    never holds a separator or a dot before `.ppt`, so it stays inside the folder."""
    s = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in identifier).strip("_")
    return (s or "concept") + ".ppt"


def _check_out(out, reference, identifier: str) -> dict[str, str]:
    """Before any work: the file each identifier's concept will be written to, checked writable (`check_writable`);
    TuneError when `out` cannot be written or two identifiers would share a file (names compared case-insensitively:
    some file systems do). `{}` when `out` is None."""
    from .._io import UnwritablePathError, check_writable

    if out is None:
        return {}
    if not isinstance(out, (str, os.PathLike)):
        raise TuneError(f"out={out!r} must be a path (a file for one concept, a folder for several)")
    out = os.fspath(out)
    try:
        if not isinstance(reference, Mapping):
            check_writable(out)
            return {identifier: out}
        check_writable(out, folder=True)
        files: dict[str, str] = {}
        by_name: dict[str, Any] = {}
        for ident in reference:
            name = concept_file_name(ident) if isinstance(ident, str) else None
            if name is None:
                continue  # _check_inputs refuses it, naming it
            if name.casefold() in by_name:
                raise TuneError(
                    f"identifiers {by_name[name.casefold()]!r} and {ident!r} would both be written to "
                    f"{os.path.join(out, name)!r} (a file name keeps letters, digits, '-' and '_'); rename one, e.g. "
                    "'<v1>' and '<v2>'"
                )
            by_name[name.casefold()] = ident
            files[ident] = os.path.join(out, name)
            check_writable(files[ident])
        return files
    except UnwritablePathError as e:
        raise TuneError(f"out: {e}") from None


__all__ = ["PRESETS", "TuneError", "TuneResult", "concept_file_name", "tune", "tune_model"]
