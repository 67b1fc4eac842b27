"""SparseAdamW: AdamW on the pivots only (state for the k pivots), and the DenseMaskedAdamW baseline.

`SparseAdamW` is a real `torch.optim.Optimizer`: LR schedulers, `torch.amp.GradScaler`, Hugging Face `Trainer`
(``optimizers=(opt, None)``), DDP and audiocraft's optimizer seam work with it. Per param group it holds fp32
``exp_avg``/``exp_avg_sq`` of shape ``[k_group]`` (and an fp32 master copy of the pivots when any pivoted parameter
is fp16/bf16) and runs one `ppt_fast.sparse_adamw_step` launch per group per step. Every non-pivot entry of every
parameter stays bitwise unchanged; parameters without pivots are ignored.

Names: the PivotSet names tensors; the optimizer must know each parameter's name. It takes them from
- a model (``named_parameters()``), a list of ``(name, param)`` pairs, or param-group dicts whose ``"params"`` are
  ``(name, param)`` pairs (or carry a ``"param_names"`` list, as torch's named-parameter optimizers store them);
- or, for plain unnamed tensors / param groups (what audiocraft's ``get_optimizer(params, cfg)`` hands over),
  ``param_names=``: the model (names are looked up by identity in its ``named_parameters()``) or a mapping
  ``{param: name}``.

Several processes (``process_group=``): each process holds the model, the same pivots and the same optimizer state;
the first `clip_grad_norm_` or `step` after a backward all-reduces the pivot gradients (4 B per pivot, one packed
buffer, `reduce_gradients`), so every process takes the same step. That replaces DDP for a pivot-only run: DDP
would all-reduce every dense gradient, and it cannot see gradients gathered in backward.

Non-finite gradients at the pivots without a GradScaler: by default (``nonfinite="skip"``) the step is skipped for
all groups (nothing is written, the step count does not advance), a warning is logged and ``skipped_steps`` grows;
``nonfinite="raise"`` raises `FloatingPointError`; ``nonfinite="ignore"`` skips the check. The check runs inside
the step's own launch (the op gathers, checks, then updates), and the skip decision stays on the device: on CPU it
is read at once, on a GPU it is read at the start of the next step without a stall, so the warning (and
``skipped_steps``) come one step late there, and the skipped step's count is given back before the next update.
``nonfinite="raise"`` reads the flag at once on every device. With a GradScaler the scaler's ``found_inf`` decides
instead, read the same way. With several param groups every group is checked (one pass each) before any is
updated.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .ops import pivot_grad_norm
from .ops.sparse_adamw_step import _run as _run_sparse_adamw_step
from .ops.sparse_adamw_step import checked_workspace_numel
from .pivots import PivotSet, mark_valid

logger = logging.getLogger(__name__)

_FORMAT = "ppt_fast.SparseAdamW/1"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------------
# Param-group normalisation: every group becomes {"params": [tensor, ...], "param_names": [str, ...], **options}.
# ---------------------------------------------------------------------------------------------------------------------
def _name_lookup(param_names: Any) -> dict[int, str] | None:
    if param_names is None:
        return None
    if isinstance(param_names, torch.nn.Module):
        return {id(p): n for n, p in param_names.named_parameters(remove_duplicate=False)}
    if isinstance(param_names, Mapping):
        out = {}
        for k, v in param_names.items():
            if isinstance(k, torch.Tensor):
                out[id(k)] = str(v)
            elif isinstance(v, torch.Tensor):  # {name: param} is accepted too
                out[id(v)] = str(k)
            else:
                raise TypeError("param_names must map parameters to names ({param: name}) or be an nn.Module")
        return out
    raise TypeError(f"param_names must be an nn.Module or a {{param: name}} mapping, got {type(param_names).__name__}")


def _is_named_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)


def _named_groups(params: Any, param_names: Any) -> list[dict[str, Any]]:
    lookup = _name_lookup(param_names)
    if isinstance(params, torch.nn.Module):
        named = list(params.named_parameters())
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a model, a list of (name, param) pairs or param groups, not a single tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: give the model, its named_parameters() or param groups")
    raw_groups = items if all(isinstance(x, dict) for x in items) else [{"params": items}]
    groups = []
    for gi, g in enumerate(raw_groups):
        if not isinstance(g, dict):
            raise TypeError("params mixes param-group dicts and other items; give one kind")
        g = dict(g)
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        if ps and all(_is_named_pair(x) for x in ps):
            names = [n for n, _ in ps]
            tensors = [p for _, p in ps]
        else:
            tensors = ps
            for x in tensors:
                if not isinstance(x, torch.Tensor):
                    raise TypeError(
                        f"param group {gi}: expected tensors or (name, tensor) pairs, got {type(x).__name__}"
                    )
            if "param_names" in g:
                names = [str(n) for n in g["param_names"]]
            elif lookup is not None:
                missing = [i for i, p in enumerate(tensors) if id(p) not in lookup]
                if missing:
                    raise ValueError(
                        f"param group {gi}: {len(missing)} parameter(s) (first: shape "
                        f"{tuple(tensors[missing[0]].shape)}) are not in param_names; pass the model that owns them"
                    )
                names = [lookup[id(p)] for p in tensors]
            else:
                raise ValueError(
                    "the optimizer got unnamed parameters, so it cannot match them to the PivotSet's tensor names; "
                    "pass model.named_parameters() / the model, or param_names=model (or a {param: name} mapping)"
                )
        if len(names) != len(tensors):
            raise ValueError(f"param group {gi}: {len(names)} names for {len(tensors)} params")
        g["params"] = tensors
        g["param_names"] = names
        groups.append(g)
    return groups


class _GroupLayout:
    """The pivoted parameters of one param group and their packed pivots (on the parameters' device)."""

    def __init__(self, params: list[torch.Tensor], names: list[str], counts: list[int], indices: torch.Tensor):
        self.params = params
        self.names = names
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        self.indices = indices
        self.k = self.offsets[-1]
        self.needs_master = any(p.dtype in _LOW_PRECISION for p in params)
        self.numel = sum(p.numel() for p in params)  # N: entries of the pivoted parameters
        # Slices of a checked PivotSet, matched to parameters of the same shapes: valid by construction, so the
        # step op need not check them again.
        mark_valid(indices, self.offsets, [p.numel() for p in params])


def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr={lr!r} must be a finite number >= 0")


def _check_hparams(betas: tuple[float, float], eps: float, weight_decay: float, where: str) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas={betas!r} must be two numbers in [0, 1)")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(
            f"{where}: eps={eps!r} must be a finite number > 0: it keeps m / (sqrt(v) + eps) finite at pivots whose "
            "gradient has been zero (eps=0 makes them NaN); the usual value is 1e-8"
        )
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: weight_decay={weight_decay!r} must be a finite number >= 0")


