"""The benchmark machinery on a tiny layout, so CI catches breakage (benchmarks themselves are not in the default run).

Runs the op-level suites through pytest-benchmark with `--benchmark-disable` (each case runs once, untimed) on the
tiny layout, checks the shape table against the sizes DESIGN.md §5 measured, the byte floors against hand counts,
and renders the report from a synthetic results file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import cases  # noqa: E402
import report  # noqa: E402
import shapes  # noqa: E402


def test_shape_table_matches_measured_sizes():
    # DESIGN.md §5: 300 tensors / 420.4 M (small), 588 / 1.839 B (medium), 588 / 3.257 B (large).
    for size, tensors, millions in (("small", 300, 420.4), ("medium", 588, 1838.7), ("large", 588, 3257.0)):
        named = shapes.model_shapes(size)
        assert len(named) == tensors
        assert abs(shapes.numel(named) / 1e6 - millions) < 0.1
    assert len(shapes.model_shapes("small", layers=2)) == 2 * 12 + 12


def test_step_byte_floor_counts_lines():
    inp = cases.make_inputs("tiny", None, "fp32", "cpu")
    from ppt_fast.pivots import PivotSet

    # tensor 0: pivots 0, 1 (one 64-B line), 16 (next line); others empty
    offsets = [0, 3] + [3] * (len(inp.names) - 1)
    pivots = PivotSet(inp.names, inp.shapes, offsets, torch.tensor([0, 1, 16], dtype=torch.int32))
    floor = cases.step_bytes(inp, pivots, 64)
    assert floor["lines_touched"] == 2
    assert floor["bytes"] == 3 * 20 + 2 * 64 * 3


def test_benchmark_suites_run_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "pytest",
        str(BENCH / "bench_sparse_adamw_step.py"), str(BENCH / "bench_select_pivots.py"),
        str(BENCH / "bench_sensitivity_accumulate.py"),
        "-o", "python_files=bench_*.py", "-o", "addopts=", "-p", "no:cacheprovider", "-q",
        "--benchmark-disable", "--benchmark-json", str(out),
        "--bench-sizes", "tiny", "--bench-densities", "0.01", "--bench-mem-sizes", "",
        "-k", "not ref_compile",  # compiling takes ~10 s per op on 2 cores; the full suite covers it
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "passed" in proc.stdout


def test_report_renders_from_results(tmp_path):
    def entry(provider, seconds, mem):
        return {
            "extra_info": {
                "op": "sparse_adamw_step", "provider": provider, "model": "musicgen-small", "size": "small",
                "layers": 24, "layers_total": 24, "tensors": 300, "dtype": "fp32", "density": 0.01,
                "median_seconds": seconds, "gbps": 1.0, "pct_of_copy": 50.0, "mem_peak_extra_bytes": mem,
            }
        }  # fmt: skip

    def loss(provider, seconds, mem):
        return {
            "extra_info": {
                "op": "lm_loss", "provider": provider, "model": "tiny", "batch": 16, "frames": 200, "codebooks": 8,
                "card": 1024, "step_seconds": seconds, "peak_extra_bytes": mem, "logits_bytes": 104857600,
            }
        }  # fmt: skip

    data = {
        "provenance": {"device": "cpu", "device_name": "x", "date_utc": "2026-01-01T00:00:00+00:00"},
        "benchmarks": [
            entry("dense_masked", 2.0, 4e9),
            entry("cpp", 0.05, 1e8),
            loss("solver", 1.75, 8e8),
            loss("pattern", 0.7, 2e8),
        ],
        "skipped": [{"name": "t", "reason": "no GPU"}],
    }
    (tmp_path / "cpu-2026-01-01.json").write_text(json.dumps(data))
    md, pngs = report.render(sorted(tmp_path.glob("*.json")), tmp_path)
    text = md.read_text()
    assert "| sparse_adamw_step |" in text and "40x" in text and "cpu-2026-01-01.json" in text
    assert "40x with `cpp` (target >= 20x) - met" in text
    loss_row = next(ln for ln in text.splitlines() if ln.startswith("| tiny | 16 x 200 frames, 8 x 1024 | pattern"))
    assert "| 2.5x |" in loss_row and "| 0.25x |" in loss_row
    if pytest.importorskip("matplotlib"):
        assert pngs and pngs[0].exists()


def test_memory_probe_measures_every_provider_of_a_group_in_one_process():
    spec = {"op": "sparse_adamw_step", "providers": ["dense_masked", "cpp"], "size": "tiny", "layers": None,
            "dtype": "fp32", "device": "cpu", "densities": [0.01, 0.05]}  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, str(BENCH / "memprobe.py"), json.dumps(spec)], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(res["by_provider"]) == ["cpp", "dense_masked"]
    for by in res["by_provider"].values():
        assert sorted(by["by_density"]) == ["0.01", "0.05"]
        for m in by["by_density"].values():
            # The kernel's RSS counters are approximate (per-CPU / per-thread batches, up to ~64 pages each, folded in
            # lazily), so a case that allocates next to nothing can read a few hundred KiB under its base.
            slack = 1 << 20
            assert m["peak_extra_bytes"] >= -slack and m["base_bytes"] > 0, m


def test_memory_probes_are_shared_by_the_providers_the_session_runs(monkeypatch):
    import harness

    calls = []

    def fake_measure(spec, timeout=900.0):
        calls.append(spec)
        return {"by_provider": {p: {"by_density": {"0.01": {"peak_extra_bytes": len(p)}}} for p in spec["providers"]}}

    monkeypatch.setattr(harness, "measure_peak_memory", fake_measure)
    monkeypatch.setattr(harness, "_MEM_CACHE", {})
    monkeypatch.setitem(harness.COLLECTED, ("sparse_adamw_step", "small", "fp32"),
                        ["dense_masked", "ref_compile", "cpp", "cuda"])  # fmt: skip
    base = {"op": "sparse_adamw_step", "size": "small", "layers": 24, "dtype": "fp32", "device": "cpu",
            "density": 0.01}  # fmt: skip
    got = {p: harness.peak_memory_for({**base, "provider": p}, [0.01]) for p in ("dense_masked", "cpp")}
    assert got == {"dense_masked": {"peak_extra_bytes": 12}, "cpp": {"peak_extra_bytes": 3}}
    # one probe for the group; ref_compile (compile-time memory) and cuda (cannot run on the CPU) are not in it
    assert len(calls) == 1 and calls[0]["providers"] == ["dense_masked", "cpp"]
    # a provider the collection did not name gets a probe of its own; an unmeasured density says so
    assert harness.peak_memory_for({**base, "provider": "ref"}, [0.01]) == {"peak_extra_bytes": 3}
    assert calls[1]["providers"] == ["ref"]
    assert "error" in harness.peak_memory_for({**base, "provider": "cpp", "density": 0.05}, [0.01])


@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("transformers", "peft")),
    reason="the peers' probe runs PEFT on transformers' MusicGen",
)
def test_peer_probe_and_its_report_on_the_tiny_model(tmp_path):
    """tune_probe.py's peer arms (bench_peers.py) on the tiny random transformers model: the trainable counts follow
    the arms' rules, the files are measured, and the report renders their table, targets and plot."""
    out = {}
    for method in ("ppt_fast", "lora", "lora_matched", "shira", "dreamstyler"):
        spec = {"model": "tiny", "method": method, "phase": "train", "density": 0.05, "device": "cpu",
                "seconds": 1.0, "steps": 1, "host": "transformers"}  # fmt: skip
        proc = subprocess.run([sys.executable, str(BENCH / "tune_probe.py"), json.dumps(spec)], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ppt, lora, matched, shira = (out[m] for m in ("ppt_fast", "lora", "lora_matched", "shira"))
    assert out["dreamstyler"]["trainable"] > ppt["k"]  # its cross-attn K/V rows in full
    assert ppt["trainable"] == ppt["k"] and 0 < ppt["file_bytes_bf16"] < ppt["file_bytes"]
    assert "r=16" in lora["impl"] and lora["trainable"] > 10 * ppt["k"]
    assert lora["optimizer_state_bytes"] == 8 * lora["trainable"] and ppt["optimizer_state_bytes"] <= 16 * ppt["k"]
    for peer in (matched, shira):  # nearest ppt's count in steps of the rank
        assert peer["trainable"] > 0 and abs(peer["trainable"] - ppt["k"]) <= max(peer["trainable"], ppt["k"])
        assert peer["file_bytes"] > 0 and peer["file"].startswith("PEFT adapter")
    data = {"provenance": {"device": "cpu", "device_name": "x", "date_utc": "2026-01-01T00:00:00+00:00"},
            "benchmarks": [{"extra_info": {"op": "peer_tune_step", "provider": m, "model": "hf-tiny", **r}}
                           for m, r in out.items()]}  # fmt: skip
    (tmp_path / "cpu-2026-01-01.json").write_text(json.dumps(data))
    md, pngs = report.render(sorted(tmp_path.glob("*.json")), tmp_path)
    text = md.read_text()
    assert "| hf-tiny | lora |" in text and "file <= 1/20 of LoRA's adapter" in text and ">= 2x faster" in text
    if importlib_util_spec("matplotlib"):
        assert any(p.name == "peers_time_memory.png" and p.exists() for p in pngs)


def importlib_util_spec(name: str) -> bool:
    return __import__("importlib").util.find_spec(name) is not None
