"""A quiet run (issue 29): xFormers' "can't load C++/CUDA extensions" warning, which every import of audiocraft
printed on a CPU torch, is dropped by `import ppt_fast`, and nothing else is."""

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

import ppt_fast  # noqa: F401 - installs the filter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE = (
    "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
    "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.13.0+cpu)\n"
    "  Set XFORMERS_MORE_DETAILS=1 for more details"
)


def _kept(message: str) -> bool:
    logger = logging.getLogger("xformers")
    record = logger.makeRecord("xformers", logging.WARNING, __file__, 1, message, (), None)
    return bool(logger.filter(record))


def test_only_the_extension_notice_is_dropped_and_only_on_a_cpu_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert not _kept(NOTICE)
    assert _kept("WARNING[XFORMERS]: something else")
    assert _kept("xFormers can't load C++/CUDA extensions.")  # not the exact message xformers logs
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA torch: the mismatch matters there, so it is shown
    assert _kept(NOTICE)


@pytest.mark.skipif(importlib.util.find_spec("audiocraft") is None, reason="needs audiocraft")
def test_loading_an_audiocraft_model_prints_nothing():
    code = "import ppt_fast; ppt_fast.load_model('tiny-random')"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XFORMERS_MORE_DETAILS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert (out.stdout, out.stderr) == ("", "")
