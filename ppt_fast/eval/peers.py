"""The peers' arms (`ppt_fast.eval.arms`: `lora`, `lora-matched`, `shira`) trained through `tune()`'s own loop.

Each arm is a `ppt_fast.tuning.Strategy`: the loop, the batches, the identifier tokens, their optimizer and the
clipping are `tune()`'s; what changes is what trains the weights.

- LoRA: PEFT's `get_peft_model(lm, LoraConfig(...))` injects the adapters into the host's LM in place (so the host's
  loss runs through them); torch AdamW trains them at the arm's lr; when training ends the adapter is saved with
  `save_pretrained` (its size is the file a LoRA user keeps) and merged into the base weights
  (`merge_and_unload`), so the tuned model is an ordinary model and the concept is captured from it like any
  other (dense values of the adapted tensors). audiocraft packs Q/K/V into one `in_proj_weight`: PEFT reaches it
  through `target_parameters`; transformers' projections are `nn.Linear`s, reached through `target_modules`.
- SHiRA: the mask is ppt's sensitivity scores with a per-layer budget: every block of the scope (a linear layer in
  transformers' layout: self-attn V, cross-attn K, cross-attn V) keeps its own top entries. Where every block is an
  `nn.Linear` (transformers) PEFT's `ShiraConfig(mask_fn=...)` trains it, and PEFT's sizing rule holds: r (m + n)
  entries per layer, r the integer nearest ppt's count. PEFT's SHiRA wraps only `nn.Linear`, so on audiocraft's
  packed projections the same update (AdamW on the same entries from zero; weight decay 0) runs through
  `SparseAdamW`, with exactly ppt's count; `tests/test_peers.py` checks on transformers that the two give the same
  weights.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import tuning
from ..pivots import PivotSet
from .arms import LORA_RECIPE, MATCH, Arm

#: The modules LoRA's recipe adapts, per model library (regular expressions over `named_modules()` names, matched
#: whole). audiocraft: `out_proj`, `linear1`, `linear2` are `nn.Linear`s; Q/K/V are the attention module's
#: `in_proj_weight` (PEFT `target_parameters`).
LORA_MODULES = {
    "audiocraft": r"transformer\.layers\.\d+\.(self_attn\.out_proj|cross_attention\.out_proj|linear1|linear2)",
    "transformers": r"decoder\.model\.decoder\.layers\.\d+\.((self_attn|encoder_attn)\.(q|k|v|out)_proj|fc1|fc2)",
}
LORA_PARAMETERS = {
    "audiocraft": (r"transformer\.layers\.\d+\.(self_attn|cross_attention)", "in_proj_weight"),
}


class PeerError(ValueError):
    """A peer arm cannot run as asked (PEFT missing, nothing to adapt)."""


def require_peft() -> Any:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise PeerError("the LoRA and SHiRA arms need PEFT: pip install 'ppt_fast[peers]' (peft==0.21.2)") from e
    return peft


@dataclass(frozen=True)
class Target:
    """One tensor a peer adapts: the parameter's name, its owning module's name, the parameter's attribute there,
    and whether the module is an `nn.Linear` whose weight it is (else PEFT reaches it as a target parameter)."""

    name: str
    module: str
    attr: str
    linear: bool


def _targets(lm: torch.nn.Module, names: Sequence[str]) -> list[Target]:
    modules = dict(lm.named_modules())
    out = []
    for n in names:
        mod, _, attr = n.rpartition(".")
        m = modules[mod]
        out.append(Target(n, mod, attr, isinstance(m, torch.nn.Linear) and attr == "weight"))
    return out


def lora_targets(host: Any, arm: Arm) -> list[Target]:
    """The tensors the arm's LoRA adapts: the recipe's (`lora`) or ppt's scope tensors (`lora-matched`)."""
    lm = host.lm
    if arm.peer == "lora-matched":
        return _targets(lm, sorted({e.name for e in host.scope("ppt").resolve(lm)}))
    lib = host.library
    if lib not in LORA_MODULES:
        raise PeerError(f"no LoRA recipe for the {lib} host; the arms know {', '.join(LORA_MODULES)}")
    pat = re.compile(LORA_MODULES[lib])
    names = [f"{n}.weight" for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)]
    if lib in LORA_PARAMETERS:
        mpat, attr = re.compile(LORA_PARAMETERS[lib][0]), LORA_PARAMETERS[lib][1]
        names += [f"{n}.{attr}" for n, m in lm.named_modules() if mpat.fullmatch(n) and hasattr(m, attr)]
    if not names:
        raise PeerError(f"the LoRA recipe matched no module of this {lib} model")
    order = {n: i for i, (n, _) in enumerate(lm.named_parameters())}
    return _targets(lm, sorted(names, key=order.__getitem__))