def _split_pivots(
    groups: list[dict[str, Any]], pivots: PivotSet, who: str, require_grad: bool = True
) -> list[_GroupLayout]:
    """Match the PivotSet's tensors to the groups' named parameters; errors name what does not fit."""
    if not isinstance(pivots, PivotSet):
        raise TypeError(f"{who}: pivots must be a PivotSet, got {type(pivots).__name__}")
    where: dict[str, tuple[int, torch.Tensor]] = {}
    for gi, g in enumerate(groups):
        for n, p in zip(g["param_names"], g["params"]):
            if n in where and where[n][1] is not p:
                raise ValueError(f"{who}: two different parameters are both named {n!r}")
            where[n] = (gi, p)
    missing = [n for n in pivots.names if n not in where]
    if missing:
        raise ValueError(
            f"{who}: the PivotSet names {len(missing)} tensor(s) the optimizer was not given, e.g. {missing[:3]}: "
            "it was built for other tensors (another model, or names with/without a 'module.' prefix); "
            "select pivots on this model or pass its parameters"
        )
    counts = pivots.counts()
    per_group: list[list[tuple[int, str, torch.Tensor]]] = [[] for _ in groups]
    for ti, (name, shape) in enumerate(zip(pivots.names, pivots.shapes)):
        gi, p = where[name]
        if tuple(p.shape) != tuple(shape):
            raise ValueError(
                f"{who}: tensor {name!r} has shape {tuple(p.shape)} but the PivotSet was built for {tuple(shape)}; "
                "the PivotSet belongs to another model"
            )
        if counts[ti] == 0:
            continue
        if require_grad and not p.requires_grad:
            raise ValueError(
                f"{who}: tensor {name!r} holds {counts[ti]} pivots but requires_grad is False, so it would never get "
                "a gradient; call ppt_fast.freeze_unpivoted(model, pivots) (it turns pivoted tensors on) or "
                "p.requires_grad_(True) before building the optimizer"
            )
        per_group[gi].append((ti, name, p))
    layouts = []
    for gi, items in enumerate(per_group):
        params = [p for _, _, p in items]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"{who}: param group {gi} has pivoted parameters on several devices {sorted(map(str, devices))}"
            )
        device = params[0].device if params else pivots.device
        parts = [pivots.indices_of(ti) for ti, _, _ in items]
        idx = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.int32, device=device)
        layouts.append(_GroupLayout(params, [n for _, n, _ in items], [counts[ti] for ti, _, _ in items], idx))
    return layouts


