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

Defaults, per kind of model, when an argument is left at None: `ppt_fast.recipes.MODEL_DEFAULTS`. No prior
preservation unless asked (`prior`). Weight decay 0 (decay would pull pivots to zero, not back to the base value).

The loop is host-agnostic: everything model-library-specific (loading, encoding the reference, the loss, sampling,
the identifier bank, the attention layout, checkpointing) goes through `ppt_fast.hosts.base.Host`.
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
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from . import identifiers as ident_mod
from . import recipes
from .concept import Concept, snapshot_base
from .hosts.base import Host
from .models import load_host, model_kind
from .pivots import PivotSet

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a piece of music, {}",)
COMBO_TEMPLATES = ("a piece of music, {}",)


class TuneError(ValueError):
    """Bad input to tune(), raised before any training; the message names the argument and the fix."""


class TuneCancelled(RuntimeError):
    """Raised by a `progress` callback to stop a run (the app's cancel button): the run stops at once, every patch
    on the model is reverted and the identifier tokens are unregistered; nothing is written."""


@dataclass(frozen=True)
class TuneProgress:
    """What `tune(..., progress=fn)` passes to `fn` at every phase change and after every step: `phase` (one of
    `PHASES`), `step` of `total` in that phase, the step's `loss` (None outside training), `elapsed` seconds since
    the run started and `eta` seconds left in the phase (None until a step has been timed)."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    elapsed: float = 0.0
    eta: float | None = None

    PHASES = ("encoding", "sensitivity", "selection", "training", "done")


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
    n = pool.codes.shape[0]
    pick = torch.randint(0, n, (batch_size,), generator=g)
    codes = pool.codes[pick]
    texts = _prompts(templates, pool.identifiers)
    tsel = torch.randint(0, len(texts), (batch_size,), generator=g).tolist()
    return codes, [texts[i] for i in tsel]


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
    scope_entries: int = 0  # entries the recipe's scope lets pivots be chosen from (0: the recipe selects none)
    lm_entries: int = 0  # entries of the language model a recipe may train (Host.trainable_names)
    world_size: int = 1  # processes the run was split over (torch.distributed)
    comm_bytes_per_step: int = 0  # bytes each step all-reduced (one packed fp32 buffer; 0 in one process)
    comm_seconds: float = 0.0  # time in those all-reduces, all steps


def _merge(sets: Sequence[PivotSet]) -> PivotSet:
    """Union of PivotSets over the same layout."""
    out = sets[0]
    for other in sets[1:]:
        out = out | other
    return out


def _init_tokens(host: Host, text: str, n_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Initial identifier embeddings: the text conditioner's output for `text`, averaged, plus small noise."""
    mean = host.text_embedding(text)  # [1, D]
    scale = float(mean.float().std()) or 1.0
    noise = torch.randn(n_tokens, mean.shape[-1], generator=g) * 0.1 * scale
    return (mean.float().cpu() + noise).contiguous()


def default_ratio(model: Any) -> float:
    """tune()'s pivot ratio when none is given, for `model` (a `load_model` argument or a loaded model):
    `recipes.MODEL_DEFAULTS[model_kind(model)].ratio` (0.001 on the trained default, 0.01 elsewhere)."""
    return recipes.MODEL_DEFAULTS[model_kind(model)].ratio


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


def _prior_pool(host: Host, prompts: Sequence[str], clips: int, seconds: float, seed: int) -> tuple[torch.Tensor, list]:
    """`clips` token sequences of `seconds` that the base model samples for `prompts` (its own sampling settings),
    before any training: the prior-preservation targets. The global RNG is left as it was."""
    dev = host.device
    texts = [prompts[i % len(prompts)] for i in range(clips)]
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + 7919)
        if dev.type == "cuda":
            torch.cuda.manual_seed_all(seed + 7919)
        codes = host.sample_codes(texts, seconds)
    return codes, texts


def _prior_batch(codes: torch.Tensor, texts: Sequence[str], batch_size: int, g: torch.Generator):
    pick = torch.randint(0, codes.shape[0], (batch_size,), generator=g).tolist()
    return codes[pick], [texts[i] for i in pick]


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
    from .ops.sensitivity_accumulate import MODES

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


