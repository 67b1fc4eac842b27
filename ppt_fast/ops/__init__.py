"""The fused ops. Each lives in one file: contract, reference, fake, dispatch."""

from .pivot_grad_norm import pivot_grad_norm
from .select_pivots import select_pivots
from .sensitivity_accumulate import MODES, sensitivity_accumulate
from .sparse_adamw_step import sparse_adamw_step

__all__ = ["MODES", "pivot_grad_norm", "select_pivots", "sensitivity_accumulate", "sparse_adamw_step"]
