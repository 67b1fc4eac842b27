"""Run a benchmark suite, write its results JSON with provenance, and render the report (markdown + PNG).

    python benchmarks/run.py --suite cpu      # `make bench`: op level + optimizer memory + end to end, CPU
    python benchmarks/run.py --suite gpu      # `make bench-gpu`: the same on CUDA, whole models, fp32 and bf16
    python benchmarks/run.py --suite smoke    # seconds: the tiny layout only (what tests/test_benchmarks_smoke.py runs)

Anything after `--` goes to pytest (e.g. `-- -k sparse_adamw_step --bench-sizes small`).
Results: benchmarks/results/<device>-<date>.json; report: benchmarks/results/README.md and benchmarks/results/*.png
(rendered from every JSON file in the results folder, each row naming its file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

SUITES = {
    # CPU: musicgen-small whole (300 tensors), medium and large as 2- and 1-layer slices (+ all heads): a dense
    # AdamW step over a whole medium/large needs 29/52 GB here and minutes per call. End to end: the train phase of
    # tiny and small, the sensitivity phase of tiny only (small's adds a minute; the GPU suite runs both). The loss
    # benchmark: the default LM only (musicgen-small's adds ~2 min: `-- --bench-loss-models tiny,small`). ~15 min.
    "cpu": {
        "device": "cpu",
        "args": ["--bench-sizes", "small,medium,large", "--bench-layers", "small=24,medium=2,large=1",
                 "--bench-dtypes", "fp32", "--bench-mem-sizes", "small", "--bench-e2e-models", "tiny,small",
                 "--bench-e2e-sensitivity", "tiny", "--bench-loss-models", "tiny", "--bench-case-seconds", "6"],
    },
    "gpu": {
        "device": "cuda",
        "args": ["--bench-sizes", "small,medium,large", "--bench-layers", "small=all,medium=all,large=all",
                 "--bench-dtypes", "fp32,bf16", "--bench-mem-sizes", "small,medium,large",
                 "--bench-e2e-models", "tiny,small", "--bench-peer-models", "small,medium", "--bench-rounds", "10"],
    },
    "smoke": {
        "device": "cpu",
        "args": ["--bench-sizes", "tiny", "--bench-dtypes", "fp32", "--bench-densities", "0.01",
                 "--bench-mem-sizes", "tiny", "--bench-e2e-models", "", "--bench-rounds", "1",
                 "--bench-optmem-size", "tiny", "--bench-loss-models", "", "--bench-peer-models", "",
                 "--bench-dist-models", ""],
    },
}  # fmt: skip
FILES = [
    "bench_sensitivity_accumulate.py",
    "bench_select_pivots.py",
    "bench_sparse_adamw_step.py",
    "bench_optimizer_memory.py",
    "bench_tune_step.py",
    "bench_peers.py",
    "bench_lm_loss.py",
    "bench_distributed.py",
]


def _skips(junit: Path) -> list[dict]:
    """Skipped cases and their reasons, from pytest's junit XML."""
    out = []
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        sk = case.find("skipped")
        if sk is not None:
            out.append({"name": case.get("name"), "file": case.get("classname"), "reason": sk.get("message", "")})
    return out


def run_suite(suite: str, out_dir: Path, extra: list[str], device: str | None = None) -> Path:
    import provenance

    spec = SUITES[suite]
    device = device or spec["device"]
    env = dict(os.environ)
    # The repo goes after anything already on PYTHONPATH, so a worktree placed there on purpose wins.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    with tempfile.TemporaryDirectory() as tmp:
        bench_json, junit = Path(tmp) / "bench.json", Path(tmp) / "junit.xml"
        cmd = [
            # -P: do not put the cwd (the repo) first on sys.path, so a worktree on PYTHONPATH (e.g. one with a built
            # ppt_fast._C) really is the ppt_fast that gets benchmarked.
            sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pytest",
            *[str(HERE / f) for f in FILES],
            "-o", "python_files=bench_*.py", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rs",
            "--benchmark-json", str(bench_json), "--benchmark-columns", "min,median,max,rounds",
            "--junitxml", str(junit), "--bench-device", device, *spec["args"], *extra,
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=str(REPO))
        wall = time.perf_counter() - t0
        if not bench_json.exists():
            raise SystemExit(f"pytest wrote no benchmark JSON (exit {proc.returncode}); see its output above")
        raw = json.loads(bench_json.read_text())
        skipped = _skips(junit)
    # Provenance is taken in this process but with the same PYTHONPATH the suite had.
    sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p]
    result = {
        "schema": 1,
        "suite": suite,
        "provenance": provenance.provenance(device, argv=[sys.executable, *sys.argv]),
        "pytest_command": " ".join(cmd),
        "pytest_exit_code": proc.returncode,
        "wall_seconds": wall,
        "machine_info": raw.get("machine_info"),
        "benchmarks": [
            {
                "name": b["name"],
                "fullname": b.get("fullname"),
                "group": b.get("group"),
                "stats": {k: b["stats"].get(k) for k in ("min", "max", "mean", "median", "stddev", "rounds")},
                "extra_info": b.get("extra_info", {}),
            }
            for b in raw.get("benchmarks", [])
        ],
        "skipped": skipped,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    path = out_dir / f"{provenance.device_slug(device)}-{stamp:%Y-%m-%d}.json"
    if path.exists():
        path = out_dir / f"{provenance.device_slug(device)}-{stamp:%Y-%m-%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"results: {path} ({len(result['benchmarks'])} benchmarks, {len(skipped)} skipped, {wall:.0f} s)")
    if proc.returncode not in (0, 5):
        print(f"warning: pytest exited {proc.returncode}; the results file holds what completed", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--device", default=None, help="override the suite's device (e.g. cuda:1)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    ap.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = ap.parse_args(argv)
    path = run_suite(args.suite, args.out, extra, args.device)
    if not args.no_report:
        import report

        md, pngs = report.render(sorted(args.out.glob("*.json")), args.out)
        print(f"report: {md} ({', '.join(str(p) for p in pngs)})")
    ok = json.loads(path.read_text())["pytest_exit_code"] in (0, 5)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