# ---------------------------------------------------------------------------------------------------------------------
# SparseAdamW
# ---------------------------------------------------------------------------------------------------------------------
class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the pivots of a PivotSet; state only for the pivots.

    Args:
        params: a model, an iterable of ``(name, param)`` pairs, or param-group dicts (``"params"`` as
            ``(name, param)`` pairs, or plain tensors plus ``"param_names"`` or the ``param_names=`` argument).
            Groups may set their own ``lr``, ``betas``, ``eps``, ``weight_decay``.
        pivots: the PivotSet (names and shapes must match the named parameters; every parameter with pivots must
            require grad). Parameters the PivotSet does not name, or names with no pivots, are left alone.
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay, applied to the pivots only).
        param_names: names for unnamed parameters: the model that owns them or a ``{param: name}`` mapping.
        gather_in_backward: register post-accumulate-grad hooks that add each pivoted parameter's gradient at its
            pivots into a flat fp32 ``[k]`` buffer and free the dense gradient at once; `step` then uses the
            buffer. Gradients of pivoted parameters are then never visible in ``p.grad``, so it does not combine
            with ``torch.amp.GradScaler`` (which inspects ``p.grad``; use bf16 instead) nor with DDP (the hooks run
            before DDP's all-reduce). Call `remove_hooks()` to detach them.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``: what a NaN/inf pivot gradient does when no
            GradScaler is in use (see the module docstring).
        keep_workspace: keep the CPU check's scratch between steps (`workspace_bytes`); False allocates it every
            step instead (less memory held, slower steps).
        process_group: data parallelism over a ``torch.distributed`` group (``dist.group.WORLD`` or a subgroup;
            None: one process). Every process holds the same pivots; `reduce_gradients` (called by the first
            `clip_grad_norm_` or `step` after a backward) all-reduces **only the pivot gradients**, packed into one
            fp32 buffer: one collective of 4 B per pivot per step, no dense gradient and no index on the wire. Use
            it instead of DDP (do not wrap the model in DistributedDataParallel); it works with
            ``gather_in_backward`` and `ppt_fast.rowgrad.RowGrads`. Not with a GradScaler (its inf check is local).
        grad_reduce: ``"mean"`` (default, DDP's convention: each process's loss is the mean over its own batch) or
            ``"sum"`` (each process already scaled its loss by its share of the global batch).

    State per group (``[k_g]`` fp32 each): ``exp_avg``, ``exp_avg_sq``, and ``master`` when any pivoted parameter of
    the group is fp16/bf16 (initialised from the parameters at the first step).
    """

    _step_supports_amp_scaling = True
    # Tests set this to run the GPU's deferred reading of the skip flag on CPU tensors.
    _defer_on_cpu = False

    def __init__(
        self,
        params: Any,
        pivots: PivotSet,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        param_names: Any = None,
        gather_in_backward: bool = False,
        nonfinite: str = "skip",
        keep_workspace: bool = True,
        process_group: Any = None,
        grad_reduce: str = "mean",
    ) -> None:
        _check_lr(lr, "SparseAdamW")
        if grad_reduce not in ("mean", "sum"):
            raise ValueError(f"grad_reduce={grad_reduce!r} must be 'mean' or 'sum'")
        _check_hparams(tuple(betas), eps, weight_decay, "SparseAdamW")
        if nonfinite not in ("skip", "raise", "ignore"):
            raise ValueError(f"nonfinite={nonfinite!r} must be 'skip', 'raise' or 'ignore'")
        groups = _named_groups(params, param_names)
        for gi, g in enumerate(groups):
            if "lr" in g:
                _check_lr(g["lr"], f"SparseAdamW param group {gi}")
            _check_hparams(
                tuple(g.get("betas", betas)), g.get("eps", eps), g.get("weight_decay", weight_decay), f"group {gi}"
            )
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.pivots = pivots
        self._layouts = _split_pivots(self.param_groups, pivots, "SparseAdamW")
        self.nonfinite = nonfinite
        self._skipped = 0
        # The last step's skip flag as (host copy, its CUDA event or None, groups stepped, from a GradScaler), read at
        # the next step (GPU: no host sync).
        self._pending: tuple | None = None
        self._clip_coef: torch.Tensor | None = None  # set by clip_grad_norm_, applied inside the next step launch
        self.keep_workspace = bool(keep_workspace)
        self._workspaces: dict[int, torch.Tensor] = {}
        self._gstate: list[dict[str, Any]] = []
        for lay in self._layouts:
            dev = lay.indices.device
            st: dict[str, Any] = {
                "step": 0,
                "exp_avg": torch.zeros(lay.k, dtype=torch.float32, device=dev),
                "exp_avg_sq": torch.zeros(lay.k, dtype=torch.float32, device=dev),
                "master": torch.zeros(lay.k, dtype=torch.float32, device=dev) if lay.needs_master else None,
                "master_initialized": False,
            }
            self._gstate.append(st)
        self.process_group = process_group
        self.grad_reduce = grad_reduce
        self._reduced: list[tuple[str, Any] | None] | None = None  # this step's all-reduced inputs (process_group)
        self.comm_bytes = 0  # bytes the last reduce_gradients all-reduced (its buffer)
        self.comm_seconds = 0.0  # and how long that collective took
        self.gather_in_backward = bool(gather_in_backward)
        self._buffers: list[torch.Tensor] = []
        self._gathered: list[bool] = []
        self._hook_handles: list[Any] = []
        if self.gather_in_backward:
            self._install_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_layouts", None) is not None:
            raise NotImplementedError(
                "SparseAdamW.add_param_group: the pivot layout is fixed at construction; build a new SparseAdamW "
                "with all groups and a PivotSet that covers them"
            )
        super().add_param_group(param_group)

    # ---- gather in backward ------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for gi, lay in enumerate(self._layouts):
            buf = torch.zeros(lay.k, dtype=torch.float32, device=lay.indices.device)
            self._buffers.append(buf)
            self._gathered.append(False)
            for ti, p in enumerate(lay.params):
                lo, hi = lay.offsets[ti], lay.offsets[ti + 1]
                self._hook_handles.append(p.register_post_accumulate_grad_hook(self._make_hook(gi, lo, hi)))

    def _make_hook(self, gi: int, lo: int, hi: int):
        idx = self._layouts[gi].indices[lo:hi]
        buf = self._buffers[gi][lo:hi]

        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            with torch.no_grad():
                buf.add_(p.grad.reshape(-1).index_select(0, idx).float())
            p.grad = None
            self._gathered[gi] = True

        return hook

    def row_sink(self, param: torch.Tensor):
        """A `ppt_fast.rowgrad.RowGrads` sink for `param` (needs ``gather_in_backward=True``): adds the pivots that
        fall in a block of rows of its gradient to the gathered pivot gradients, as the gather hook does for a
        whole gradient."""
        if not self.gather_in_backward:
            raise RuntimeError(
                "SparseAdamW.row_sink needs gather_in_backward=True (the sink writes the gather buffers)"
            )
        hit = next(
            ((gi, ti) for gi, lay in enumerate(self._layouts) for ti, p in enumerate(lay.params) if p is param), None
        )
        if hit is None:
            raise ValueError("SparseAdamW.row_sink: the parameter has no pivots in this optimizer")
        gi, ti = hit
        lay = self._layouts[gi]
        lo = lay.offsets[ti]
        idx = lay.indices[lo : lay.offsets[ti + 1]]
        buf = self._buffers[gi]
        cols = param[0].numel() if param.dim() > 1 else 1
        spans: dict[tuple[int, int], tuple[int, int, torch.Tensor]] = {}

        def sink(block: torch.Tensor, row0: int, generation: int) -> None:  # noqa: ARG001
            key = (row0, block.shape[0])
            if key not in spans:
                bounds = torch.tensor([row0 * cols, (row0 + block.shape[0]) * cols], dtype=idx.dtype, device=idx.device)
                a, b = (int(v) for v in torch.searchsorted(idx, bounds))
                spans[key] = (lo + a, lo + b, idx[a:b] - row0 * cols)
            s, e, local = spans[key]
            if e > s:
                buf[s:e].add_(block.reshape(-1).index_select(0, local).float())
            self._gathered[gi] = True

        return sink

    def remove_hooks(self) -> None:
        """Detach the gather-in-backward hooks (the optimizer then reads ``p.grad`` again)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        self.gather_in_backward = False

    # ---- gradients at the pivots -------------------------------------------------------------------------------
    def _pivot_grads(self, gi: int) -> torch.Tensor | None:
        """fp32 ``[k_g]`` gradients at the pivots of group gi gathered in Python (only for a group where some pivoted
        parameter got no gradient this step), or None when the group got no gradient."""
        lay = self._layouts[gi]
        grads = [p.grad for p in lay.params]
        if all(g is None for g in grads):
            return None
        parts = []
        for ti, g in enumerate(grads):
            idx = lay.indices[lay.offsets[ti] : lay.offsets[ti + 1]]
            if g is None:  # a parameter the loss did not reach this step: zero gradient at its pivots
                parts.append(torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device))
            else:
                parts.append(g.reshape(-1).index_select(0, idx).float())
        return torch.cat(parts)

    def _group_input(self, gi: int) -> tuple[str, Any] | None:
        """What the op reads for group gi: ("dense", [p.grad, ...]) (the op gathers inside its launch),
        ("pivot", fp32 [k_g]) (the gather-in-backward buffer), or None (no gradient this step)."""
        lay = self._layouts[gi]
        if lay.k == 0:
            return None
        if self._reduced is not None:
            return self._reduced[gi]
        return self._local_input(gi)

    def _local_input(self, gi: int) -> tuple[str, Any] | None:
        """`_group_input` from this process's own gradients."""
        lay = self._layouts[gi]
        if self.gather_in_backward:
            return ("pivot", self._buffers[gi]) if self._gathered[gi] else None
        grads = [p.grad for p in lay.params]
        if all(g is not None for g in grads):
            sparse = next((lay.names[ti] for ti, g in enumerate(grads) if g.is_sparse), None)
            if sparse is not None:
                raise RuntimeError(f"SparseAdamW: parameter {sparse!r} has a sparse gradient; not supported")
            return ("dense", grads)
        pg = self._pivot_grads(gi)
        return None if pg is None else ("pivot", pg)

    # ---- data parallelism ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self, extra: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """All-reduce this step's pivot gradients over `process_group` in one collective (the first `clip_grad_norm_`
        or `step` after a backward calls it; call it yourself to fold other gradients into the same collective).

        The buffer is fp32 ``[k + G + e]``: every group's k_g pivot gradients (zeros where this process got none),
        one has-gradient flag per group (summed: a group any process got gradients for is stepped on every
        process), and the `extra` tensors flattened (e.g. gradients of parameters you train with another optimizer;
        they are reduced like the pivot gradients). Returns the reduced `extra` tensors (new tensors, shaped as
        given). `comm_bytes` / `comm_seconds` hold the collective's size and time."""
        import torch.distributed as dist

        if self.process_group is None:
            raise RuntimeError("SparseAdamW.reduce_gradients needs process_group= (a torch.distributed group)")
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "SparseAdamW(process_group=...) cannot be stepped by a torch.amp.GradScaler: the scaler's inf check "
                "is per process, so processes could disagree on skipping a step; use bf16 autocast (no scaler)"
            )
        n_groups = len(self._layouts)
        dev = next((lay.indices.device for lay in self._layouts), torch.device("cpu"))
        ks = [lay.k for lay in self._layouts]
        n_extra = sum(t.numel() for t in extra)
        total_k = sum(ks)
        flat = torch.zeros(total_k + n_groups + n_extra, dtype=torch.float32, device=dev)
        off = 0
        for gi, k in enumerate(ks):
            inp = self._local_input(gi) if k else None
            if inp is not None:  # dense p.grad: its pivots gathered (the reduced input is then a pivot buffer)
                flat[off : off + k].copy_(inp[1] if inp[0] == "pivot" else self._pivot_grads(gi))
                flat[total_k + gi] = 1.0
            off += k
        pos = total_k + n_groups
        for t in extra:
            flat[pos : pos + t.numel()].copy_(t.reshape(-1))
            pos += t.numel()
        t0 = time.perf_counter()
        dist.all_reduce(flat, group=self.process_group)
        self.comm_seconds = time.perf_counter() - t0
        self.comm_bytes = flat.numel() * flat.element_size()
        if self.grad_reduce == "mean":
            world = dist.get_world_size(self.process_group)
            flat[:total_k].div_(world)
            flat[total_k + n_groups :].div_(world)
        had = flat[total_k : total_k + n_groups].tolist()
        reduced: list[tuple[str, Any] | None] = []
        off = 0
        for gi, k in enumerate(ks):
            reduced.append(("pivot", flat[off : off + k]) if k and had[gi] > 0 else None)
            off += k
        self._reduced = reduced
        out, pos = [], total_k + n_groups
        for t in extra:
            out.append(flat[pos : pos + t.numel()].view(t.shape))
            pos += t.numel()
        return out

    def _ensure_reduced(self) -> None:
        if self.process_group is not None and self._reduced is None:
            self.reduce_gradients()

    def _norm(self, gi: int, inp: tuple[str, Any], norm_type: float) -> torch.Tensor:
        lay = self._layouts[gi]
        if inp[0] == "dense":
            return pivot_grad_norm(inp[1], lay.offsets, lay.indices, norm_type=norm_type)
        return pivot_grad_norm(None, lay.offsets, lay.indices, pivot_grads=inp[1], norm_type=norm_type)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the pivot gradients to a total norm of `max_norm`; returns the total norm before clipping.

        The norm is the `norm_type` norm (L2 by default) of **all pivot gradients of all groups gathered into one
        vector**, computed in one fused pass per group (`ppt_fast.ops.pivot_grad_norm`); gradients at non-pivot
        entries do not count. The coefficient ``min(1, max_norm / (norm + 1e-6))`` stays on the device and is applied
        inside the next `step` launch, so there is no host sync and no pass over the dense gradients: ``p.grad``
        itself is left unscaled (`zero_grad` drops a coefficient that no step used). Clipping twice before a step
        composes. Under a GradScaler call ``scaler.unscale_(opt)`` first, as with `torch.nn.utils.clip_grad_norm_`.
        """
        if not isinstance(max_norm, (int, float)) or max_norm < 0 or not math.isfinite(max_norm):
            raise ValueError(f"max_norm={max_norm} must be a finite number >= 0")
        self._ensure_reduced()
        norms, device = [], None
        for gi in range(len(self._layouts)):
            inp = self._group_input(gi)
            if inp is not None:
                norms.append(self._norm(gi, inp, norm_type))
                device = norms[-1].device
        if not norms:
            return torch.zeros(())
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if self._clip_coef is not None:  # already clipped once: this is the norm of the clipped gradients
            total = total * self._clip_coef.to(device).reshape(())
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).reshape(1).float()
        self._clip_coef = coef if self._clip_coef is None else self._clip_coef.to(device) * coef
        return total

    # ---- skipped steps -----------------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (or a GradScaler's inf), all groups together. On a GPU a skip is
        learned one step late (when the next step, or this property, reads the device flag)."""
        self._resolve_pending()
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._pending = None
        self._skipped = int(value)

    def _resolve_pending(self) -> None:
        """Read the skip flag of the last step (a device flag on GPU, copied without a sync when it was launched);
        a skipped step gives its step count back, so bias correction stays exact."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        host, event, groups, from_scaler = pending
        if event is not None:
            event.synchronize()  # long done: a whole forward and backward ran since
        if float(host[0]) == 0.0:
            return
        for gi in groups:
            self._gstate[gi]["step"] -= 1
        self._skipped += 1
        if not from_scaler:
            logger.warning(
                "SparseAdamW: non-finite gradient at the pivots (found on the device after the step was queued, so "
                "the tensors are not named; nonfinite='raise' checks at once and names them); step skipped (%d "
                "skipped so far)",
                self._skipped,
            )

    def _bad_names(self, inputs: list[tuple[str, Any] | None]) -> list[str]:
        bad = []
        for gi, inp in enumerate(inputs):
            if inp is None:
                continue
            lay = self._layouts[gi]
            for ti in range(len(lay.params)):
                lo, hi = lay.offsets[ti], lay.offsets[ti + 1]
                if inp[0] == "dense":
                    g = inp[1][ti].reshape(-1).index_select(0, lay.indices[lo:hi]).float()
                else:
                    g = inp[1][lo:hi].float()
                if self._clip_coef is not None:
                    g = g * self._clip_coef.to(g.device)
                if not bool(torch.isfinite(g).all()):
                    bad.append(lay.names[ti])
        return bad

    # ---- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step on the pivots of every group: one `sparse_adamw_step` launch per group gathers the pivot
        gradients from ``p.grad`` (or the gather buffers), checks them for inf/NaN, applies a pending clipping
        coefficient and updates m, v, the master and θ (a GPU runs the check and the update as two launches)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._resolve_pending()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        scaler_active = grad_scale is not None or found_inf is not None
        if scaler_active and self.gather_in_backward:
            raise RuntimeError(
                "SparseAdamW(gather_in_backward=True) cannot be stepped by a torch.amp.GradScaler: the scaler checks "
                "p.grad, which the gather hooks free; use bf16 autocast (no scaler) or gather_in_backward=False"
            )
        for gi, group in enumerate(self.param_groups):
            _check_lr(group["lr"], f"SparseAdamW param group {gi}")
        self._ensure_reduced()
        inputs = [self._group_input(gi) for gi in range(len(self._layouts))]
        live = [gi for gi, inp in enumerate(inputs) if inp is not None]
        coef = self._clip_coef
        if not live:
            self._clip_coef = None
            self._reduced = None
            return loss
        device = self._layouts[live[0]].indices.device
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):
            found_inf = torch.tensor(float(found_inf))
        if found_inf is not None:
            found_inf = found_inf.reshape(1).float().to(device)
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.reshape(1).float().to(device)
        elif grad_scale is not None:
            grad_scale = torch.tensor([float(grad_scale)], device=device)
        check = found_inf is None and self.nonfinite != "ignore"
        flag = torch.zeros(1, dtype=torch.float32, device=device) if check else None
        skip_in = found_inf
        if check and len(live) > 1:
            # Every group must be checked before any is updated: one inf-norm pass per group raises the shared flag
            # (no host sync), and the update launches read it as their found_inf.
            for gi in live:
                flag += (~torch.isfinite(self._norm(gi, inputs[gi], math.inf))).float().to(device)
            skip_in, flag_out = flag, None
        else:
            flag_out = flag
        for gi in live:
            group, lay, st = self.param_groups[gi], self._layouts[gi], self._gstate[gi]
            if st["master"] is not None and not st["master_initialized"]:
                st["master"].copy_(
                    torch.cat(
                        [
                            p.detach().reshape(-1).index_select(0, lay.indices[lay.offsets[t] : lay.offsets[t + 1]])
                            for t, p in enumerate(lay.params)
                        ]
                    ).float()
                )
                st["master_initialized"] = True
            st["step"] += 1
            beta1, beta2 = group["betas"]
            dev = lay.indices.device
            kind, data = inputs[gi]
            # The op's kernel directly: the layout, dtypes and shapes were checked when the optimizer was built (and
            # autograd keeps p.grad shaped and typed like p), so the functional op's per-tensor Python checks and
            # the custom-op dispatch would only add ~1 ms per step on 300 tensors.
            _run_sparse_adamw_step(
                lay.params,
                [g if g.is_contiguous() else g.contiguous() for g in data] if kind == "dense" else [],
                lay.offsets,
                lay.indices,
                st["exp_avg"],
                st["exp_avg_sq"],
                st["master"],
                data if kind == "pivot" else None,
                None if grad_scale is None else grad_scale.to(dev),
                None if skip_in is None else skip_in.to(dev),
                None if coef is None else coef.to(dev),
                None if flag_out is None else flag_out.to(dev),
                float(group["lr"]),
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
                st["step"],
                workspace=self._workspace(gi, kind == "dense") if flag_out is not None else None,
            )
            torch.autograd.graph.increment_version(lay.params)  # in place behind autograd's back: say so
        skip_flag = flag if check else found_inf
        if skip_flag is not None:
            deferred = skip_flag.device.type != "cpu" or self._defer_on_cpu
            if not deferred or (self.nonfinite == "raise" and check):
                if float(skip_flag.reshape(-1)[0]) != 0.0:
                    names = self._bad_names(inputs) if check else []
                    for gi in live:
                        self._gstate[gi]["step"] -= 1
                    self._clip_coef = None
                    self._clear_gathered()
                    if check:
                        msg = f"non-finite gradient at pivots of {names[:5]}{' ...' if len(names) > 5 else ''}"
                        if self.nonfinite == "raise":
                            raise FloatingPointError(
                                f"SparseAdamW: {msg}; lower the lr, use a GradScaler for fp16, or nonfinite='skip'"
                            )
                        self._skipped += 1
                        logger.warning("SparseAdamW: %s; step skipped (%d skipped so far)", msg, self._skipped)
                    else:
                        self._skipped += 1
                    return loss
            else:
                host, event = skip_flag.reshape(1), None
                if skip_flag.device.type == "cuda":
                    host = torch.empty(1, dtype=torch.float32, pin_memory=True)
                    host.copy_(skip_flag.reshape(1), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                self._pending = (host, event, live, not check)
        self._clip_coef = None
        self._clear_gathered()
        return loss

    def _workspace(self, gi: int, dense: bool) -> torch.Tensor | None:
        """The checked CPU step's scratch for group gi, kept between steps (see `workspace_bytes`)."""
        lay = self._layouts[gi]
        if not self.keep_workspace or lay.indices.device.type != "cpu":
            return None  # GPU scratch comes from torch's caching allocator, which already reuses it
        n = checked_workspace_numel(lay.k, lay.numel, dense)
        ws = self._workspaces.get(gi)
        if ws is None or ws.numel() < n:
            ws = torch.empty(n, dtype=torch.float32)
            self._workspaces[gi] = ws
        return ws

    def workspace_bytes(self) -> int:
        """Bytes of the scratch kept between steps on CPU for the non-finite check (not optimizer state: nothing in
        it outlives a step). 12 B per pivot for pivots sparser than 2.5 % with gradients in p.grad (the backup of
        the speculative pass), else 4 B; 0 with ``keep_workspace=False`` (each step then allocates it fresh, at
        the price of page faults: ~40 % of a step at 4 M pivots) or ``nonfinite="ignore"``."""
        return sum(ws.numel() * ws.element_size() for ws in self._workspaces.values())

    def _clear_gathered(self) -> None:
        self._reduced = None
        for gi, buf in enumerate(self._buffers):
            if self._gathered[gi]:
                buf.zero_()
                self._gathered[gi] = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._clip_coef = None
        self._clear_gathered()

    # ---- memory ------------------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer memory: every state tensor (exp_avg, exp_avg_sq, master) + the packed int32 indices
        (+ the gather buffers when gather_in_backward)."""
        total = 0
        for lay, st in zip(self._layouts, self._gstate):
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if st[key] is not None:
                    total += st[key].numel() * st[key].element_size()
            total += lay.indices.numel() * lay.indices.element_size()
        for buf in self._buffers:
            total += buf.numel() * buf.element_size()
        return total

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-group state (step, exp_avg, exp_avg_sq, master) + the pivot layout it belongs to + the groups'
        hyperparameters (so an LR schedule resumes too). Tensors are references; ``torch.save`` it."""
        groups = []
        base = 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(base, base + len(g["params"])))
            base += len(g["params"])
            groups.append(packed)
        state = {}
        for gi, (lay, st) in enumerate(zip(self._layouts, self._gstate)):
            state[gi] = {
                "step": st["step"],
                "exp_avg": st["exp_avg"],
                "exp_avg_sq": st["exp_avg_sq"],
                "master": st["master"],
                "master_initialized": st["master_initialized"],
                "names": list(lay.names),
                "offsets": list(lay.offsets),
                "indices": lay.indices,
            }
        return {"format": _FORMAT, "state": state, "param_groups": groups, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; the state must belong to the same PivotSet and param groups."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            raise ValueError(
                "SparseAdamW.load_state_dict: this is not a SparseAdamW state dict "
                f"(format {state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict)!r})"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"SparseAdamW.load_state_dict: {len(saved_groups)} param groups saved, the optimizer has "
                f"{len(self.param_groups)}; build it with the same param groups"
            )
        for gi, lay in enumerate(self._layouts):
            s = state_dict["state"][gi]
            same = (
                s["names"] == lay.names
                and list(s["offsets"]) == lay.offsets
                and torch.equal(s["indices"].cpu(), lay.indices.cpu())
            )
            if not same:
                raise ValueError(
                    f"SparseAdamW.load_state_dict: the state of param group {gi} belongs to another PivotSet "
                    f"(saved {len(s['names'])} tensors / {s['offsets'][-1]} pivots, here {len(lay.names)} / {lay.k} "
                    "or different indices); resume with the PivotSet the run was started with (PivotSet.load)"
                )
        for gi, st in enumerate(self._gstate):
            s = state_dict["state"][gi]
            st["step"] = int(s["step"])
            st["exp_avg"].copy_(s["exp_avg"])
            st["exp_avg_sq"].copy_(s["exp_avg_sq"])
            if st["master"] is not None:
                if s["master"] is None:
                    raise ValueError(
                        f"SparseAdamW.load_state_dict: group {gi} needs an fp32 master, the saved has none"
                    )
                st["master"].copy_(s["master"])
            st["master_initialized"] = bool(s["master_initialized"])
        for g, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key not in ("params", "param_names"):
                    g[key] = value
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def __repr__(self) -> str:
        k = sum(lay.k for lay in self._layouts)
        return f"SparseAdamW({len(self.param_groups)} groups, {k} pivots, lr={self.defaults['lr']})"


