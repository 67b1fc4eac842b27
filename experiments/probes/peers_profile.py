"""Where a SHiRA / LoRA / ppt_fast tune step spends its time (torch.profiler, CPU), musicgen-small shapes through the
transformers host, the arms of benchmarks/tune_probe.py (B = 1, 5 s, ppt at 1 %). Prints the top operators by self
CPU time and the share of the step in SHiRA's own work (clone of the adapted weight, the sparse COO delta and its
add) and in matmuls.

    .venv/bin/python experiments/probes/peers_profile.py shira [small]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import tune_probe as tp  # noqa: E402

method = sys.argv[1] if len(sys.argv) > 1 else "shira"
model = sys.argv[2] if len(sys.argv) > 2 else "small"
spec = {"model": model, "method": method, "phase": "train", "density": 0.01, "device": "cpu", "host": "transformers"}
host = tp._host(spec)
lm = host.lm.eval()
for p in lm.parameters():
    p.requires_grad_(False)
g = torch.Generator().manual_seed(0)
frames = int(5.0 * host.frame_rate)
codes = torch.randint(0, lm.config.decoder.vocab_size, (1, lm.decoder.num_codebooks, frames), generator=g)
sparse = host.scope("ppt").resolve(lm)
idx, offsets = [], [0]
for e in sparse:
    cols = e.param[0].numel()
    keep = torch.nonzero(torch.rand((e.rows[1] - e.rows[0]) * cols, generator=g) < 0.01).reshape(-1) + e.rows[0] * cols
    idx.append(keep.to(torch.int32))
    offsets.append(offsets[-1] + keep.numel())
k = offsets[-1]
rg = None
if method == "ppt_fast":  # as tune() runs it: SparseAdamW, pivots gathered in backward, row-scoped gradients
    from ppt_fast import tuning
    from ppt_fast.optim import SparseAdamW
    from ppt_fast.pivots import PivotSet

    names, params = [e.name for e in sparse], [e.param for e in sparse]
    pivots = PivotSet(names, [p.shape for p in params], offsets, torch.cat(idx))
    for p in params:
        p.requires_grad_(True)
    opt = SparseAdamW(list(zip(names, params)), pivots, lr=1e-4, gather_in_backward=True)
    rg = tuning._row_grads(host, [(n, [tuning._pivot_rows(pivots.indices_of(n), p)], opt.row_sink(p))
                                  for n, p in zip(names, params)]).install()  # fmt: skip
    impl = "SparseAdamW(gather_in_backward=True) + row-scoped gradients"
    host.training(rg).__enter__()
else:
    opt, impl, _ = tp._peer_arm(host, method, sparse, torch.cat(idx), offsets, k)


def step():
    if rg is not None:
        with rg.forward():
            loss = host.loss(codes, ["a piece of music"])
        with rg.backward():
            loss.backward()
    else:
        loss = host.loss(codes, ["a piece of music"])
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


step()  # warm-up
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    step()
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
          "shira_own": ("aten::clone", "aten::copy_", "aten::add", "aten::_sparse_coo_tensor_with_dims_and_tensors",
                        "aten::add_",
                        "aten::_to_dense", "aten::coalesce", "aten::index_select", "aten::_coalesce",
                        "aten::sparse_mask", "aten::index", "aten::zeros")}  # fmt: skip
share = {g: sum(e.self_cpu_time_total for e in events if e.key in names) / total for g, names in groups.items()}
print(
    json.dumps(
        {
            "method": method,
            "model": model,
            "impl": impl,
            "step_cpu_seconds": total / 1e6,
            "mm_calls": sum(e.count for e in events if e.key == "aten::mm"),
            "mm_seconds": sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / 1e6,
            "share": share,
            "top": [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in rows],
        },
        indent=1,
    )
)