def rank_cost(lm: torch.nn.Module, targets: Sequence[Target]) -> int:
    """Trainable entries per unit of LoRA rank over `targets`: sum of (rows + columns) of each adapted matrix."""
    params = dict(lm.named_parameters())
    return sum(int(params[t.name].shape[0]) + int(params[t.name][0].numel()) for t in targets)


def scope_entries(host: Any, preset: str = "ppt") -> int:
    """Entries ppt's scope may pick pivots from (what a ratio is a fraction of)."""
    return sum((e.rows[1] - e.rows[0]) * e.param[0].numel() for e in host.scope(preset).resolve(host.lm))


def matched_rank(host: Any, targets: Sequence[Target], count: int) -> int:
    """The LoRA rank whose trainable count is nearest `count` (at least 1)."""
    return max(1, round(count / rank_cost(host.lm, targets)))


def lora_config(targets: Sequence[Target], *, rank: int, alpha: float | None, dropout: float) -> Any:
    """PEFT's LoraConfig over exactly `targets` (full module names, so nothing else can match)."""
    peft = require_peft()
    modules = [t.module for t in targets if t.linear]
    params = sorted({t.attr for t in targets if not t.linear})
    param_modules = [t.module for t in targets if not t.linear]
    kw: dict[str, Any] = {}
    if params:  # PEFT's ParamWrapper (target_parameters) refuses dropout: none anywhere then, one config
        dropout = 0.0
        # target_parameters names a parameter by its module's name + attribute
        kw["target_parameters"] = [f"{m}.{a}" for m in param_modules for a in params]
    return peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                           target_modules=modules or None, bias="none", **kw)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# SHiRA's mask: ppt's scores, a per-layer budget
# ---------------------------------------------------------------------------------------------------------------------
def _blocks(rows: int, cols: int) -> int:
    """Linear layers in a scope entry of `rows` x `cols`: audiocraft's packed K/V rows are two d x d layers."""
    return rows // cols if cols and rows % cols == 0 and rows >= cols else 1


