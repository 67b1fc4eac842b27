import argparse
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ppt_fast.audio import synth_reference, write_wav
from ppt_fast.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_is_fast_and_free_of_audiocraft():
    code = "import sys, ppt_fast.cli; ppt_fast.cli.build_parser(); print('audiocraft' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "ppt_fast.cli", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0
    for word in ("tune", "generate", "demo", "examples:"):
        assert word in res.stdout


def test_help_imports_neither_torch_nor_numpy():
    """`ppt-fast --help` (issue 29): the console script imports ppt_fast.cli, the package root and every command's
    parser (the eval and dataset ones too) and nothing heavy, so it starts in a fraction of a second. Checked by what
    gets imported, not by a clock."""
    code = (
        "import sys, ppt_fast, ppt_fast.cli\n"
        "ppt_fast.cli.build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'audiocraft', 'transformers', 'triton', 'ppt_fast._C')"
        " if m in sys.modules)\n"
        "print(heavy, 'dataset' in ppt_fast.cli.build_parser().format_help())\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True"
    script = os.path.join(os.path.dirname(sys.executable), "ppt-fast")  # the installed console script
    cmd = [script, "--help"] if os.path.exists(script) else [sys.executable, "-m", "ppt_fast.cli", "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "examples:" in res.stdout and res.stderr == ""


def test_error_classes_are_exported_lazily_without_audiocraft():
    """The errors a caller catches are `ppt_fast.<Name>`; reaching them (TuneError's module included) imports
    neither audiocraft nor the heavier modules before they are asked for."""
    code = (
        "import sys, ppt_fast\n"
        "assert 'ppt_fast.concept' not in sys.modules and 'ppt_fast.tuning' not in sys.modules\n"
        "names = ['ConceptError', 'AudioError', 'TuneError', 'GenerateError', 'UnwritablePathError']\n"
        "assert set(names) <= set(ppt_fast.__all__) and set(names) <= set(dir(ppt_fast))\n"
        "classes = [getattr(ppt_fast, n) for n in names]\n"
        "assert all(issubclass(c, ValueError) for c in classes) and issubclass(classes[-1], OSError)\n"
        "print([c.__module__ for c in classes], 'audiocraft' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("['ppt_fast.concept', 'ppt_fast.audio', 'ppt_fast.tuning', "
                                  "'ppt_fast.generation', 'ppt_fast._io'] False")  # fmt: skip
    from ppt_fast import ConceptError
    from ppt_fast.concept import ConceptError as Defined

    assert ConceptError is Defined


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["tune"])  # missing REF and --out: argparse's usage error
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["tune", "x.wav", "--out", "c.ppt", "--preset", "lora"])
    assert e.value.code == 2
    capsys.readouterr()


def test_subcommand_help_explains():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"tune", "generate", "demo"} <= set(sub.choices)
    text = sub.choices["tune"].format_help()
    assert "--identifier" in text and "--ratio" in text and "--preset" in text


def _parsers(parser, path=("ppt-fast",)):
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_help_states_its_default():
    """Every option of every (nested) command with a default (not None, False, an empty list or SUPPRESS) says it in
    its help: `(default 0)`, `(default: %(default)s)`, ... (issue 29)."""
    missing, seen = [], set()
    for where, parser in _parsers(build_parser()):
        seen.add(where)
        formatter = parser._get_formatter()
        for a in parser._actions:
            d = a.default
            if a.help == argparse.SUPPRESS or d is None or d is False or d == argparse.SUPPRESS or d == []:
                continue
            text = formatter._expand_help(a) if a.help else ""
            shown = {str(d), f"{d:g}"} if isinstance(d, float) else {str(d)}
            if "default" not in text or not any(v in text for v in shown):
                missing.append(f"{where} {'/'.join(a.option_strings) or a.dest} (default {d!r}): {text!r}")
        parser.format_help()  # every help page renders
    assert {"ppt-fast tune", "ppt-fast eval", "ppt-fast dataset build"} <= seen, seen
    assert not missing, "\n".join(missing)
    tune = dict(_parsers(build_parser()))["ppt-fast tune"]
    help_of = {a.dest: tune._get_formatter()._expand_help(a) for a in tune._actions if a.help}
    assert "default ppt" in help_of["preset"]
    assert "default" in help_of["lr"] and "0.0001" in help_of["lr"]
    assert "everything random" in help_of["seed"]


