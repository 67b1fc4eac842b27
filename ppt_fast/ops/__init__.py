"""The three fused ops. Each lives in one file: contract, reference, fake, dispatch."""

from .select_pivots import select_pivots
from .sensitivity_accumulate import MODES, sensitivity_accumulate
from .sparse_adamw_step import sparse_adamw_step

__all__ = ["MODES", "select_pivots", "sensitivity_accumulate", "sparse_adamw_step"]