def per_layer_select(per_block: int | None = None):
    """A `Strategy.select`: in every block of the scope (one linear layer of transformers' layout) the top
    `per_block` entries by score; None: ppt's count (`cfg.ratio` / `cfg.count` of the entries in scope) split
    evenly over the blocks."""

    def select(run: Any, acc: Any) -> PivotSet:
        cfg = run.cfg
        blocks = []
        for e in acc.entries:
            s = acc.scores[e.name]
            rows, cols = s.shape[0], (s[0].numel() if s.dim() else 1)
            nb = _blocks(rows, cols)
            blocks += [(e, j, rows // nb, cols) for j in range(nb)]
        total = cfg.count if cfg.count is not None else max(1, round(cfg.ratio * acc.numel))
        b = per_block if per_block is not None else max(1, round(total / len(blocks)))
        parts: dict[str, list[torch.Tensor]] = {}
        for e, j, rows, cols in blocks:
            s = acc.scores[e.name].reshape(-1)[j * rows * cols : (j + 1) * rows * cols].abs()
            if b > s.numel():
                raise PeerError(f"{b} entries per layer is more than the {s.numel()} of {e.name}")
            local = torch.topk(s.float(), b, sorted=False).indices
            parts.setdefault(e.name, []).append(local + (e.rows[0] + j * rows) * cols)
        idx, offsets = [], [0]
        for e in acc.entries:
            i = torch.sort(torch.cat(parts[e.name])).values.to(torch.int32) if e.name in parts else torch.empty(0)
            idx.append(i.to(torch.int32))
            offsets.append(offsets[-1] + i.numel())
        return PivotSet(acc.names, [e.param.shape for e in acc.entries], offsets, torch.cat(idx))

    return select


def shira_rank(host: Any, count: int) -> tuple[int, int]:
    """PEFT's SHiRA sizing over ppt's scope blocks: (r, entries per layer = r (m + n)) with r the integer whose
    total is nearest `count`."""
    blocks = []
    for e in host.scope("ppt").resolve(host.lm):
        rows, cols = e.rows[1] - e.rows[0], e.param[0].numel()
        nb = _blocks(rows, cols)
        blocks += [(rows // nb, cols)] * nb
    m, n = blocks[0]
    r = max(1, round(count / (len(blocks) * (m + n))))
    return r, r * (m + n)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer: a PEFT adapter in the tune loop
# ---------------------------------------------------------------------------------------------------------------------
class PeftTrainer(tuning.Trainer):
    """Trains a PEFT adapter injected into the run's LM (torch AdamW at `lr`); `close()` saves the adapter
    (`adapter_bytes`: the file a PEFT user keeps) and merges it into the base weights."""

    def __init__(self, run: Any, config: Any, lr: float, trained: PivotSet, dense_rows: dict[str, tuple[int, int]],
                 adapter_dir: str | None = None) -> None:  # fmt: skip
        from ..concept import snapshot_base
        from ..rowgrad import RowGrads

        peft = require_peft()
        self.trained, self.dense_rows = trained, dense_rows
        self.base_snapshot = snapshot_base(run.lm, trained, dense_rows)
        self.adapter_dir = adapter_dir
        self.lm = run.lm
        self.names = {n for n, _ in run.lm.named_parameters()}
        self.peft_model = peft.get_peft_model(run.lm, config)  # in place: the host's LM now runs through it
        for name, m in run.lm.named_modules():  # the recipe's LoRA dropout acts in training; tune() runs eval()
            if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in f"{name}.":
                m.train()
        self.params = [p for p in run.lm.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=run.cfg.weight_decay, foreach=False)
        self.state_bytes = 0
        self.adapter_bytes = 0
        self.rg = RowGrads()
        self._closed = False

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state_bytes = sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                               if torch.is_tensor(t) and t.dim())  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            out = self.adapter_dir or tmp
            self.peft_model.save_pretrained(out)
            self.adapter_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        # Back to the base modules, the adapter added into their weights. peft 0.21 unwraps one level per call: a
        # LoRA Linear inside a target_parameters wrapper (audiocraft's out_proj inside its attention module) needs
        # a second pass.
        names = self.names
        for _ in range(3):
            self.peft_model.base_model.merge_and_unload()
            if {n for n, _ in self.lm.named_parameters()} == names:
                break
        else:
            raise PeerError("PEFT's merge_and_unload left adapter layers in the model")
        self.opt = None


@dataclass
class PeerRun:
    """A finished peer arm: the concept (tokens + the merged weight change), what it trained, its adapter file."""

    concept: Any
    result: Any
    trainable: int
    adapter_bytes: int | None  # PEFT's save_pretrained folder; None where PEFT did not train it
    optimizer_state_bytes: int | None
    impl: str
    rank: int | None = None


def _shira_linear(host: Any) -> bool:
    """Whether every tensor of ppt's scope is a whole `nn.Linear` weight (PEFT's SHiRA can wrap it)."""
    modules = dict(host.lm.named_modules())
    return all(isinstance(modules.get(e.name.rpartition(".")[0]), torch.nn.Linear) and e.name.endswith(".weight")
               and e.rows == (0, e.param.shape[0]) for e in host.scope("ppt").resolve(host.lm))  # fmt: skip


class _Peer:
    """One peer arm's strategy for a run; what it did is read back from it afterwards."""

    def __init__(self, arm: Arm, adapter_dir: str | None) -> None:
        self.arm, self.adapter_dir = arm, adapter_dir
        self.trainer: PeftTrainer | None = None
        self.rank: int | None = None
        self.impl = ""
        self.preset = "ppt" if arm.peer == "shira" else "tokens"  # LoRA: no sensitivity pass, no pivots

    def strategy(self) -> tuning.Strategy:
        if self.arm.peer == "shira":
            return tuning.Strategy(self.arm.name, select=self._shira_select, trainer=self._shira_trainer)
        if self.arm.peer in ("lora", "lora-matched"):
            return tuning.Strategy(self.arm.name, trainer=self._lora_trainer)
        raise PeerError(f"arm {self.arm.name!r} is not a peer arm")

    def _lora_trainer(self, run: Any) -> PeftTrainer:
        arm, host = self.arm, run.host
        targets = lora_targets(host, arm)
        self.rank = rank = (arm.rank or LORA_RECIPE["rank"] if arm.peer == "lora" else
                            matched_rank(host, targets, round((arm.match or MATCH) * scope_entries(host))))  # fmt: skip
        config = lora_config(targets, rank=rank, alpha=arm.alpha, dropout=arm.dropout)
        names = [t.name for t in targets]
        lay = tuning._on_layout(run.names, run.params, {n: torch.arange(run.params[n].numel()) for n in names},
                                run.dev)  # fmt: skip
        dense = {n: (0, int(run.params[n].shape[0])) for n in names}
        lr = arm.lr if arm.lr is not None else run.cfg.lr
        self.impl = (f"peft LoraConfig(r={rank}, lora_alpha={config.lora_alpha}, "
                     f"lora_dropout={config.lora_dropout}) on {len(targets)} tensors, torch AdamW lr {lr}")  # fmt: skip
        self.trainer = PeftTrainer(run, config, lr, lay, dense, self.adapter_dir)
        return self.trainer

    def _shira_select(self, run: Any, acc: Any) -> PivotSet:
        count = round((self.arm.match or MATCH) * acc.numel)
        if _shira_linear(run.host):
            self.rank, per_block = shira_rank(run.host, count)
            self.impl = f"peft ShiraConfig(r={self.rank}), mask_fn = ppt's scores, {per_block} entries per layer"
            return per_layer_select(per_block)(run, acc)
        self.impl = (f"SHiRA's update (AdamW from zero on a fixed mask) through SparseAdamW: PEFT's SHiRA wraps only "
                     f"nn.Linear and this {run.host.library} model packs its projections; {count} entries, an even "
                     "budget per layer")  # fmt: skip
        return per_layer_select()(run, acc)

    def _shira_trainer(self, run: Any) -> PeftTrainer | None:
        if self.rank is None:  # not PEFT's (see _shira_select): the recipe's trainer runs the same update
            return None
        peft = require_peft()
        trained = tuning._merge(list(run.pivots.values()))
        by_weight = {id(run.params[n]): idx for n, idx in trained if idx.numel()}
        names = [n for n, idx in trained if idx.numel()]

        def mask_fn(base_layer: torch.nn.Module, r: int, **_: Any) -> torch.Tensor:
            w = base_layer.weight
            mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
            mask[by_weight[id(w)].long().to(w.device)] = 1
            return mask.reshape(w.shape)

        config = peft.ShiraConfig(r=self.rank, target_modules=[n.rpartition(".")[0] for n in names])
        config.mask_fn = mask_fn
        self.trainer = PeftTrainer(run, config, run.cfg.lr, trained, {}, self.adapter_dir)
        return self.trainer


def tune_peer(reference: Any, arm: Arm, *, adapter_dir: str | None = None, **settings: Any) -> PeerRun:
    """Tune the peer `arm` on `reference` through `tune()`'s loop; `settings` are `tune()`'s (model, steps, seed,
    identifier, n_tokens, lr, ...; lr is ppt's, the LoRA arms take their own). Returns the concept captured from the
    merged model, what was trained and the adapter's size (`adapter_dir`: keep the adapter folder there)."""
    from ..concept import Concept

    require_peft()
    peer = _Peer(arm, adapter_dir)
    settings = dict(settings, preset=peer.preset)
    if arm.peer == "shira":
        settings.update(ratio=arm.match or MATCH, count=None)
    result = tuning.tune_model(reference, strategy=peer.strategy(), **settings)
    result.settings.update(preset=arm.name, ratio=arm.match if arm.peer != "lora" else None, peer_rank=peer.rank)
    concept = Concept.capture(result, result.identifiers[0])
    t = peer.trainer
    return PeerRun(concept, result, t.trainable if t is not None else int(result.trained.count),
                   t.adapter_bytes if t is not None else None, t.state_bytes if t is not None else None, peer.impl,
                   peer.rank)  # fmt: skip


__all__ = ["LORA_MODULES", "PeerError", "PeerRun", "PeftTrainer", "lora_config", "lora_targets", "matched_rank",
           "per_layer_select", "shira_rank", "tune_peer"]  # fmt: skip
