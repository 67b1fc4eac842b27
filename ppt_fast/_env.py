"""Every `PPT_FAST_*` environment knob, parsed in one place (listed in the README)."""

from __future__ import annotations

import os

BACKENDS = ("ref", "cpp", "cuda", "triton")


def backend_override() -> str | None:
    """`PPT_FAST_BACKEND=ref|cpp|cuda|triton`: force one backend for every op (an error if it cannot run)."""
    value = os.environ.get("PPT_FAST_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"PPT_FAST_BACKEND={value!r} is not one of {', '.join(BACKENDS)} (or 'auto'); unset it or fix it"
        )
    return value


def triton_interpret() -> bool:
    """`TRITON_INTERPRET=1` (Triton's own knob): run Triton kernels on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cache_dir() -> str:
    """`PPT_FAST_CACHE`: where encoded reference clips and rendered data are cached (default ~/.cache/ppt_fast)."""
    return os.environ.get("PPT_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ppt_fast"))


_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def debug_tracebacks() -> bool:
    """`PPT_FAST_DEBUG=1|true|yes|on` (off: unset, 0, false, no, off): `ppt-fast` prints the traceback of a bad-input
    error too, not only its one line (as `--debug` does)."""
    value = os.environ.get("PPT_FAST_DEBUG", "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"PPT_FAST_DEBUG={value!r} is not one of {', '.join(_ON)} (on) or {', '.join(_OFF[1:])} (off); unset it or "
        "fix it"
    )
