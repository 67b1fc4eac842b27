"""Row-scoped weight gradients: compute only the rows of a weight gradient that PPT scores or trains.

Autograd computes the whole gradient of a parameter that requires grad. PPT needs far less: on MusicGen it scores
and trains the self-attention V rows and the cross-attention K/V rows of audiocraft's packed ``in_proj_weight``
``[3d, d]``. With whole gradients, 2/3 of every self-attention weight-gradient matmul is thrown away, and each
cross-attention layer (which slices the packed weight into Q, K, V) gets three zero-filled ``[3d, d]`` gradients
from ``SliceBackward`` that autograd then sums: on musicgen-small's shapes that is ~1/4 of a CPU tune step, and more
under activation checkpointing, where the freed fill buffers come back from the OS page by page.

`RowGrads` turns ``requires_grad`` off on its target weights and, while one of its contexts is active, routes every
``F.linear(x, W)`` and ``F.linear(x, W[a:b])`` (a row-slice view of a target) through an autograd Function whose
backward computes the input gradient as usual and, for the weight, only ``grad_out[..., rows]ᵀ · x`` for the rows the
target asks for, handing each block to the target's sink: ``sink(block [rows, in], row0, generation)``. Nothing
``[3d, d]``-sized is ever allocated for a gradient.

Protocol (the caller runs the forward and the backward in separate contexts)::

    rg = RowGrads()
    rg.add("layers.0.self_attn.in_proj_weight", w, rows=[(2 * d, 3 * d)], sink=fn)
    with rg:                      # requires_grad off on the targets; restored on exit
        with rg.forward():        # counts uses, checks each target is reached only through F.linear
            loss = model(batch)
        with rg.backward():
            loss.backward()

Activation checkpointing: pass ``context_fn=rg.checkpoint_contexts`` to ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)`` so the recomputation in backward routes ``F.linear`` the same way (without it checkpoint
raises ``CheckpointError``: different saved tensors); `ppt_fast.tune` does this for audiocraft's per-layer
checkpointing.

Guarantees, each checked rather than assumed: a target used by any torch op other than ``F.linear`` or row slicing
(an op that would need its gradient) is an error naming it (checked on every op until one forward pass came through
clean, then skipped: it costs a few microseconds per op); a target never reached by ``F.linear`` in a forward is an
error after that forward (its rows would silently get no gradient); a row block used twice in one forward is an error
(its per-use blocks would reach a non-linear score separately). Both are checked on every forward. Under autocast
the matmuls run in the autocast dtype, as ``F.linear`` itself would. The forward result is bitwise the same as the
plain ``F.linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Sink = Callable[[torch.Tensor, int, int], None]
_LINEAR = {F.linear, torch._C._nn.linear}
# Ops that only take a view or read metadata (property getters are all named __get__): a target may go through them
# on its way to F.linear; any other op reading a target is an error (it would have needed the target's gradient).
_PASSTHROUGH = frozenset(
    {"__getitem__", "__get__", "size", "dim", "stride", "storage_offset", "is_contiguous", "numel", "__len__",
     "data_ptr", "__repr__", "__format__", "untyped_storage", "detach"}
)  # fmt: skip


class RowGradError(RuntimeError):
    """A target weight was used in a way row-scoped gradients cannot serve (the message names it and the fix)."""


@dataclass
class _Target:
    name: str
    param: torch.Tensor
    rows: list[tuple[int, int]]
    sink: Sink
    row_len: int = 0
    uses: dict[tuple[int, int], int] = field(default_factory=dict)
    saved_requires_grad: bool = False


def _merge(rows: Sequence[tuple[int, int]], n_rows: int, name: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in rows):
        if not 0 <= a < b <= n_rows:
            raise ValueError(f"RowGrads: rows [{a}, {b}) of {name!r} are outside its {n_rows} rows")
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class _RowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, anchor, plan):  # noqa: ARG004 - anchor only makes the output require grad
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            xc, wc = x.to(dt), w.to(dt)
            bc = None if b is None else b.to(dt)
        else:
            xc, wc, bc = x, w, b
        with torch.autocast(dev, enabled=False):
            y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.plan = plan
        ctx.x_dtype = x.dtype
        ctx.b_dtype = None if b is None else b.dtype
        ctx.x_needs = x.requires_grad
        ctx.b_needs = b is not None and b.requires_grad
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        target, view_row0, blocks, gen_of = ctx.plan
        out_f, in_f = wc.shape
        g2 = grad_out.reshape(-1, out_f).to(wc.dtype)
        gx = gb = None
        if ctx.x_needs:
            gx = torch.mm(g2, wc).reshape(*grad_out.shape[:-1], in_f).to(ctx.x_dtype)
        if ctx.b_needs:
            gb = g2.sum(0).to(ctx.b_dtype)
        x2 = xc.reshape(-1, in_f)
        gen = gen_of()
        with torch.no_grad():
            for a, b in blocks:  # rows [a, b) of the view = rows [view_row0 + a, view_row0 + b) of the target
                target.sink(torch.mm(g2[:, a:b].t(), x2), view_row0 + a, gen)
        return gx, None, gb, None, None


class _Mode(TorchFunctionMode):
    def __init__(self, owner: RowGrads, counting: bool) -> None:
        super().__init__()
        self.owner = owner
        self.counting = counting
        # Scan every other op's arguments for a target until one forward pass came through clean (the check costs
        # a few microseconds per op: on the tiny model ~20 % of a step if kept on for every pass).
        self.scan = counting and not owner._validated

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if func in _LINEAR:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            hit = owner._locate(w)
            if hit is not None:
                return owner._linear(x, w, b, *hit, counting=self.counting)
        elif self.scan and getattr(func, "__name__", "") not in _PASSTHROUGH:
            for a in _tensors(args, kwargs):
                hit = owner._locate(a)
                if hit is not None:
                    t = hit[0]
                    raise RowGradError(
                        f"row-scoped gradients: {t.name!r} is used by {getattr(func, '__name__', func)!s}, not only "
                        "by F.linear, so its gradient cannot be limited to rows; turn row-scoped gradients off for "
                        "it (tune(..., row_grads=False))"
                    )
        return func(*args, **kwargs)


def _tensors(args, kwargs) -> Iterator[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, torch.Tensor):
                    yield x


class RowGrads:
    """Row-scoped weight gradients for a set of 2-D weights (see the module docstring)."""

    def __init__(self) -> None:
        self._targets: dict[int, _Target] = {}
        self._installed = False
        self._validated = False  # a forward pass has shown every target is used only through F.linear
        self.generation = 0  # backward passes run through `backward()`
        self._anchors: dict[torch.device, torch.Tensor] = {}

    def add(self, name: str, param: torch.Tensor, rows: Sequence[tuple[int, int]], sink: Sink) -> None:
        """Serve rows ``[a, b)`` of `param`'s gradient to ``sink(block, row0, generation)`` in backward."""
        if self._installed:
            raise RuntimeError("RowGrads.add after install: add every target first")
        if param.dim() != 2 or not param.is_contiguous():
            raise ValueError(f"RowGrads: {name!r} must be a contiguous 2-D weight, got shape {tuple(param.shape)}")
        t = _Target(name, param, _merge(rows, param.shape[0], name), sink, row_len=param.shape[1])
        self._targets[id(param)] = t

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._targets.values()]

    def __len__(self) -> int:
        return len(self._targets)

    # ---- install / remove --------------------------------------------------------------------------------------
    def install(self) -> RowGrads:
        for t in self._targets.values():
            t.saved_requires_grad = t.param.requires_grad
            t.param.requires_grad_(False)
        self._installed = True
        return self

    def remove(self) -> None:
        if not self._installed:
            return
        for t in self._targets.values():
            t.param.requires_grad_(t.saved_requires_grad)
        self._installed = False

    def __enter__(self) -> RowGrads:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ---- the two phases ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Run the forward pass inside this: uses are counted and checked when it ends."""
        if not self._targets:
            yield
            return
        for t in self._targets.values():
            t.uses.clear()
        mode = _Mode(self, counting=True)
        with mode:
            yield
        unused = [t.name for t in self._targets.values() if not t.uses]
        if unused:
            raise RowGradError(
                f"row-scoped gradients: {len(unused)} target(s) were not reached through F.linear in the forward "
                f"pass (first: {unused[0]!r}), so their rows would get no gradient; turn row-scoped gradients off "
                "(tune(..., row_grads=False)) for a model whose attention does not project with F.linear"
            )
        if mode.scan:
            self._validated = True

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        """Run ``loss.backward()`` inside this (activation checkpointing recomputes the forward in here)."""
        self.generation += 1
        if not self._targets:
            yield
            return
        with _Mode(self, counting=False):
            yield

    def checkpoint_contexts(self) -> tuple[Any, Any]:
        """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the recomputation in
        backward must route ``F.linear`` as the forward did (else checkpoint sees different saved tensors and
        raises ``CheckpointError``); the torch-function mode of `backward()` does not reach it."""
        return contextlib.nullcontext(), _Mode(self, counting=False)

    # ---- internals -----------------------------------------------------------------------------------------------
    def _locate(self, w: Any) -> tuple[_Target, int] | None:
        """(target, first row) when `w` is a target or a row-slice view of one, else None."""
        if not isinstance(w, torch.Tensor) or not self._targets:
            return None
        t = self._targets.get(id(w))
        if t is not None:
            return t, 0
        base = w._base
        if base is None or id(base) not in self._targets:
            return None
        t = self._targets[id(base)]
        off = w.storage_offset() - base.storage_offset()
        if w.dim() != 2 or w.stride() != base.stride() or w.shape[1] != base.shape[1] or off % t.row_len:
            raise RowGradError(
                f"row-scoped gradients: {t.name!r} is used through a view that is not a slice of whole rows "
                f"(shape {tuple(w.shape)}, stride {w.stride()}); turn row-scoped gradients off for it"
            )
        return t, off // t.row_len

    def _linear(self, x, w, b, target: _Target, row0: int, *, counting: bool):
        row1 = row0 + w.shape[0]
        blocks = [(max(a, row0) - row0, min(b_, row1) - row0) for a, b_ in target.rows if a < row1 and b_ > row0]
        if counting:
            key = (row0, row1)
            target.uses[key] = target.uses.get(key, 0) + 1
            if blocks and target.uses[key] > 1:
                raise RowGradError(
                    f"row-scoped gradients: rows [{row0}, {row1}) of {target.name!r} are used twice in one forward "
                    "pass; their gradient must be summed before scoring, which row-scoped gradients do not do; turn "
                    "them off (tune(..., row_grads=False))"
                )
        if not blocks or not torch.is_grad_enabled():
            return F.linear(x, w, b)
        anchor = self._anchors.get(x.device)
        if anchor is None:  # an empty leaf that requires grad: the output needs a backward even when nothing else does
            anchor = self._anchors[x.device] = torch.empty(0, device=x.device, requires_grad=True)
        plan = (target, row0, blocks, lambda: self.generation)
        return _RowLinear.apply(x, w, b, anchor, plan)