@dataclass
class TuneConfig:
    """Every setting of a tune run (`tune()` takes each as a keyword argument). None: the per-model default
    (`recipes.MODEL_DEFAULTS`, by `model_kind`)."""

    model: Any = "tiny"  # a `load_model` name / path / id, or a model object (tuned in place)
    identifier: str = "<v1>"  # the word that names the concept (for one reference)
    preset: str = recipes.DEFAULT  # the recipe (`recipes.RECIPES`)
    ratio: float | None = None  # pivots as a fraction of the entries in scope
    count: int | None = None  # or a fixed number of pivots (not both)
    steps: int | None = None
    lr: float | None = None
    token_lr: float | None = None
    batch_size: int | None = None
    sensitivity_batches: int = 8
    criterion: str = "grad_sq"
    n_tokens: int = 3
    init_text: str = "music"
    templates: Sequence[str] | None = None
    segment_seconds: float | None = None
    max_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str | torch.device | None = None
    use_cache: bool = True
    verbose: bool = True
    callback: Callable[[int, float], None] | None = None
    progress: Callable[[TuneProgress], None] | None = None
    activation_checkpointing: bool = False
    row_grads: bool | None = None
    prior: float | None = None
    prior_prompts: Sequence[str] | None = None
    prior_clips: int = 16

    def resolved(self) -> TuneConfig:
        """A copy with every None default filled in for the model and the settings checked (TuneError)."""
        d = recipes.MODEL_DEFAULTS[model_kind(self.model)]
        if isinstance(self.templates, str):
            raise TuneError(f"templates={self.templates!r} must be a list of strings, e.g. [{self.templates!r}]")
        c = replace(
            self,
            ratio=(self.ratio if self.ratio is not None else d.ratio) if self.count is None else None,
            steps=self.steps if self.steps is not None else d.steps,
            lr=self.lr if self.lr is not None else d.lr,
            token_lr=self.token_lr if self.token_lr is not None else d.token_lr,
            batch_size=self.batch_size if self.batch_size is not None else d.batch_size,
            segment_seconds=self.segment_seconds if self.segment_seconds is not None else d.segment_seconds,
            prior=self.prior if self.prior is not None else d.prior,
            templates=tuple(self.templates) if self.templates is not None else DEFAULT_TEMPLATES,
        )
        return c


def tune_model(reference: Any, config: TuneConfig | None = None, *, strategy: Strategy | None = None,
               **settings: Any) -> TuneResult:  # fmt: skip
    """tune() returning the tuned model and the run's details; `settings` override fields of `config` (TuneConfig);
    `strategy`: how selection or training departs from the recipe (`Strategy`; the evaluation's peer arms)."""
    from .distributed import Context

    ctx = Context.current()
    # Several processes: a bad setting raises the same TuneError on each; one seen by some only ends them all.
    with contextlib.nullcontext() if ctx is None else ctx.guard("checking the settings"):
        cfg, refs, recipe = _checked(reference, config, settings)
        if ctx is not None:
            _check_dist(cfg, strategy, ctx)
    if ctx is not None:
        ctx.check_same("settings", _settings_digest(cfg, refs),
                       "start every process with the same arguments (torchrun runs one command line)")  # fmt: skip
        cfg = replace(cfg, verbose=cfg.verbose and ctx.rank == 0, device=_dist_device(cfg.device))

    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with contextlib.nullcontext() if ctx is None else ctx.guard("loading the model"):
        host = load_host(cfg.model, device=cfg.device, seed=cfg.seed)
        bank = host.identifier_bank()
        for ident in refs:
            if bank.has(ident):
                raise TuneError(
                    f"identifier {ident!r} is already registered on this model (a concept applied?); remove it first"
                )
    run = _Run(host, cfg, recipe, refs, g, strategy, ctx)
    try:
        run.prepare()
        run.select()
        return run.train()
    except BaseException:
        run.abort()  # cancelled or failed: the model as it was given (weights, registered identifiers)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# The run: data, then phase 1 + 2 (select), then phase 3 (train)
# ---------------------------------------------------------------------------------------------------------------------
def _autocast(dev: torch.device):
    """bf16 autocast on a GPU that supports it; fp32 elsewhere."""
    amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None

    def ctx():
        if amp is None:
            return torch.autocast(device_type=dev.type, enabled=False)
        return torch.autocast(device_type=dev.type, dtype=amp)

    return ctx


