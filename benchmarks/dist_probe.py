"""Bytes on the wire per tune step with several processes (gloo, this machine's CPUs), in fresh processes:

    python benchmarks/dist_probe.py '{"model": "small", "method": "ppt_fast"|"ddp_dense_masked", "world": 2,
                                      "steps": 2, "seconds": 5.0, "density": 0.01}'

Prints one JSON line. Both arms train the `ppt` recipe's tensors of the audiocraft MusicGen at `model`'s shapes
(random init) on a global batch of `world` segments of `seconds` (one per process):
- `ppt_fast`: `ppt_fast.tuning.tune_model` itself in a process group (what `torchrun -m ppt_fast tune` runs: the
  sensitivity pass split over the processes, global top-k at `density`, then `steps` training steps, each with one
  all-reduce of a packed fp32 buffer: pivot gradients, identifier-token gradients, loss and flags);
- `ddp_dense_masked`: the same tensors trained dense-masked under `torch.nn.parallel.DistributedDataParallel`, as a
  user would without ppt_fast: DDP all-reduces the whole gradient of every tensor that requires one (DDP's own
  buckets, counted by a communication hook that wraps its default all-reduce).

Recorded per arm: bytes all-reduced per step (exact: the buffers' sizes), the all-reduce time per step (ppt_fast:
the blocking collective inside the step; DDP: those buffers all-reduced back to back after training, since in the
step DDP overlaps them with the backward), and the step time.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODELS = {"tiny": "tiny-random", "small": "musicgen-small-shapes", "medium": "musicgen-medium-shapes"}


def _back_to_back(sizes: list[int], reps: int = 3) -> float:
    """Median time to all-reduce fp32 buffers of these sizes one after another, all processes starting together."""
    bufs = [torch.zeros(n) for n in sizes]
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        for b in bufs:
            dist.all_reduce(b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ppt(spec: dict, rank: int, world: int) -> dict:
    from ppt_fast.audio import synth_reference
    from ppt_fast.tuning import tune_model

    seconds = float(spec["seconds"])
    ref = (synth_reference(seconds * world * 2, 32000, seed=3).reshape(1, -1), 32000)
    steps = int(spec["steps"])
    r = tune_model(ref, model=MODELS[spec["model"]], preset="ppt", ratio=float(spec["density"]), steps=steps,
                   sensitivity_batches=world, batch_size=world, segment_seconds=seconds, prior=0.0, verbose=False,
                   use_cache=False)  # fmt: skip
    return {
        "bytes_per_step": r.comm_bytes_per_step,
        "allreduce_seconds": _back_to_back([r.comm_bytes_per_step // 4]),
        "allreduce_in_step_seconds": r.comm_seconds / max(steps, 1),  # includes waiting for the slower process
        "step_seconds": r.train_seconds / max(steps, 1),
        "k": r.trained.count,
        "token_entries": sum(t.numel() for t in r.tokens.values()),
        "impl": "ppt_fast.tuning.tune_model in a gloo process group: one packed fp32 all-reduce per step",
    }


def _ddp(spec: dict, rank: int, world: int) -> dict:
    from ppt_fast.models import load_host
    from ppt_fast.optim import DenseMaskedAdamW
    from ppt_fast.pivots import PivotSet

    host = load_host(MODELS[spec["model"]], device="cpu", seed=0)
    lm = host.lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    scope = host.scope("ppt").resolve(lm)
    g = torch.Generator().manual_seed(0)
    idx, offsets = [], [0]
    for e in scope:
        cols = e.param[0].numel()
        n = (e.rows[1] - e.rows[0]) * cols
        keep = torch.nonzero(torch.rand(n, generator=g) < float(spec["density"])).reshape(-1) + e.rows[0] * cols
        idx.append(keep.to(torch.int32))
        offsets.append(offsets[-1] + keep.numel())
    names, params = [e.name for e in scope], [e.param for e in scope]
    pivots = PivotSet(names, [p.shape for p in params], offsets, torch.cat(idx))
    for p in params:
        p.requires_grad_(True)

    class Loss(torch.nn.Module):  # DDP arms its reducer in its forward: the loss is that forward
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, codes):
            return host.loss(codes, ["a piece of music"])

    ddp = torch.nn.parallel.DistributedDataParallel(Loss())
    sizes: list[int] = []

    def hook(state, bucket):
        buf = bucket.buffer()
        sizes.append(buf.numel())
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))

    ddp.register_comm_hook(None, hook)
    opt = DenseMaskedAdamW(list(zip(names, params)), pivots, lr=1e-4, weight_decay=0.0)
    frames = int(round(float(spec["seconds"]) * host.frame_rate))
    card, n_q = lm.card, lm.num_codebooks
    codes = torch.randint(0, card, (1, n_q, frames), generator=torch.Generator().manual_seed(1 + rank))
    times = []
    for _ in range(1 + int(spec["steps"])):  # the first is the warm-up
        sizes.clear()
        t0 = time.perf_counter()
        ddp(codes).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "bytes_per_step": 4 * sum(sizes),
        "allreduce_seconds": _back_to_back(sizes),
        "step_seconds": statistics.median(times[1:]),
        "k": pivots.count,
        "buckets": len(sizes),
        "trained_tensor_entries": sum(p.numel() for p in params),
        "impl": "DistributedDataParallel (gloo, default buckets) + ppt_fast.optim.DenseMaskedAdamW",
    }


def _worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))  # fmt: skip
    try:
        res = (_ppt if spec["method"] == "ppt_fast" else _ddp)(spec, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure(spec: dict) -> dict:
    world = int(spec.get("world", 2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(world, port, spec, out), nprocs=world, join=True)
        res = json.loads(Path(out).read_text())
    res.update(world=world, threads_per_process=max(1, int(spec.get("threads", 1))), seconds_of_audio=spec["seconds"])
    return res


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
