"""`python -m ppt_fast ...` is `ppt-fast ...` (and what `torchrun --nproc_per_node N -m ppt_fast tune ...` runs)."""

import sys

from .cli import main

sys.exit(main())
