"""`ppt-fast` on bad input: every library error class, a corrupt / foreign / unverified concept file, an unwritable
--out: exit code 2 and ONE line `ppt-fast: error: ...`, no traceback; `--debug` / PPT_FAST_DEBUG=1 add the traceback
(still 2); anything else is a bug: exit 1 with the traceback. None of these needs audiocraft: every check runs
before a model is loaded."""

from __future__ import annotations

import importlib
import json
import os
import types

import pytest
import torch

from ppt_fast import PivotSet
from ppt_fast import cli as CLI
from ppt_fast.audio import synth_reference, write_wav
from ppt_fast.cli import main
from ppt_fast.concept import Concept, snapshot_base


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppt-fast: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _concept_file(path, *, fingerprint: bool = True) -> None:
    """A real concept file: a small model, random pivots perturbed as training would, captured with its base."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    m = torch.nn.Linear(6, 4)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in m.named_parameters()}
    piv = PivotSet.from_masks(masks)
    snap = snapshot_base(m, piv)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p[masks[n]] += 1.0
    Concept.capture(m, piv, identifiers=["<v1>"], base=snap if fingerprint else None).save(path)


def _library_errors():
    from ppt_fast._io import CorruptFileError
    from ppt_fast.audio import AudioError
    from ppt_fast.concept import ConceptError, ConceptFileError, FingerprintMismatch
    from ppt_fast.ops.select_pivots import NaNScoresError
    from ppt_fast.pivots import PivotError
    from ppt_fast.scope import ScopeError
    from ppt_fast.tiny.pretrain import PretrainError
    from ppt_fast.tuning import TuneError

    return [ConceptError, ConceptFileError, FingerprintMismatch, AudioError, TuneError, PivotError, ScopeError,
            CorruptFileError, PretrainError, NaNScoresError, CLI.UsageError]  # fmt: skip


ERRORS = [
    *((cls.__name__, lambda cls=cls: cls(f"the {cls.__name__} message; do this instead")) for cls in _library_errors()),
    ("FileNotFoundError", lambda: FileNotFoundError(2, "No such file or directory", "/no/such/ref.wav")),
    ("PermissionError", lambda: PermissionError(13, "Permission denied", "/root/x.ppt")),
    ("IsADirectoryError", lambda: IsADirectoryError(21, "Is a directory", "/tmp")),
    ("NotADirectoryError", lambda: NotADirectoryError(20, "Not a directory", "/etc/hostname/x.wav")),
    ("disk full", lambda: OSError(28, "No space left on device")),
]


def _raising_command(monkeypatch, make):
    def command(args):
        raise make()

    monkeypatch.setattr(CLI, "_cmd_generate", command)


@pytest.mark.parametrize("name, make", ERRORS, ids=[e[0] for e in ERRORS])
def test_every_library_error_is_one_line_exit_2(monkeypatch, capsys, name, make):
    _raising_command(monkeypatch, make)
    argv = ["generate", "x", "--out", "o.wav"]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(make().args[-1]).split(";")[0] in line or make().filename in line
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug_argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("ppt-fast: error")
    monkeypatch.setenv("PPT_FAST_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_value_error_of_our_own_checks_is_exit_2_others_are_bugs(monkeypatch, capsys):
    gen = importlib.import_module("ppt_fast.generation")
    monkeypatch.setattr(CLI, "_cmd_generate", lambda args: gen.generate([], model="tiny-random"))  # our check
    assert main(["generate", "x", "--out", "o.wav"]) == 2
    assert "prompts" in _one_line_error(capsys.readouterr().err)
    monkeypatch.setattr(CLI, "_cmd_generate", lambda args: json.loads("{nope"))  # a ValueError from elsewhere
    assert main(["generate", "x", "--out", "o.wav"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "JSONDecodeError" in err and "please report" in err
    monkeypatch.setattr(CLI, "_cmd_generate", lambda args: [][0])
    assert main(["generate", "x", "--out", "o.wav"]) == 1
    assert "IndexError" in capsys.readouterr().err


@pytest.fixture
def gen_stub(monkeypatch):
    """generate() and load_model() replaced (no audiocraft): records generate's keyword arguments."""
    seen = {}
    gen = importlib.import_module("ppt_fast.generation")
    models = importlib.import_module("ppt_fast.models")
    monkeypatch.setattr(gen, "generate", lambda *a, **k: seen.update(k) or 0.1 * torch.randn(1, 1, 1600))
    monkeypatch.setattr(models, "load_host", lambda *a, **k: types.SimpleNamespace(model=None, sample_rate=16000))
    return seen


