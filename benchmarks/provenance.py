"""Where a benchmark number came from: device, CPU/GPU model, library versions, git commit, command line; and the
two measuring helpers every suite shares (a memory-copy reference time and peak memory)."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def device_slug(device: str) -> str:
    """A short file-name-safe tag: 'cpu' or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.startswith("cuda"):
        return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"
    return "cpu"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - an optional package that is missing or broken simply has no version
        return None
    return getattr(mod, "__version__", None)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def ppt_fast_origin() -> dict:
    """Which ppt_fast was imported (a worktree on PYTHONPATH can shadow the repo) and whether its _C loaded."""
    import ppt_fast
    from ppt_fast import _ext

    return {
        "path": str(Path(ppt_fast.__file__).resolve().parent),
        "extension_loaded": _ext.load() is not None,
        "extension_error": _ext.load_error(),
    }


def provenance(device: str, argv: list[str] | None = None) -> dict:
    """Everything needed to tell where and how a result was made."""
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "git_commit": git_commit(),
        "command": " ".join(argv if argv is not None else sys.argv),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("PPT_FAST_", "TRITON_", "OMP_", "PYTHONPATH"))},
    }
    try:
        info["ppt_fast"] = ppt_fast_origin()
    except Exception as exc:  # noqa: BLE001 - provenance must never fail the run
        info["ppt_fast"] = {"error": repr(exc)}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {
            "name": props.name,
            "total_memory": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "driver_cuda": torch.version.cuda,
        }
    return info


# ---- timing helpers ----------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Beyond this many bytes a copy streams through memory at one rate: larger jobs are timed from the rate measured
# once per device at this size (measured here: 33.5 GB/s at 64 MiB, 28.5 at 512 MiB, 19.5 at 2 GiB, 21.1 at 5 GiB).
_STREAM_BYTES = 2 << 30
_STREAM_RATE: dict[str, float] = {}


@functools.lru_cache(maxsize=64)
def copy_seconds(total_bytes: int, device: str, repeats: int = 5) -> float:
    """Median time of `dst.copy_(src)` moving `total_bytes` through memory (src of total_bytes/2 read, the same
    written): the machine's own copy speed for a job of that size, measured in this run. Jobs above 2 GiB use the
    seconds-per-byte of a 2 GiB copy measured once per device in this process (streaming: the rate no longer
    depends on the size; measuring each multi-GB job again cost the CPU suite minutes)."""
    if total_bytes > _STREAM_BYTES:
        if device not in _STREAM_RATE:
            _STREAM_RATE[device] = _measure_copy(_STREAM_BYTES, device, repeats) / _STREAM_BYTES
        return _STREAM_RATE[device] * total_bytes
    return _measure_copy(total_bytes, device, repeats)


def _measure_copy(total_bytes: int, device: str, repeats: int) -> float:
    half = max(1, total_bytes // 2)
    n = max(1, half // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touch both so page faults are not timed
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    times = sorted(times[1:])
    return times[len(times) // 2]


def bandwidth_info(bytes_moved: int, seconds: float, device: str) -> dict:
    """GB/s of the op at its floor byte count, and its speed as a % of a memory copy of the same byte count."""
    copy_s = copy_seconds(int(bytes_moved), device)
    return {
        "bytes_moved": int(bytes_moved),
        "gbps": bytes_moved / seconds / 1e9 if seconds > 0 else float("nan"),
        "copy_seconds": copy_s,
        "copy_gbps": bytes_moved / copy_s / 1e9 if copy_s > 0 else float("nan"),
        "pct_of_copy": 100.0 * copy_s / seconds if seconds > 0 else float("nan"),
    }


def timed_steps(step, n: int, device: str) -> list[float]:
    """Wall time of `n` calls of `step()`, each between device syncs."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ---- peak memory ---------------------------------------------------------------------------------------------------


def memory_mark(device: str) -> int:
    """Start a peak-memory measurement: returns the memory in use now (GPU: allocated bytes; CPU: RSS), the base the
    peak is taken over, and resets the peak counter to it. Callers collect garbage first."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return base
    # The base is the high-water mark right after the reset (the RSS at that moment), so the peak read later can never
    # be below it: reading VmRSS first and resetting after let pages freed in between put the peak 96 KiB under it.
    if reset_peak_rss():
        return peak_rss_bytes()
    return rss_bytes()


def memory_peak(device: str) -> tuple[int, str]:
    """(peak memory since `memory_mark`, what it is: `torch.cuda.max_memory_allocated` or peak RSS (VmHWM))."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    return peak_rss_bytes(), "peak RSS (VmHWM)"


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS)."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since start or since the last `reset_peak_rss()` (VmHWM)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