# ---------------------------------------------------------------------------------------------------------------------
# freeze_unpivoted
# ---------------------------------------------------------------------------------------------------------------------
class FreezeHandle:
    """What `freeze_unpivoted` changed; `restore()` (or leaving the ``with`` block) puts it back."""

    def __init__(self, changed: list[tuple[torch.Tensor, bool]]) -> None:
        self.changed = changed

    def restore(self) -> None:
        for p, flag in self.changed:
            p.requires_grad_(flag)
        self.changed = []

    def __enter__(self) -> FreezeHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def freeze_unpivoted(model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], pivots: PivotSet) -> FreezeHandle:
    """Turn ``requires_grad`` off on every parameter with no pivot (so backward skips its weight gradient) and on
    on every parameter that holds pivots. Returns a handle whose `restore()` undoes exactly these changes.

    Parameters the PivotSet does not name count as unpivoted. A PivotSet tensor the model lacks is an error.
    """
    named = list(model.named_parameters()) if isinstance(model, torch.nn.Module) else list(model)
    have = {n: p for n, p in named}
    counts = dict(zip(pivots.names, pivots.counts()))
    missing = [n for n in pivots.names if n not in have]
    if missing:
        raise ValueError(
            f"freeze_unpivoted: the PivotSet names tensors the model lacks, e.g. {missing[:3]}; "
            "it was built for another model"
        )
    changed = []
    for n, p in named:
        want = counts.get(n, 0) > 0
        if p.requires_grad != want:
            changed.append((p, p.requires_grad))
            p.requires_grad_(want)
    return FreezeHandle(changed)