def test_corrupt_concept_file(tmp_path, capsys, gen_stub):
    path = tmp_path / "c.ppt"
    _concept_file(path)
    data = bytearray(path.read_bytes())
    data[len(data) - 1 - int(torch.randint(16, ()))] ^= 0x10  # a byte of the last tensor's payload
    path.write_bytes(bytes(data))
    out = tmp_path / "o.wav"
    assert main(["generate", "x", "--concept", str(path), "--out", str(out)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "checksum" in line and str(path) in line and "write it again" in line
    assert not out.exists() and not gen_stub  # refused before any model was loaded
    assert main(["generate", "x", "--concept", str(path), "--out", str(out), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    ref = tmp_path / "ref.wav"
    write_wav(ref, synth_reference(1.0, 16000), 16000)
    assert main(["eval", "--concept", str(path), "--reference", str(ref), "--out", str(tmp_path / "ev")]) == 2
    assert "checksum" in _one_line_error(capsys.readouterr().err)


def test_foreign_file_renamed_ppt(tmp_path, capsys, gen_stub):
    wav = tmp_path / "song.ppt"
    write_wav(wav, synth_reference(0.5, 16000), 16000)
    assert main(["generate", "x", "--concept", str(wav), "--out", str(tmp_path / "o.wav")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "not a readable concept file" in line and str(wav) in line
    folder = tmp_path / "dir.ppt"
    folder.mkdir()
    assert main(["generate", "x", "--concept", str(folder), "--out", str(tmp_path / "o.wav")]) == 2
    assert "is a folder" in _one_line_error(capsys.readouterr().err)


def test_unverified_concept_needs_the_flag(tmp_path, capsys, gen_stub):
    path = tmp_path / "u.ppt"
    _concept_file(path, fingerprint=False)
    out = tmp_path / "o.wav"
    assert main(["generate", "<v1>", "--concept", str(path), "--out", str(out)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "--allow-unverified" in line and str(path) in line and not gen_stub
    assert main(["generate", "<v1>", "--concept", str(path), "--out", str(out), "--allow-unverified"]) == 0
    assert gen_stub["allow_unverified"] is True and out.is_file()
    (c,) = gen_stub["concepts"]
    assert isinstance(c, Concept) and c.unverified_names()  # loaded and checked by the CLI, handed over
    verified = tmp_path / "v.ppt"
    _concept_file(verified)
    gen_stub.clear()
    assert main(["generate", "<v1>", "--concept", str(verified), "--out", str(out)]) == 0
    assert gen_stub["allow_unverified"] is False


@pytest.mark.parametrize("scale", ["nan", "inf", "11", "-1e3"])
def test_bad_scale_refused_before_the_model(tmp_path, capsys, gen_stub, scale):
    assert main(["generate", "x", f"--scale={scale}", "--out", str(tmp_path / "o.wav")]) == 2
    assert "--scale" in _one_line_error(capsys.readouterr().err) and not gen_stub


def test_unwritable_out(tmp_path, capsys, gen_stub, monkeypatch):
    """A path under a regular file (NotADirectory for anyone, root included), a folder as --out: refused before any
    work. A write that fails late anyway (here: /proc, which root cannot write either) is one line too."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "o.wav", tmp_path):
        assert main(["generate", "x", "--out", str(out)]) == 2
        assert "--out" in _one_line_error(capsys.readouterr().err) and not gen_stub
    ref = tmp_path / "ref.wav"
    write_wav(ref, synth_reference(1.0, 16000), 16000)
    tune = importlib.import_module("ppt_fast.tuning")
    monkeypatch.setattr(tune, "tune", lambda *a, **k: pytest.fail("tune ran despite an unwritable --out"))
    for out in (blocker / "c.ppt", tmp_path):
        assert main(["tune", str(ref), "--out", str(out), "--quiet"]) == 2
        assert "--out" in _one_line_error(capsys.readouterr().err)
    assert main(["demo", "--out", str(blocker)]) == 2
    assert "not a folder" in _one_line_error(capsys.readouterr().err)
    assert main(["generate", "x", "--out", "/proc/ppt-fast-test.wav"]) == 2  # no file can be created there, root or not
    assert "--out" in _one_line_error(capsys.readouterr().err) and not gen_stub


def _never(what):
    def reached(*a, **k):
        pytest.fail(f"{what} ran despite an output that cannot be written")

    return reached


@pytest.fixture
def no_work(monkeypatch):
    """Every model loader and long job of the commands replaced by a test failure: a check must refuse first."""
    for module, names in (
        ("ppt_fast.models", ("load_model", "load_host")),
        ("ppt_fast.generation", ("generate",)),
        ("ppt_fast.tuning", ("tune", "tune_model")),
        ("ppt_fast.tiny.pretrain", ("pretrain", "render_clip")),
        ("ppt_fast.eval.dataset", ("build",)),
        ("ppt_fast.eval.protocol", ("evaluate_concept_file", "run_protocol")),
        ("ppt_fast.eval.metrics", ("retrieval",)),
    ):
        mod = importlib.import_module(module)
        for name in names:
            monkeypatch.setattr(mod, name, _never(f"{module}.{name}"))


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_special_file_as_out_is_refused_before_any_model_loads(tmp_path, capsys, no_work, special):
    """`--out /dev/null` (which root could otherwise replace with a file) or a FIFO (a write blocks until someone reads
    it), as the file or as a file inside the output folder of every command that writes: exit 2, one line naming the
    flag and the path, before anything is loaded or computed; the special file is left as it was."""
    if special == "fifo":
        target = str(tmp_path / "pipe")
        os.mkfifo(target)
    else:
        target = special
    ref = tmp_path / "ref.wav"
    write_wav(ref, synth_reference(1.0, 16000), 16000)
    concept = tmp_path / "c.ppt"
    _concept_file(concept)

    def folder_with(name):  # an output folder whose file `name` is the special file
        d = tmp_path / f"with-{name}"
        d.mkdir(exist_ok=True)
        if not os.path.lexists(d / name):
            os.symlink(target, d / name)
        return str(d)

    cases = [
        (["generate", "x", "--out", target], "--out"),
        (["generate", "x", "--concept", str(concept), "--out", target], "--out"),
        (["tune", str(ref), "--out", target, "--quiet"], "--out"),
        (["pretrain", "--quick", "--out", target], "--out"),
        (["pretrain", "--quick", "--out", str(tmp_path / "w.pt"), "--plot", target], "--plot"),
        (["demo", "--out", target], "--out"),
        (["demo", "--out", folder_with("with_concept.wav")], "--out (with_concept.wav)"),
        (["dataset", "build", target], "OUT"),
        (["eval", "--concept", str(concept), "--reference", str(ref), "--out", target], "--out"),
        (["eval", "--concept", str(concept), "--reference", str(ref), "--out", folder_with("results.json")],
         "--out (results.json)"),
        (["eval", "--retrieval", "--dataset", str(tmp_path), "--out", folder_with("retrieval.json")],
         "--out (retrieval.json)"),
    ]  # fmt: skip
    kind = "character device" if special == "/dev/null" else "FIFO"
    for argv, flag in cases:
        assert main(argv) == 2, argv
        line = _one_line_error(capsys.readouterr().err)
        assert line.startswith(f"ppt-fast: error: {flag}: ") and kind in line, (argv, line)
    if special == "fifo":
        assert os.path.exists(target) and not os.path.isfile(target)


@pytest.mark.parametrize("flags, words", [
    (["--duration", "0"], "--duration 0.0 must be a number of seconds in (0, 600]"),
    (["--duration", "1e6"], "--duration 1000000.0 must"),
    (["--resample-silent", "11"], "--resample-silent 11 must be a whole number in [0, 10]"),
    (["--top-p", "1.5"], "--top-p 1.5 must be a number in [0, 1]"),
    (["--temperature", "1e-9"], "--temperature 1e-09 must be 0"),
    (["--seed", "-1"], "--seed -1 must"),
    (["--cfg-coef", "inf"], "--cfg-coef inf must"),
    (["--scale", "nan"], "--scale nan must be a finite number in [-10, 10]"),
    (["--top-k", "-3"], "--top-k -3 must"),
])  # fmt: skip
def test_bad_generation_settings_name_the_flag_before_the_model(tmp_path, capsys, no_work, flags, words):
    out = tmp_path / "o.wav"
    assert main(["generate", "x", "--out", str(out), *flags]) == 2
    assert words in _one_line_error(capsys.readouterr().err) and not out.exists()
    assert main(["generate", "  ", "--out", str(out)]) == 2
    assert "prompt 0 is empty" in _one_line_error(capsys.readouterr().err)


def test_top_p_is_passed_on(tmp_path, gen_stub):
    assert main(["generate", "x", "--out", str(tmp_path / "o.wav"), "--top-p", "0.9"]) == 0
    assert gen_stub["top_p"] == 0.9
    assert main(["generate", "x", "--out", str(tmp_path / "o.wav")]) == 0
    assert gen_stub["top_p"] is None  # the model's own


def test_debug_knob(tmp_path, capsys, monkeypatch, gen_stub):
    """PPT_FAST_DEBUG: 1/true/yes/on show the traceback, 0/false/no/off/unset do not, anything else is refused (one
    line naming the knob, exit 2) before the command runs."""
    from ppt_fast import _env

    _raising_command(monkeypatch, lambda: CLI.UsageError("bad input"))
    argv = ["generate", "x", "--out", str(tmp_path / "o.wav")]
    for value, on in (("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("", False), ("0", False),
                      ("false", False), ("No", False), ("off", False)):  # fmt: skip
        monkeypatch.setenv("PPT_FAST_DEBUG", value)
        assert _env.debug_tracebacks() is on
        assert main(argv) == 2
        assert ("Traceback" in capsys.readouterr().err) is on, value
    monkeypatch.delenv("PPT_FAST_DEBUG")
    assert _env.debug_tracebacks() is False
    monkeypatch.setattr(CLI, "_cmd_generate", lambda args: pytest.fail("ran despite a bad PPT_FAST_DEBUG"))
    for value in ("2", "debug", "y"):
        monkeypatch.setenv("PPT_FAST_DEBUG", value)
        with pytest.raises(ValueError, match="PPT_FAST_DEBUG"):
            _env.debug_tracebacks()
        assert main(argv) == 2
        assert f"PPT_FAST_DEBUG={value!r}" in _one_line_error(capsys.readouterr().err)


def test_eval_refuses_an_unverified_concept_unless_allowed(tmp_path, capsys, monkeypatch):
    """`ppt-fast eval --concept` on a file without a fingerprint: refused before anything is generated (not after the
    base row); `--allow-unverified` reaches generate()."""
    protocol = importlib.import_module("ppt_fast.eval.protocol")
    path = tmp_path / "u.ppt"
    _concept_file(path, fingerprint=False)
    ref = tmp_path / "ref.wav"
    write_wav(ref, synth_reference(1.0, 16000), 16000)
    seen = []

    def evaluate(concepts, references, identifiers, s, prompts=None):
        seen.append((len(concepts), s.allow_unverified))
        return [{"prompt": "p", "clips": 1, "audio_alignment": 0.5, "copying": 0.1, "text_alignment": None,
                 "text_alignment_method": "none", "text_alignment_tags": [], "diversity": None}]  # fmt: skip

    monkeypatch.setattr(protocol, "evaluate", evaluate)
    argv = ["eval", "--concept", str(path), "--reference", str(ref), "--model", "tiny-random", "--out",
            str(tmp_path / "ev")]  # fmt: skip
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "fingerprint" in line and str(path) in line and not seen
    assert main([*argv, "--allow-unverified"]) == 0
    assert seen == [(0, True), (1, True)]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]["allow_unverified"] is True
    capsys.readouterr()


def test_concept_write_failure_in_tune_is_one_line(tmp_path, capsys, monkeypatch):
    """tune() failing to write its concept file (ConceptError, which the CLI used to show as a traceback)."""
    from ppt_fast.concept import ConceptError

    ref = tmp_path / "ref.wav"
    write_wav(ref, synth_reference(1.0, 16000), 16000)
    tune = importlib.import_module("ppt_fast.tuning")

    class Failing:
        def save(self, out):
            raise ConceptError(f"cannot write the concept file {str(out)!r}: [Errno 28] No space left on device; "
                               "choose a writable path")  # fmt: skip

    monkeypatch.setattr(tune, "tune_model", lambda *a, **k: types.SimpleNamespace(identifiers=["<v1>"]))
    monkeypatch.setattr(tune, "_capture", lambda result: [Failing()])
    assert main(["tune", str(ref), "--out", str(tmp_path / "c.ppt"), "--quiet"]) == 2
    assert "No space left" in _one_line_error(capsys.readouterr().err)


def test_is_user_error_classifies():
    from ppt_fast.concept import ConceptError

    assert CLI.is_user_error(ConceptError("x")) and CLI.is_user_error(CLI.UsageError("x"))
    assert CLI.is_user_error(FileNotFoundError(2, "No such file", "a")) and CLI.is_user_error(ImportError("pip"))
    assert not CLI.is_user_error(RuntimeError("bug")) and not CLI.is_user_error(OSError(5, "I/O error"))
    assert CLI.is_user_error(ModuleNotFoundError("No module named 'audiocraft'", name="audiocraft"))
    assert not CLI.is_user_error(ImportError("cannot import name 'gone'", name="ppt_fast.pivots"))  # a broken install
    with pytest.raises(ValueError) as e:
        json.loads("[")
    assert not CLI.is_user_error(e.value)  # raised inside the json module, not by a check of ours
