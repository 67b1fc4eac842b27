"""One tune step on musicgen-small shapes, with and without activation checkpointing, ppt_fast vs dense masked.

    python benchmarks/checkpointing_probe.py [--steps 3] [--out benchmarks/results/cpu-checkpointing-<date>.json]

Runs `tune_probe.py` (fresh process per configuration) four times, side by side in one run, and writes the results
with provenance. Checkpointing is audiocraft's per-layer `transformer.checkpointing = "torch"`, applied to both arms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    import provenance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / f"cpu-checkpointing-{dt.date.today().isoformat()}.json"))
    args = ap.parse_args()
    rows = []
    for ck in ("none", "torch"):
        for method in ("ppt_fast", "dense_masked"):
            spec = {"model": "small", "method": method, "phase": "train", "density": 0.01, "device": "cpu",
                    "seconds": 5.0, "steps": args.steps, "checkpointing": ck}  # fmt: skip
            proc = subprocess.run([sys.executable, str(HERE / "tune_probe.py"), json.dumps(spec)], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
            rows.append({"spec": spec, **res})
            print(
                f"checkpointing={ck:5s} {method:12s} peak {res['peak_bytes'] / 2**30:.3f} GiB, "
                f"over model {res['peak_extra_bytes'] / 2**20:.0f} MiB, step {res['step_seconds']:.2f} s",
                flush=True,
            )
    by = {(r["spec"]["checkpointing"], r["spec"]["method"]): r for r in rows}
    ratios = {ck: {"peak_memory": by[ck, "ppt_fast"]["peak_bytes"] / by[ck, "dense_masked"]["peak_bytes"],
                   "step_time": by[ck, "ppt_fast"]["step_seconds"] / by[ck, "dense_masked"]["step_seconds"]}
              for ck in ("none", "torch")}  # fmt: skip
    out = {"schema": 1, "suite": "checkpointing-probe", "provenance": provenance.provenance("cpu", argv=sys.argv),
           "ratios_ppt_over_dense": ratios, "results": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
