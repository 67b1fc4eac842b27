"""One table of tolerances for every kernel-vs-reference comparison.

Rule (flash-attention's): a kernel's error against the fp64 reference may be at most 2x what PyTorch's own
low-precision computation of the same thing makes, plus a small atol. The values below were set from that
rule; every entry says why it is what it is.
"""

import torch

# (rtol, atol) for values computed in fp32 and stored in `dtype`.
TOL = {
    # fp32 storage: one or two roundings of fp32 math (FMA contraction may differ between backends).
    torch.float32: (2e-6, 1e-7),
    # fp16 storage: half-ulp of fp16 is 4.9e-4 relative; allow two roundings.
    torch.float16: (1e-3, 1e-5),
    # bf16 storage: half-ulp of bf16 is 3.9e-3 relative; allow two roundings.
    torch.bfloat16: (8e-3, 1e-5),
}

# AdamW over several steps in fp32 vs an fp64 reference: the error compounds through sqrt/div per step;
# 5-7 steps of fp32 drift measured at ~1e-6 relative. 1e-5 gives room without hiding a wrong formula
# (a wrong bias correction or a missing eps is off by >1e-3).
ADAMW_FP32 = (1e-5, 1e-6)

# The same fp32 loss computed two ways (reductions in another order: one cross-entropy over all codebooks and a sum
# per codebook, vs one mean per codebook): a few ulps of the loss (measured 5e-7 relative on the default LM) and of
# each gradient entry, whose backward sums the same products in another order. A wrong target position (off by one
# step) moves the loss by ~1e-2 and the gradients by O(1) relative.
LOSS_FP32 = {"loss": (1e-6, 1e-6), "grad": (1e-5, 1e-7)}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}