# ---------------------------------------------------------------------------------------------------------------------
# DenseMaskedAdamW: the baseline
# ---------------------------------------------------------------------------------------------------------------------
class DenseMaskedAdamW(torch.optim.AdamW):
    """The benchmark baseline: `torch.optim.AdamW` (foreach by default, ``fused=True`` optional) over the whole
    pivoted tensors, with the gradient masked to the pivots **and the decoupled weight decay masked too**.

    torch's AdamW runs with ``weight_decay=0``; this class applies ``θ ← θ·(1 − lr·wd)`` at the pivots only before
    the Adam update (torch's order). Non-pivot entries then see a zero gradient from the start, so their moments
    stay 0 and their update is exactly 0: they stay bitwise unchanged. On the pivots it matches `SparseAdamW` within
    fp32 rounding (fp32 parameters; with bf16/fp16 parameters torch keeps the state in the parameter dtype and has
    no master copy, so it is a memory baseline only). Parameters with no pivots are not given to AdamW.
    Constructor arguments as `SparseAdamW` (plus ``foreach`` / ``fused``).
    """

    def __init__(
        self,
        params: Any,
        pivots: PivotSet,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        param_names: Any = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check_lr(lr, "DenseMaskedAdamW")
        _check_hparams(tuple(betas), eps, weight_decay, "DenseMaskedAdamW")
        groups = _named_groups(params, param_names)
        layouts = _split_pivots(groups, pivots, "DenseMaskedAdamW")
        torch_groups = []
        self._masks: dict[int, torch.Tensor] = {}
        for g, lay in zip(groups, layouts):
            if not lay.params:
                continue
            opts = {k: v for k, v in g.items() if k not in ("params", "param_names", "weight_decay")}
            opts["masked_weight_decay"] = g.get("weight_decay", weight_decay)
            opts["weight_decay"] = 0.0
            torch_groups.append({"params": lay.params, "param_names": lay.names, **opts})
            for ti, p in enumerate(lay.params):
                mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                mask[lay.indices[lay.offsets[ti] : lay.offsets[ti + 1]].long()] = True
                self._masks[id(p)] = mask.view(p.shape)
        if not torch_groups:
            raise ValueError("DenseMaskedAdamW: the PivotSet has no pivots on the given parameters")
        if fused:
            foreach = False
        elif foreach is None:
            foreach = True
        super().__init__(torch_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach, fused=fused)
        self.pivots = pivots

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # fused AdamW under a GradScaler: skip the masked decay too
        if isinstance(found_inf, torch.Tensor) and float(found_inf.item()) != 0.0:
            super().step()
            return loss
        for group in self.param_groups:
            _check_lr(group["lr"], "DenseMaskedAdamW")
            wd, lr = group["masked_weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self._masks[id(p)]
                p.grad.masked_fill_(~mask, 0)
                if wd:
                    p.mul_(torch.where(mask, 1.0 - lr * wd, 1.0).to(torch.float32))
        super().step()
        return loss

    def state_bytes(self) -> int:
        """Bytes of all AdamW state tensors (exp_avg, exp_avg_sq, step) + the bool masks."""
        total = sum(m.numel() * m.element_size() for m in self._masks.values())
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total
