"""One AdamW step over the pivots of every tensor of a MusicGen-shaped model, vs dense masked AdamW.

Bytes floor (DESIGN.md §4): per pivot m, v read + written, the int32 index, the fp32 master where params are 16-bit;
plus every distinct cache line (CPU 64 B, GPU 32 B sector) of g read and of θ read + written, counted from the real
pivot positions. The same floor is used for every provider, so GB/s compares like with like.
"""

from harness import run_op_benchmark

OP = "sparse_adamw_step"


def test_sparse_adamw_step(benchmark, bench_cfg, size, dtype, density, provider):
    run_op_benchmark(benchmark, bench_cfg, OP, provider, size, dtype, density)
