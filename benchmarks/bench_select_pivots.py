"""select_pivots: a global top-k over the scores of every tensor of a MusicGen-shaped model, at each density.

Bytes floor: the contract's two histogram passes and one compaction pass over N fp32 scores, plus k int32 indices.
The `dense_masked` baseline is what dense masked tuning does to get its masks: `torch.cat` + `torch.topk` + bool masks.
"""

from harness import run_op_benchmark

OP = "select_pivots"


def test_select_pivots(benchmark, bench_cfg, size, dtype, density, provider):
    run_op_benchmark(benchmark, bench_cfg, OP, provider, size, dtype, density)