def test_bad_inputs_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch):
    pytest.importorskip("audiocraft")
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache"))
    assert main(["tune", str(tmp_path / "missing.wav"), "--out", str(tmp_path / "c.ppt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    silent = tmp_path / "silent.wav"
    write_wav(silent, torch.zeros(1, 32000), 16000)
    assert main(["tune", str(silent), "--out", str(tmp_path / "c.ppt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "silent" in err and "Traceback" not in err
    ok = tmp_path / "ok.wav"
    write_wav(ok, synth_reference(2.0, 16000), 16000)
    assert main(["tune", str(ok), "--identifier", "<music>", "--out", str(tmp_path / "c.ppt"), "--quiet"]) == 2
    assert "collides" in capsys.readouterr().err
    assert main(["generate", "x", "--concept", str(tmp_path / "none.ppt"), "--out", str(tmp_path / "o.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["tune", str(ok), "--model", "facebook/musicgen-nonexistent", "--out", str(tmp_path / "c.ppt")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "HF_HUB_OFFLINE" in err


def test_demo_writes_everything(tmp_path, capsys, monkeypatch):
    pytest.importorskip("audiocraft")
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--duration", "0.4", "--quiet"]) == 0
    text = capsys.readouterr().out
    for f in ("reference.wav", "loss.png", "with_concept.wav", "without_concept.wav", "report.html"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        assert f in text
    for f in ("reference.png", "with_concept.png", "without_concept.png"):  # the spectrograms report.html shows
        assert f'src="{f}"' in (out / "report.html").read_text()
    import soundfile as sf

    a, sr = sf.read(str(out / "with_concept.wav"))
    b, _ = sf.read(str(out / "without_concept.wav"))
    assert sr == 16000 and len(a) == len(b) == int(0.4 * 16000)
    assert (a != b).any()


def test_generate_writes_wav(tmp_path, capsys):
    pytest.importorskip("audiocraft")
    out = tmp_path / "g.wav"
    assert main(["generate", "funky jazz", "--out", str(out), "--duration", "0.3", "--top-k", "16"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


def test_generate_writes_loud_audio_at_the_loudness_target(tmp_path, capsys, monkeypatch):
    """Raw model output far above full scale is written at -14 LUFS with its true peak under -1 dBTP: one gain, so
    the waveform keeps its shape (not clamped)."""
    pytest.importorskip("audiocraft")
    import importlib

    import pyloudnorm
    import soundfile as sf

    gen_mod = importlib.import_module("ppt_fast.generation")  # the module (the package exports a function)

    t = torch.linspace(0, 1, 16000)
    loud = (3.9 * torch.sin(2 * torch.pi * 440 * t)).view(1, 1, -1)
    monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: loud)
    out = tmp_path / "loud.wav"
    assert main(["generate", "x", "--model", "tiny-random", "--out", str(out), "--duration", "1.0"]) == 0
    assert "LUFS" in capsys.readouterr().out
    a, sr = sf.read(str(out))
    assert abs(pyloudnorm.Meter(sr).integrated_loudness(a) + 14.0) < 0.1
    assert abs(a).max() < 10 ** (-1 / 20)
    gain = a.max() / 3.9
    np.testing.assert_allclose(a, loud.view(-1).numpy() * gain, atol=2 / 32768)


@pytest.mark.parametrize("flags, word", [(["--duration", "0"], "--duration 0"), (["--duration", "-2"], "--duration -2"),
                                          (["--resample-silent", "-1"], "--resample-silent -1")])  # fmt: skip
def test_generate_refuses_bad_numbers_with_a_message(tmp_path, capsys, flags, word):
    out = tmp_path / "x.wav"
    assert main(["generate", "x", "--model", "tiny-random", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err and not out.exists()


def test_generate_cli_resamples_silent_clips_by_default(tmp_path, monkeypatch):
    gen_mod = importlib.import_module("ppt_fast.generation")
    seen = {}
    monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: seen.update(k) or torch.zeros(1, 1, 3200))
    assert main(["generate", "x", "--model", "tiny-random", "--out", str(tmp_path / "x.wav"), "--duration", "0.2"]) == 0
    assert seen["resample_silent"] == 2


def test_tune_summary_says_where_the_pivots_pile_up():
    from types import SimpleNamespace

    from ppt_fast.cli import _tune_summary
    from ppt_fast.pivots import PivotSet

    def result(counts):
        names = [f"layers.{i}.v" for i in range(len(counts))]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        idx = torch.cat([torch.arange(c, dtype=torch.int32) for c in counts])
        piv = PivotSet(names, [(100, 10)] * len(counts), offsets, idx)
        return SimpleNamespace(pivots={"<v1>": piv}, scope_entries=4000, lm_entries=10_000, losses=[2.0, 1.0],
                               train_seconds=1.0, settings={})  # fmt: skip

    piled = _tune_summary(result([91, 3, 3, 3]), "<v1>")
    assert "100 pivots" in piled and "91 % of them in layers.0.v" in piled
    assert "of them in" not in _tune_summary(result([25, 25, 25, 25]), "<v1>")
