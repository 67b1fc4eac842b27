"""One tune step on musicgen-small shapes, side by side: ppt_fast (with and without row-scoped gradients) vs dense
masked, each without and with activation checkpointing.

    python experiments/probes/checkpointing_probe.py [--steps 3] [--repeats 2]
                                                     [--out benchmarks/results/cpu-checkpointing-<date>.json]

Runs `benchmarks/tune_probe.py` (a fresh process per configuration) for the 6 configurations, `--repeats` rounds in
turn (so slow drift of a shared machine hits every configuration alike), and writes every run plus, per configuration,
the median over rounds of the step time and of the peak memory, and the ratios to dense masked: against dense masked
with the same checkpointing setting, and against dense masked without checkpointing (what dense masked tuning runs by
default). Checkpointing is audiocraft's per-layer `transformer.checkpointing = "torch"`. Allocator: as in
`bench_tune_step.py`, MALLOC_MMAP_THRESHOLD_=131072 unless set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "benchmarks"  # tune_probe.py, provenance.py, results/
sys.path.insert(0, str(HERE))

ARMS = (("dense_masked", False), ("ppt_fast", True), ("ppt_fast", False))  # (method, row_grads)


def _label(method: str, row_grads: bool) -> str:
    return method if method == "dense_masked" else f"ppt_fast{'' if row_grads else '_wholegrads'}"


def main() -> int:
    import provenance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / f"cpu-checkpointing-{dt.date.today().isoformat()}.json"))
    args = ap.parse_args()
    # The allocator setting of bench_tune_step.py (make bench): glibc maps every block over 128 KiB, so freed
    # memory leaves RSS at once and the peak is that of live tensors, not of what glibc keeps for reuse.
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    rows = []
    for rep in range(args.repeats):
        for ck in ("none", "torch"):
            for method, rg in ARMS:
                spec = {"model": "small", "method": method, "phase": "train", "density": 0.01, "device": "cpu",
                        "seconds": 5.0, "steps": args.steps, "checkpointing": ck, "row_grads": rg}  # fmt: skip
                proc = subprocess.run([sys.executable, str(HERE / "tune_probe.py"), json.dumps(spec)],
                                      capture_output=True, text=True, check=True, env=env)  # fmt: skip
                res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
                rows.append({"spec": spec, "label": _label(method, rg), "repeat": rep, **res})
                print(
                    f"round {rep} checkpointing={ck:5s} {_label(method, rg):21s} peak {res['peak_bytes'] / 2**30:.3f} "
                    f"GiB, over model {res['peak_extra_bytes'] / 2**20:.0f} MiB, step {res['step_seconds']:.2f} s",
                    flush=True,
                )
    summary: dict[str, dict] = {}
    for ck in ("none", "torch"):
        for method, rg in ARMS:
            runs = [r for r in rows if r["spec"]["checkpointing"] == ck and r["label"] == _label(method, rg)]
            summary[f"{_label(method, rg)}/{ck}"] = {
                "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
                "step_seconds": statistics.median(r["step_seconds"] for r in runs),
            }
    ratios = {}
    for key, v in summary.items():
        label, ck = key.split("/")
        if label == "dense_masked":
            continue
        same, plain = summary[f"dense_masked/{ck}"], summary["dense_masked/none"]
        ratios[key] = {
            "vs_dense_same_checkpointing": {"peak_memory": v["peak_bytes"] / same["peak_bytes"],
                                            "step_time": v["step_seconds"] / same["step_seconds"]},
            "vs_dense_without_checkpointing": {"peak_memory": v["peak_bytes"] / plain["peak_bytes"],
                                               "step_time": v["step_seconds"] / plain["step_seconds"]},
        }  # fmt: skip
    out = {"schema": 2, "suite": "checkpointing-probe", "provenance": provenance.provenance("cpu", argv=sys.argv),
           "repeats": args.repeats, "summary_medians": summary, "ratios": ratios, "results": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
