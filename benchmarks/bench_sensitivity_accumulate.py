"""sensitivity_accumulate (grad_sq, fp32 scores) over every tensor of a MusicGen-shaped model, one call per step.

The op reads each gradient once and reads + writes its score: bytes floor = N * (g bytes + 8). Density does not
apply (every in-scope entry is scored).
"""

from harness import run_op_benchmark

OP = "sensitivity_accumulate"


def test_sensitivity_accumulate(benchmark, bench_cfg, size, dtype, provider):
    run_op_benchmark(benchmark, bench_cfg, OP, provider, size, dtype)
