"""Tuning on several processes (torch.distributed): what `tune()` does when it runs inside a process group.

`torchrun --nproc_per_node N -m ppt_fast tune ...` (or `ppt_fast.tune()` called after `init_process_group`) runs
the same global batch as one process, split over the processes:

- the sensitivity pass gives each process whole batches (batch i to process i mod N; every process draws every
  batch, so the random streams stay in step) and sums the scores once, before the global top-k;
- every process must then hold the same pivots: a digest of the PivotSet (and of the base model) is all-gathered
  and a mismatch is an error on every process;
- each training step splits the batch's segments over the processes (contiguous shares, sizes differ by at most
  one; each process scales its loss by its share) and all-reduces **one packed fp32 buffer**: the k pivot gradients
  (dense recipe rows included), the identifier tokens' gradients, the loss and one failure flag per process. No
  dense gradient and no index goes over the wire: the pivot set is static;
- only process 0 writes the concept file (atomically); the others wait for it.

A failure on one process ends every process: each phase ends with a one-flag-per-process all-reduce (each step's
buffer carries the flags), so the others raise `DistributedError` naming the process that failed instead of waiting
in a collective. A process that dies without reaching one (killed, segfault) is caught by the collectives' timeout
(`init_from_env(timeout_s=...)`, `PPT_FAST_DIST_TIMEOUT`; torchrun also stops the others when a worker exits).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """Another process of the run failed (its own error is in its output), or the processes disagree (pivots, base
    model)."""


def _world() -> tuple[int, int] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR`` / ``MASTER_PORT``), unless one is initialised already: NCCL when CUDA is available, else gloo,
    with collectives timing out after `timeout_s` (default ``PPT_FAST_DIST_TIMEOUT`` or 600 s). Returns whether the
    run is distributed (more than one process)."""
    import torch.distributed as dist

    if _world() is not None:
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("PPT_FAST_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_world_size() > 1


def is_initialized() -> bool:
    """Whether this process is in an initialised torch.distributed process group."""
    return _world() is not None


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    w = _world()
    return 0 if w is None else w[0]


def leave() -> None:
    """Leave the process group `init_from_env` joined."""
    import torch.distributed as dist

    if _world() is not None:
        dist.destroy_process_group()


def pivot_digest(pivots: Any) -> str:
    """sha256 over a PivotSet's names, shapes, offsets and indices: equal digests, equal pivots."""
    h = hashlib.sha256()
    for name, shape in zip(pivots.names, pivots.shapes):
        h.update(f"{name}:{tuple(shape)};".encode())
    h.update(repr(list(pivots.offsets)).encode())
    h.update(pivots.indices.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()


def _agreed(e: BaseException) -> BaseException:
    """Mark an exception whose failure every process already knows of (no further collective for it)."""
    with contextlib.suppress(AttributeError, TypeError):
        e._ppt_fast_agreed = True  # type: ignore[attr-defined]
    return e


class Context:
    """One distributed tune run: this process's `rank` of `world`, the `group`, and the run's collectives. Every
    collective here is entered by every process in the same order; code between them may fail on one process only,
    which the next `checkpoint` (or step exchange) tells the others."""

    def __init__(self, rank: int, world: int, group: Any = None, device: Any = "cpu") -> None:
        self.rank, self.world, self.group = rank, world, group
        self.device = torch.device(device)  # where the flags live: NCCL reduces only CUDA tensors
        self.pending: BaseException | None = None  # an error raised where no collective was running (a callback)
        self.step_bytes = 0  # bytes of the last step's all-reduce
        self.comm_seconds = 0.0  # every step's all-reduce, summed
        self.steps = 0
        self.last_bytes, self.last_seconds = 0, 0.0  # the last all_reduce_packed

    @classmethod
    def current(cls) -> Context | None:
        """The run's context when torch.distributed is initialised with more than one process, else None."""
        import torch.distributed as dist

        w = _world()
        if w is None or w[1] <= 1:
            return None
        nccl = dist.get_backend() == "nccl"
        return cls(*w, group=dist.group.WORLD, device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")

    # ---- failures ----------------------------------------------------------------------------------------------
    def flags(self, failed: bool, device: Any = None) -> torch.Tensor:
        """One failure flag per process (this process's raised when `failed`), for an all-reduce."""
        f = torch.zeros(self.world, dtype=torch.float32, device=self.device if device is None else device)
        if failed:
            f[self.rank] = 1.0
        return f

    def failed_ranks(self, flags: torch.Tensor) -> list[int]:
        return [r for r, v in enumerate(flags.tolist()) if v > 0]

    def raise_if_failed(self, flags: torch.Tensor, where: str) -> None:
        bad = [r for r in self.failed_ranks(flags) if r != self.rank]
        if bad:
            who = ", ".join(map(str, bad))
            raise _agreed(
                DistributedError(
                    f"process {who} of {self.world} failed while {where}: this process ({self.rank}) stops too; "
                    f"the error is in process {bad[0]}'s output"
                )
            )

    def checkpoint(self, where: str, device: Any = None) -> None:
        """Every process says whether it failed since the last collective (one flag each, all-reduced); a pending
        error of this process is raised here, another's as DistributedError."""
        import torch.distributed as dist

        pending, self.pending = self.pending, None
        flags = self.flags(pending is not None, device)
        dist.all_reduce(flags, group=self.group)
        if pending is not None:
            raise _agreed(pending)
        self.raise_if_failed(flags, where)

    @contextlib.contextmanager
    def guard(self, where: str, device: Any = None) -> Iterator[None]:
        """Run a block that holds no collective; its failure on any process ends every process at its end."""
        import torch.distributed as dist

        try:
            yield
        except BaseException as e:
            if not getattr(e, "_ppt_fast_agreed", False):
                self.pending = None
                with contextlib.suppress(Exception):
                    dist.all_reduce(self.flags(True, device), group=self.group)
                _agreed(e)
            raise
        self.checkpoint(where, device)

    # ---- data --------------------------------------------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """This process's contiguous share of n items (shares differ by at most one; the first ones are larger)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (1 if self.rank < extra else 0))

    def mine(self, i: int) -> bool:
        """Whether item i of a round-robin split is this process's."""
        return i % self.world == self.rank

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Process 0's values of `t` on every process (in place; shapes must agree)."""
        import torch.distributed as dist

        buf = t if t.is_contiguous() else t.contiguous()
        dist.broadcast(buf, src=0, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def check_same(self, what: str, digest: str, fix: str) -> None:
        """DistributedError on every process unless every process's `digest` of `what` is the same."""
        import torch.distributed as dist

        got: list[Any] = [None] * self.world
        dist.all_gather_object(got, digest, group=self.group)
        if len(set(got)) > 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(got):
                groups.setdefault(d, []).append(r)
            parts = "; ".join(f"processes {v} hold {k[:12]}" for k, v in groups.items())
            raise _agreed(DistributedError(f"the processes hold different {what} ({parts}): {fix}"))

    def all_reduce_packed(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sum `tensors` over the processes in one fp32 all-reduce; returns the sums (new tensors, same shapes)."""
        import torch.distributed as dist

        dev = tensors[0].device if tensors else torch.device("cpu")
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0, device=dev)
        t0 = time.perf_counter()
        dist.all_reduce(flat, group=self.group)
        self.last_seconds = time.perf_counter() - t0
        self.last_bytes = flat.numel() * flat.element_size()
        out, pos = [], 0
        for t in tensors:
            out.append(flat[pos : pos + t.numel()].view(t.shape))
            pos += t.numel()
        return out

    def record_step(self, nbytes: int, seconds: float) -> None:
        self.step_bytes, self.steps = nbytes, self.steps + 1
        self.comm_seconds += seconds
        logger.debug("step %d: all-reduced %d bytes (one packed fp32 buffer) in %.2f ms", self.steps, nbytes,
                     seconds * 1e3)  # fmt: skip


__all__ = ["Context", "DistributedError", "init_from_env", "is_initialized", "leave", "pivot_digest", "rank"]