class _Run:
    """One tune run's state, phase by phase (`prepare`, `select`, `train`); every check happened before."""

    def __init__(self, host: Host, cfg: TuneConfig, recipe: recipes.Recipe, refs: dict[str, Any], g,
                 strategy: Strategy | None = None, ctx: Any = None) -> None:  # fmt: skip
        self.host, self.cfg, self.recipe, self.refs, self.g = host, cfg, recipe, refs, g
        self.strategy = strategy
        self.dist = ctx  # ppt_fast.distributed.Context, or None in one process
        self.lm = host.lm
        self.dev = host.device
        self.autocast = _autocast(self.dev)
        self.names = [n for n, _ in self.lm.named_parameters()]
        self.params = dict(self.lm.named_parameters())
        self.scope = host.scope(recipe.scope) if recipe.selects_pivots else None
        self.t_start = time.perf_counter()
        self._phase_t0 = self.t_start

    def abort(self) -> None:
        """After a cancelled or failed run: the trained entries back to their base values (bitwise, from the
        snapshot taken before the first step) and the run's identifiers unregistered."""
        snap = getattr(getattr(self, "trainer", None), "base_snapshot", None)
        if snap is not None:
            snap.restore(self.lm)
        bank = self.host.identifier_bank()
        for ident in getattr(self, "tokens", {}):
            if bank.has(ident):
                bank.remove(ident)

    def report(self, phase: str, step: int, total: int, loss: float | None = None) -> None:
        """Tell `cfg.progress` where the run is (it may raise TuneCancelled to stop the run)."""
        if self.cfg.progress is None:
            return
        now = time.perf_counter()
        if step == 0:
            self._phase_t0 = now
        eta = (now - self._phase_t0) / step * (total - step) if step else None
        p = TuneProgress(phase, step, total, loss, now - self.t_start, eta)
        if self.dist is None:
            self.cfg.progress(p)
            return
        try:  # raised where the other processes may be in a collective: told to them at the next one
            self.cfg.progress(p)
        except BaseException as e:
            if self.dist.pending is None:
                self.dist.pending = e

    def guard(self, where: str):
        """A block without collectives whose failure on one process ends every process (one process: nothing)."""
        return contextlib.nullcontext() if self.dist is None else self.dist.guard(where)

    def loss(self, codes: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        with self.autocast():
            return self.host.loss(codes, prompts)

    # ---- data (all checks before any training) ---------------------------------------------------------------------
    def prepare(self) -> None:
        with self.guard("encoding the reference"):
            self._prepare()
        if self.dist is not None:
            # Every process encoded the same reference and sampled the same prior clips; process 0's codes are
            # the run's (a GPU codec need not be bitwise deterministic across devices).
            for pool in list(self.pools.values()) + self.combos:
                self.dist.broadcast_(pool.codes)
            if self.prior_codes is not None:
                self.dist.broadcast_(self.prior_codes)
            for t in self.tokens.values():
                self.dist.broadcast_(t.data)
            self.dist.check_same("base models", self.base_fp,
                                 "every process must load the same model (same name or file, same seed)")  # fmt: skip

    def _prepare(self) -> None:
        cfg, host = self.cfg, self.host
        self.pools = {}
        for i, (ident, ref) in enumerate(self.refs.items()):
            self.report("encoding", i, len(self.refs))
            self.pools[ident] = _Pool(
                [ident], host.encode_reference(ref, cfg.segment_seconds, cfg.use_cache, progress=cfg.verbose)
            )
        self.report("encoding", len(self.refs), len(self.refs))
        self.base_fp = host.fingerprint()
        self.combos: list[_Pool] = []
        if len(self.refs) > 1:
            self.combos.append(_Pool(list(self.refs), host.encode_mix(list(self.refs.values()), cfg.segment_seconds,
                                                                       self.g)))  # fmt: skip
        # Prior preservation: what the base model does for the prompts without the identifier.
        self.prior_codes, self.prior_texts = None, []
        if cfg.prior:
            t_prior = time.perf_counter()
            seg_frames = next(iter(self.pools.values())).codes.shape[-1]
            codes, self.prior_texts = _prior_pool(host, cfg.prior_prompts, cfg.prior_clips, cfg.segment_seconds,
                                                  cfg.seed)  # fmt: skip
            self.prior_codes = codes[..., :seg_frames]
            logger.info("prior preservation: %d base-model clips for %s in %.1f s", cfg.prior_clips,
                        cfg.prior_prompts, time.perf_counter() - t_prior)  # fmt: skip
        # Identifier tokens.
        bank = host.identifier_bank()
        self.tokens: dict[str, torch.nn.Parameter] = {}
        for ident in self.refs:
            t = torch.nn.Parameter(_init_tokens(host, cfg.init_text, cfg.n_tokens, self.g).to(self.dev))
            self.tokens[ident] = t
            bank.add(ident, t)
        self.lm.eval()  # deterministic: no CFG / attribute dropout (they only act when conditions are passed raw)
        for p in self.lm.parameters():
            p.requires_grad_(False)

    # ---- phase 1: sensitivity (eval mode, one pass per concept); phase 2: selection (global top-k) --------------
    def select(self) -> None:
        from tqdm.auto import tqdm

        from .sensitivity import SensitivityAccumulator

        cfg = self.cfg
        t0 = time.perf_counter()
        self.pivots: dict[str, PivotSet] = {}
        self.scope_entries = 0
        n_sens = cfg.sensitivity_batches * len(self.refs) if self.scope is not None else 0
        done = 0
        for ident in self.refs:
            if self.scope is None:
                self.pivots[ident] = _on_layout(self.names, self.params, {}, self.dev)
                continue
            with SensitivityAccumulator(self.lm, self.scope, mode=cfg.criterion) as acc:
                rg = _row_grads(self.host, [(e.name, [e.rows], acc.row_sink(e.name)) for e in acc.entries],
                                cfg.row_grads)  # fmt: skip
                bar = tqdm(range(cfg.sensitivity_batches), desc=f"sensitivity {ident}", disable=not cfg.verbose,
                           leave=False)  # fmt: skip
                with self.guard(f"scoring {ident}'s sensitivity"), rg, _training(self.host, rg):
                    for i in bar:
                        if done == 0:
                            self.report("sensitivity", 0, n_sens)
                        # Every process draws every batch (the random stream stays the one-process stream) and
                        # scores its own: batch i on process i mod N; the scores are summed below.
                        codes, prompts = _make_batch(self.pools[ident], cfg.templates, cfg.batch_size, self.g)
                        done += 1
                        if self.dist is not None and not self.dist.mine(i):
                            continue
                        with rg.forward():
                            loss = self.loss(codes, prompts)
                        with rg.backward():
                            loss.backward()
                        bar.set_postfix(loss=f"{loss.item():.3f}")
                        self.report("sensitivity", done, n_sens, float(loss.item()))
                if self.dist is not None:
                    acc.all_reduce(self.dist.group)
                with self.guard("selecting pivots"):
                    self.report("selection", 0, 1)
                    if acc.steps == 0:
                        raise TuneError("sensitivity_batches=0: at least one batch is needed to choose pivots")
                    if self.strategy is not None and self.strategy.select is not None:
                        sel = self.strategy.select(self, acc)
                    else:
                        sel = acc.pivots(ratio=None if cfg.count is not None else cfg.ratio, count=cfg.count)
            for t in self.tokens.values():
                t.grad = None
            self.pivots[ident] = _on_layout(self.names, self.params, dict(iter(sel)), self.dev)
            if self.dist is not None:
                from .distributed import pivot_digest

                self.dist.check_same(f"pivots for {ident}", pivot_digest(self.pivots[ident]),
                                     "report it: summed scores should select the same pivots everywhere")  # fmt: skip
            logger.info("%s: %d pivots of %d entries in scope", ident, sel.count, acc.numel)
            self.scope_entries = acc.numel
        self.report("selection", 1, 1)
        self.sens_seconds = time.perf_counter() - t0

    # ---- phase 3: training -------------------------------------------------------------------------------------
    def train(self) -> TuneResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        make = self.strategy.trainer if self.strategy is not None else None
        with self.guard("building the optimizer"):
            trainer = (make(self) if make is not None else None) or _PivotTrainer(self)
        self.trainer = trainer
        ctx = self.dist
        share = 1.0
        if ctx is not None:
            mine = ctx.shard(cfg.batch_size)  # this process's segments of every step's batch
            share = (mine.stop - mine.start) / cfg.batch_size
        rg = trainer.rg
        token_list = list(self.tokens.values())
        token_opt = torch.optim.AdamW(token_list, lr=cfg.token_lr, weight_decay=0.0, foreach=False)

        pools, combos = self.pools, self.combos
        all_pools = list(pools.values()) + combos
        losses: list[float] = []
        prior_losses: list[float] = []
        t1 = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="tune", disable=not cfg.verbose, dynamic_ncols=True)
        routing = contextlib.ExitStack()
        try:
            routing.enter_context(_training(self.host, rg, activation_checkpointing=cfg.activation_checkpointing))
            self.report("training", 0, cfg.steps)
            for step in bar:
                # Single-concept batches in turn, and a combination batch every 4th step when several train together.
                if combos and step % 4 == 3:
                    pool = combos[(step // 4) % len(combos)]
                else:
                    pool = all_pools[step % len(pools)]
                codes, prompts = _make_batch(pool, COMBO_TEMPLATES if pool in combos else cfg.templates,
                                             cfg.batch_size, self.g)  # fmt: skip
                pbatch = (_prior_batch(self.prior_codes, self.prior_texts, cfg.batch_size, self.g)
                          if self.prior_codes is not None else None)  # fmt: skip
                if ctx is not None:  # the same global batch as one process; each process runs its share
                    codes, prompts = codes[mine], prompts[mine]
                    pbatch = None if pbatch is None else (pbatch[0][mine], pbatch[1][mine])
                failed: BaseException | None = None
                ploss = None
                try:
                    with rg.forward():
                        loss = self.loss(codes, prompts)
                    if not torch.isfinite(loss):
                        raise RuntimeError(
                            f"loss became {loss.item()} at step {step}: lower lr (now {cfg.lr}) or token_lr"
                        )
                    with rg.backward():
                        (loss * share if ctx is not None else loss).backward()
                    if pbatch is not None:
                        # Prior preservation (DreamBooth's): the same step also fits the base model's own samples
                        # for the prompts without the identifier, so what those prompts produce stays put. A second
                        # backward into the same gradients (SparseAdamW's gathered buffers and the row sinks
                        # accumulate).
                        with rg.forward():
                            ploss = self.loss(*pbatch)
                        if not torch.isfinite(ploss):
                            raise RuntimeError(
                                f"prior loss became {ploss.item()} at step {step}: lower lr (now {cfg.lr})"
                            )
                        with rg.backward():
                            (cfg.prior * share * ploss).backward()
                except BaseException as e:
                    if ctx is None:
                        raise
                    failed = e
                if ctx is not None:
                    # One all-reduce: the pivot gradients, the tokens' gradients, the loss and the failure flags.
                    loss, ploss = self._exchange(trainer, token_list, loss if failed is None else None,
                                                 ploss if failed is None else None, share, failed, step)  # fmt: skip
                if ploss is not None:
                    prior_losses.append(float(ploss.item()))
                # Gradient clipping, per kind of trained tensor: LM pivots (their gathered gradients only), dense LM
                # tensors, and the identifier tokens (whose gradients live on another scale).
                if cfg.max_norm:
                    trainer.clip(cfg.max_norm)
                    torch.nn.utils.clip_grad_norm_(token_list, cfg.max_norm)
                trainer.step()
                token_opt.step()
                token_opt.zero_grad(set_to_none=True)
                losses.append(float(loss.item()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if cfg.callback is not None:
                    cfg.callback(step, losses[-1])
                self.report("training", step + 1, cfg.steps, losses[-1])
            if ctx is not None:
                ctx.checkpoint("finishing the last step")
        finally:
            routing.close()
            trainer.close()
            for p in self.lm.parameters():
                p.requires_grad_(False)
                p.grad = None
        train_seconds = time.perf_counter() - t1
        bar.close()
        self.report("done", 1, 1, losses[-1] if losses else None)
        bank = self.host.identifier_bank()
        out_tokens = {ident: t.detach().float().cpu().clone() for ident, t in self.tokens.items()}
        for ident, t in out_tokens.items():
            bank.add(ident, t.to(self.dev))
        if cfg.verbose and cfg.steps:
            logger.info("tuned %d steps in %.1f s (%.2f steps/s), loss %.3f -> %.3f", cfg.steps, train_seconds,
                        cfg.steps / max(train_seconds, 1e-9), losses[0], losses[-1])  # fmt: skip
        selects = self.scope is not None  # ratio / count only where a preset selects pivots (tokens, full: none)
        return TuneResult(
            model=self.host.model, identifiers=list(self.refs), pivots=self.pivots, trained=trainer.trained,
            dense_rows=trainer.dense_rows, tokens=out_tokens, losses=losses, sensitivity_seconds=self.sens_seconds,
            train_seconds=train_seconds, base_fingerprint=self.base_fp,
            settings=dict(
                preset=cfg.preset, ratio=cfg.ratio if selects else None, count=cfg.count if selects else None,
                steps=cfg.steps, lr=cfg.lr, token_lr=cfg.token_lr, batch_size=cfg.batch_size,
                sensitivity_batches=cfg.sensitivity_batches, criterion=cfg.criterion, n_tokens=cfg.n_tokens,
                templates=list(cfg.templates), segment_seconds=cfg.segment_seconds, max_norm=cfg.max_norm,
                weight_decay=cfg.weight_decay, seed=cfg.seed, prior=cfg.prior, prior_prompts=list(cfg.prior_prompts),
                prior_clips=cfg.prior_clips if cfg.prior else 0,
                model=cfg.model if isinstance(cfg.model, str) else getattr(cfg.model, "name", "object"),
                host=self.host.library,  # the model library the concept was tuned through
                **({"strategy": self.strategy.name} if self.strategy is not None else {}),
            ),
            base_snapshot=trainer.base_snapshot, prior_losses=prior_losses, scope_entries=self.scope_entries,
            lm_entries=sum(self.params[n].numel() for n in self.host.trainable_names()),
            world_size=ctx.world if ctx is not None else 1,
            comm_bytes_per_step=ctx.step_bytes if ctx is not None else 0,
            comm_seconds=ctx.comm_seconds if ctx is not None else 0.0,
        )  # fmt: skip

    def _exchange(self, trainer: Trainer, token_list: list, loss, ploss, share: float, failed, step: int):
        """The step's all-reduce (every process enters it, a failed one too, with its flag raised): returns the
        global loss and prior loss; raises this process's error, or DistributedError when another one failed."""
        from .distributed import _agreed

        ctx, dev = self.dist, self.dev
        if failed is None and ctx.pending is not None:
            failed, ctx.pending = ctx.pending, None
        grads = [t.grad.float() if t.grad is not None else torch.zeros(t.shape, device=dev) for t in token_list]
        scalars = torch.zeros(2, dtype=torch.float32, device=dev)
        if failed is None:
            scalars[0] = loss.detach().float() * share
            if ploss is not None:
                scalars[1] = ploss.detach().float() * share
        flags = ctx.flags(failed is not None, dev)
        out = trainer.reduce(grads + [scalars, flags])
        ctx.record_step(trainer.comm_bytes, trainer.comm_seconds)
        if failed is not None:
            raise _agreed(failed)
        ctx.raise_if_failed(out[-1], f"training step {step}")
        for t, g in zip(token_list, out[: len(token_list)]):
            t.grad = g.to(t.dtype)
        sc = out[-2].tolist()
        return torch.tensor(sc[0]), (torch.tensor(sc[1]) if ploss is not None else None)


class Trainer:
    """What phase 3 trains besides the identifier tokens, and how (the tune loop is the same for every trainer):
    `rg` (the RowGrads the loop's forward / backward run under), `clip(max_norm)`, `step()` (the optimizer step and
    zeroing), `close()` (always called, after the last step or on an error) and, for the result, `trained` (every LM
    entry the run changes, a PivotSet), `dense_rows` and `base_snapshot` (taken before the first step)."""

    rg: Any
    trained: PivotSet
    dense_rows: dict[str, tuple[int, int]]
    base_snapshot: Any

    def clip(self, max_norm: float) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    comm_bytes: int = 0  # the last `reduce`'s all-reduce: its bytes and seconds
    comm_seconds: float = 0.0

    def reduce(self, extra: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several processes: sum this step's gradients of what it trains and `extra` over the processes in one
        all-reduce; returns the summed `extra`. A trainer that cannot runs in one process only."""
        raise TuneError(f"{type(self).__name__} trains in one process only; run it without torch.distributed")


class _PivotTrainer(Trainer):
    """The recipes' trainer: SparseAdamW over the union of the pivots and the dense rows (gathered in backward,
    row-scoped gradients where they pay), or torch AdamW over every LM weight (`full`)."""

    def __init__(self, run: _Run) -> None:
        from .optim import SparseAdamW, freeze_unpivoted
        from .rowgrad import RowGrads

        cfg, recipe, lm, scope, names, params, dev = (run.cfg, run.recipe, run.lm, run.scope, run.names, run.params,
                                                      run.dev)  # fmt: skip
        dense_entries = scope.resolve_dense(lm) if scope is not None else []
        dense_rows = {e.name: e.rows for e in dense_entries}
        trained = _merge(list(run.pivots.values()))
        if dense_entries:
            trained = trained | _on_layout(names, params, dict(iter(scope.dense_pivots(lm))), dev)
        dense_names = run.host.trainable_names() if recipe.dense_all else []
        self.dense_params = [params[n] for n in dense_names]
        if recipe.dense_all:
            dense_rows = {n: (0, params[n].shape[0] if params[n].dim() else 1) for n in dense_names}
            trained = _on_layout(names, params, {n: torch.arange(params[n].numel(), device=dev) for n in dense_names},
                                 dev)  # fmt: skip
        self.trained, self.dense_rows = trained, dense_rows
        self.base_snapshot = _snapshot(lm, trained, dense_rows, recipe.dense_all)
        self.freeze = freeze_unpivoted(lm, trained) if not self.dense_params else None
        for p in self.dense_params:
            p.requires_grad_(True)
        self.dist = run.dist
        self.sparse_opt = (
            SparseAdamW(
                lm,
                trained,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                gather_in_backward=True,
                nonfinite="raise",
                process_group=run.dist.group if run.dist is not None else None,
                grad_reduce="sum",
            )
            if trained.count and not self.dense_params
            else None
        )
        self.dense_opt = (
            torch.optim.AdamW(self.dense_params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
            if self.dense_params
            else None
        )
        self.rg = RowGrads()
        if self.sparse_opt is not None:
            self.rg = _row_grads(
                run.host,
                [(n, [_pivot_rows(idx, params[n])], self.sparse_opt.row_sink(params[n])) for n, idx in trained
                 if idx.numel()],
                cfg.row_grads,
            )  # fmt: skip
        self.rg.install()

    def reduce(self, extra: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.sparse_opt is not None:  # the pivots' gathered gradients + extra: one buffer (SparseAdamW's)
            out = self.sparse_opt.reduce_gradients(extra)
            self.comm_bytes, self.comm_seconds = self.sparse_opt.comm_bytes, self.sparse_opt.comm_seconds
            return out
        # `full` (every weight's gradient: the recipe's nature) or `tokens` (nothing but extra).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense_params]
        out = self.dist.all_reduce_packed(grads + list(extra))
        for p, g in zip(self.dense_params, out):
            p.grad = g.to(p.dtype)
        self.comm_bytes, self.comm_seconds = self.dist.last_bytes, self.dist.last_seconds
        return out[len(grads) :]

    def clip(self, max_norm: float) -> None:
        if self.sparse_opt is not None:
            self.sparse_opt.clip_grad_norm_(max_norm)
        if self.dense_params:
            torch.nn.utils.clip_grad_norm_(self.dense_params, max_norm)

    def step(self) -> None:
        for opt in (self.sparse_opt, self.dense_opt):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.rg.remove()
        if self.sparse_opt is not None:
            self.sparse_opt.remove_hooks()
        if self.freeze is not None:
            self.freeze.restore()


@dataclass(frozen=True)
class Strategy:
    """Where a run departs from its recipe (the evaluation's peer arms, `ppt_fast.eval.peers`): `select(run, acc)`
    returns the pivots from a finished sensitivity pass (`acc`, a SensitivityAccumulator) instead of the global
    top-k; `trainer(run)` returns the `Trainer` of phase 3 (None: the recipe's, SparseAdamW over the pivots). The
    name is recorded in the result's settings (`strategy`)."""

    name: str
    select: Callable[[_Run, Any], PivotSet] | None = None
    trainer: Callable[[_Run], Trainer | None] | None = None


def _checked(reference: Any, config: TuneConfig | None, settings: dict) -> tuple[TuneConfig, dict, Any]:
    """The run's settings resolved and checked (TuneError), its references by identifier, and its recipe."""
    unknown = sorted(set(settings) - {f.name for f in fields(TuneConfig)})
    if unknown:
        raise TuneError(f"unknown tune setting(s) {', '.join(unknown)}; the settings are TuneConfig's fields")
    given = replace(config or TuneConfig(), **settings)
    refs: dict[str, Any] = dict(reference) if isinstance(reference, Mapping) else {given.identifier: reference}
    if given.ratio is not None and given.count is not None:
        raise TuneError("give ratio= or count=, not both (count=None to use the ratio)")
    cfg = given.resolved()
    recipe = _check_inputs(refs, cfg.templates, cfg.preset, cfg.ratio, cfg.count, cfg.n_tokens)
    _check_settings(steps=cfg.steps, batch_size=cfg.batch_size, sensitivity_batches=cfg.sensitivity_batches,
                    prior_clips=cfg.prior_clips, n_tokens=cfg.n_tokens, seed=cfg.seed, lr=cfg.lr,
                    token_lr=cfg.token_lr, segment_seconds=cfg.segment_seconds, max_norm=cfg.max_norm,
                    weight_decay=cfg.weight_decay, init_text=cfg.init_text, criterion=cfg.criterion)  # fmt: skip
    prior_prompts = _check_prior(cfg.prior, cfg.prior_prompts, cfg.prior_clips, cfg.templates, list(refs))
    if not recipe.trains_weights:  # nothing the prompts without the identifier read is trained: nothing to preserve
        cfg = replace(cfg, prior=0.0)
        prior_prompts = []
    return replace(cfg, prior_prompts=prior_prompts), refs, recipe


def _settings_digest(cfg: TuneConfig, refs: dict) -> str:
    """What every process of a run must agree on: the settings that shape the result (not verbose, device or the
    callbacks) and the references (paths as given, audio tensors by content)."""
    import hashlib

    h = hashlib.sha256()
    skip = {"verbose", "device", "callback", "progress", "use_cache"}
    for f in fields(TuneConfig):
        if f.name not in skip:
            v = getattr(cfg, f.name)
            h.update(f"{f.name}={v if isinstance(v, (str, int, float, bool, tuple, list, type(None))) else type(v)};"
                     .encode())  # fmt: skip
    for ident, ref in refs.items():
        h.update(f"{ident}:".encode())
        if isinstance(ref, (str, os.PathLike)):
            h.update(os.fspath(ref).encode())
        elif isinstance(ref, (tuple, list)) and ref and isinstance(ref[0], torch.Tensor):
            h.update(ref[0].detach().cpu().contiguous().numpy().tobytes() + repr(ref[1:]).encode())
    return h.hexdigest()


def _check_dist(cfg: TuneConfig, strategy: Strategy | None, ctx) -> None:
    """The checks a run on several processes adds (TuneError; every process makes them alike)."""
    if strategy is not None:
        raise TuneError(f"strategy {strategy.name!r} (an evaluation arm) runs in one process; run it without "
                        "torch.distributed")  # fmt: skip
    if cfg.batch_size < ctx.world:
        raise TuneError(
            f"batch_size={cfg.batch_size} is smaller than the {ctx.world} processes: each process needs at least "
            f"one segment of every step's batch; give batch_size >= {ctx.world} or run fewer processes"
        )
    if cfg.sensitivity_batches < ctx.world:
        raise TuneError(
            f"sensitivity_batches={cfg.sensitivity_batches} is smaller than the {ctx.world} processes: each process "
            f"scores whole batches; give sensitivity_batches >= {ctx.world}"
        )


def _dist_device(device):
    """Where this process tunes: the given device, else its own GPU (LOCAL_RANK) when there are GPUs, else CPU."""
    if device is not None or not torch.cuda.is_available():
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


# row_grads=None (auto) turns row-scoped gradients on when the weights they serve hold at least this many entries.
# Below it the Python dispatch of the torch-function mode (a microsecond or two per op) costs more than the matmul
# work saved: tiny (1.6 M entries) +14 % per step with it, musicgen-small (151 M) -15 % (benchmarks/tune_probe.py).
ROW_GRADS_AUTO_MIN = 8_000_000


def _row_grads(host: Host, targets, enable: bool | None = True):
    """A RowGrads over the eligible ones of ``targets`` [(name, rows, sink)]; the others keep whole gradients.
    ``enable=False``: an empty RowGrads; ``None``: only when the eligible weights hold >= ROW_GRADS_AUTO_MIN
    entries (else an empty RowGrads)."""
    from .rowgrad import RowGrads

    rg = RowGrads()
    if enable is False:
        return rg
    eligible = host.row_grad_weights()
    chosen = [(name, rows, sink) for name, rows, sink in targets if name in eligible]
    if enable is None and sum(eligible[n].numel() for n, _, _ in chosen) < ROW_GRADS_AUTO_MIN:
        return rg
    for name, rows, sink in chosen:
        rg.add(name, eligible[name], rows, sink)
    return rg


@contextlib.contextmanager
def _training(host: Host, rg, activation_checkpointing: bool = False):
    """The host's training context; a checkpointing method row-scoped gradients cannot run with is a TuneError."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(host.training(rg, activation_checkpointing=activation_checkpointing))
        except ValueError as e:
            raise TuneError(str(e)) from None
        yield


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


def _capture(result: TuneResult) -> list[Any]:
    """One Concept per identifier from a finished run."""
    return [Concept.capture(result, ident) for ident in result.identifiers]


def tune(
    reference: Any,
    *,
    model: Any = "tiny",
    identifier: str = "<v1>",
    preset: str = recipes.DEFAULT,
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
    progress: Callable[[TuneProgress], None] | None = None,
    activation_checkpointing: bool = False,
    row_grads: bool | None = None,
    prior: float | None = None,
    prior_prompts: Sequence[str] | None = None,
    prior_clips: int = 16,
    out: str | os.PathLike | None = None,
):
    """Teach `model` the concept in `reference` under `identifier`; return a Concept (or a list for several).

    Args:
        reference: an audio file (anything soundfile reads; any rate/channels), a `(tensor [C, T], sample_rate)`
            pair, or `{identifier: reference, ...}` for several concepts trained together (returns a list).
        model: `"tiny"` (default, built in code), a `load_model` name/path/id, or an audiocraft MusicGen object
            (tuned in place: its weights carry the concept afterwards; `concept.remove(model)` restores them).
        identifier: the word that names the concept in prompts, e.g. `"<v1>"`.
        preset: the recipe: `ppt` | `dreamstyler` | `full` | `tokens` (`ppt_fast.recipes`).
        ratio / count: pivots as a fraction of the entries in scope, or a fixed number (count wins over ratio);
            ratio None: the model's default (`recipes.MODEL_DEFAULTS`: 0.001 on the trained default `tiny`, 0.01
            elsewhere).
        steps, lr (pivots), token_lr (identifier tokens), batch_size, segment_seconds: None takes the model's
            default (`recipes.MODEL_DEFAULTS`; e.g. 150 steps on the tiny model, 500 otherwise).
        sensitivity_batches: batches of the sensitivity pass; criterion: its score (`grad_sq` | `grad_abs` |
            `taylor` | `sgd_delta`); n_tokens: embeddings per identifier; init_text: what they start from;
            templates: training prompts, each with one `{}` where the identifier goes.
        max_norm: gradient-norm clipping per kind of trained tensor (0: off); weight_decay: on the pivots.
        seed: everything random (token init, batches) derives from it; on CPU a fixed seed gives the same file.
        device: where to tune (default: CUDA when available); use_cache: cache the reference's codes.
        verbose: a tqdm bar per phase (phase, step, loss, steps/s); callback(step, loss) after every step.
        progress: `progress(TuneProgress)` at every phase change (encoding, sensitivity, selection, training, done)
            and after every sensitivity batch and training step, with the loss and the phase's ETA; raising
            `TuneCancelled` from it stops the run cleanly (the model is left as it was, nothing is written).
        activation_checkpointing: recompute activations in backward (lower peak memory, slower steps; the same
            result).
        row_grads: compute only the scored / trained rows of the attention projections' weight gradients
            (`ppt_fast.rowgrad`): True, False = whole gradients, None = on when those weights hold >= 8 M entries
            (every real MusicGen; off for the tiny model, where it costs more than it saves).
        prior, prior_prompts, prior_clips: prior preservation (DreamBooth's): before training the base model samples
            `prior_clips` clips of one segment for `prior_prompts` (default: the templates without the identifier,
            e.g. "a piece of music"), and every step also fits them at weight `prior`, so prompts without the
            identifier stay closer to the base model; None / 0 = off; ignored by preset "tokens".
        out: write the concept file here (for several concepts: a directory; one `concept_file_name(identifier)`,
            e.g. `v1.ppt`, each). Checked before any work (`ppt_fast._io.check_writable`): a path that cannot be
            written (a directory or device as the file, a path under a regular file, a folder where no file can be
            created) or two identifiers that would share a file name raise TuneError before tuning starts.

    Every argument except `reference` and `out` is a field of `TuneConfig` (`tune_model(reference, config)` takes
    one and returns the run's details).
    """
    given = locals()
    settings = {f.name: given[f.name] for f in fields(TuneConfig)}
    if count is not None:
        settings["ratio"] = None  # count wins
    _, concepts = tune_to_files(reference, TuneConfig(**settings), out)
    return concepts if isinstance(reference, Mapping) else concepts[0]


def tune_to_files(reference: Any, config: TuneConfig, out: str | os.PathLike | None) -> tuple[TuneResult, list]:
    """What `tune()` does, returning the run's details too: `out` checked before any work, the run, one Concept per
    identifier, each written to its file (`out`: the file for one reference, the folder for several)."""
    from .distributed import Context

    ctx = Context.current()  # several processes: only process 0 checks and writes `out`; the others wait for it
    writer = ctx is None or ctx.rank == 0
    with contextlib.nullcontext() if ctx is None else ctx.guard("checking out="):
        files = _check_out(out, reference, config.identifier) if writer else {}
    result = tune_model(reference, config)
    concepts = _capture(result)
    if out is not None:
        with contextlib.nullcontext() if ctx is None else ctx.guard("writing the concept file"):
            if writer:
                if isinstance(reference, Mapping):
                    os.makedirs(out, exist_ok=True)
                for ident, c in zip(result.identifiers, concepts):
                    c.save(files[ident])
    return result, concepts


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
    from ._io import UnwritablePathError, check_writable

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


__all__ = [
    "Strategy",
    "Trainer",
    "TuneCancelled",
    "TuneConfig",
    "TuneError",
    "TuneProgress",
    "TuneResult",
    "concept_file_name",
    "default_ratio",
    "tune",
    "tune_model",
]
