"""ppt_fast.app without a browser: names and the working folder, uploads and their limit, references, settings,
progress, the tune worker (stand-in runs for its states, a real tune on the random-init model for cancel), the
library, the page's construction, and that `import ppt_fast` never imports gradio."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

import pytest
import torch

from ppt_fast.app import core
from ppt_fast.app.core import AppError, JobStatus, TuneSettings, Workdir, safe_name
from ppt_fast.audio import AudioError, synth_reference, write_wav
from ppt_fast.tuning import TuneError, TuneProgress

SR = 16000


@pytest.mark.parametrize("name, safe", [
    ("take 1 (final).wav", "take_1_final.wav"), ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\clip.wav", "clip.wav"),
    (".bashrc", "bashrc"), ("..", "file"), ("", "file"), (None, "file"), ("é è.flac", "e_e.flac"), ("<v1>", "v1"),
    ("a/b/.hidden.ppt", "hidden.ppt"), ("x" * 200 + ".wav", "x" * 76 + ".wav"), ("____.wav", "wav"),
    ("名前.wav", "wav"), ("ok-name_1.2.wav", "ok-name_1.2.wav"),
])  # fmt: skip
def test_safe_name(name, safe):
    assert safe_name(name) == safe
    assert "/" not in safe and "\\" not in safe and not safe.startswith(".")


def test_workdir_keeps_every_path_inside(tmp_path):
    w = Workdir(str(tmp_path / "wd"))
    assert all(os.path.isdir(os.path.join(w.root, d)) for d in ("uploads", "runs", "library", "generations"))
    assert w.resolve("uploads/a.wav") == os.path.join(w.root, "uploads", "a.wav")
    for bad in ("../x", "/etc/passwd", "uploads/../../x", str(tmp_path)):
        with pytest.raises(AppError, match="outside the app's working folder"):
            w.resolve(bad)
    os.symlink("/etc", os.path.join(w.root, "uploads", "etc"))
    with pytest.raises(AppError, match="outside"):
        w.resolve("uploads/etc/passwd")
    a, b = w.new_path("uploads", "../x y.wav"), w.new_path("uploads", "x_y.wav")
    assert os.path.basename(a) == "x_y.wav" and os.path.basename(b) == "x_y-2.wav"  # sanitised, unique
    with pytest.raises(AppError, match="no subfolder"):
        w.new_path("..", "x")
    run = w.new_folder("runs", "<v1>")
    assert os.path.dirname(run) == os.path.join(w.root, "runs") and os.path.basename(run).startswith("v1-")


def _cache_file(w: Workdir, name: str, data: bytes) -> str:
    """A file where the web server puts uploads (the working folder's .gradio/)."""
    d = os.path.join(w.root, ".gradio", "abc123")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_uploads_are_checked_copied_and_size_limited(tmp_path):
    w = Workdir(str(tmp_path / "wd"))
    src = _cache_file(w, "my take.wav", b"RIFF" + b"\0" * 996)
    dest = core.import_upload(src, w, max_bytes=1000)
    assert dest == os.path.join(w.root, "uploads", "my_take.wav") and open(dest, "rb").read() == open(src, "rb").read()
    with pytest.raises(AppError, match=r"is 0.0 MB; the app accepts files up to 0.0009 MB .*--max-file-size"):
        core.import_upload(src, w, max_bytes=900)
    with pytest.raises(AppError, match="outside the app's working folder"):
        core.import_upload(__file__, w, max_bytes=10**9)  # a path a request names outside the folder
    with pytest.raises(AppError, match="empty"):
        core.import_upload(_cache_file(w, "e.wav", b""), w, max_bytes=1000)
    with pytest.raises(AppError, match="no file was uploaded"):
        core.import_upload(None, w, max_bytes=1000)
    with pytest.raises(AppError, match="not a regular file"):
        core.import_upload(os.path.join(w.root, "runs"), w, max_bytes=1000)


def test_references_are_checked_like_tune_does(tmp_path):
    w = Workdir(str(tmp_path / "wd"))
    state = core.AppState(w)
    with pytest.raises(AudioError) as e:
        state.use_upload("s", _cache_file(w, "notes.txt", b"not audio\n" * 100))
    msg = core.user_message(e.value, w)
    assert msg.startswith("cannot read 'uploads/notes.txt' as audio") and w.root not in msg
    assert "use a format libsndfile reads" in msg
    assert not os.path.exists(os.path.join(w.root, "uploads", "notes.txt"))  # a refused upload is not kept
    silent = os.path.join(w.root, ".gradio", "silent.wav")
    write_wav(silent, torch.zeros(1, SR * 2), SR, normalize=None)
    with pytest.raises(AudioError, match="is silent"):
        state.use_upload("s", silent)
    ok = os.path.join(w.root, ".gradio", "ok.wav")
    write_wav(ok, synth_reference(2.0, SR, seed=1), SR, normalize=None)
    info = state.use_upload("s", ok)
    assert info.summary() == "uploads/ok.wav: 2.0 s, 16000 Hz, mono" and os.path.isfile(info.spectrogram)
    assert state.session("s").reference == info and state.session("other").reference is None


def test_builtin_clips(tmp_path):
    w = Workdir(str(tmp_path / "wd"))
    path = core.make_builtin_clip("bell", w, seed=2, seconds=3.0)
    assert path == os.path.join(w.root, "builtin", "bell-seed2-3s.wav")
    assert core.check_reference(path, w, spectrogram=False).seconds == pytest.approx(3.0)
    assert core.make_builtin_clip("bell", w, seed=2, seconds=3.0) == path  # made once
    with pytest.raises(AppError, match="no built-in clip 'kazoo'; choose one of violin"):
        core.make_builtin_clip("kazoo", w)
    if importlib.util.find_spec("tinysoundfont") is not None:  # the demo's violin, rendered by the package
        v = core.make_builtin_clip("violin", w, seconds=2.0)
        assert core.check_reference(v, w, spectrogram=False).seconds == pytest.approx(2.0)


def test_models_named_by_the_page(tmp_path):
    assert core.check_model("tiny") == "tiny"
    assert core.check_model(" facebook/musicgen-small ") == "facebook/musicgen-small"  # a hub id: the HF cache
    for path in (str(tmp_path), "/etc", "./weights.pt", "~/models", "hf:/abs/dir", "x.pt"):
        with pytest.raises(AppError, match="is a path on this machine.*ppt-fast app --model"):
            core.check_model(path)
    assert core.check_model(str(tmp_path), offered=("tiny", str(tmp_path))) == str(tmp_path)  # given at launch
    with pytest.raises(AppError, match="choose a model"):
        core.check_model("")


def test_tune_settings_from_the_page():
    s = core.parse_tune_settings(" <v2> ", "tiny", "ppt", 0, 0, 3.0)
    assert s == TuneSettings("<v2>", "tiny", "ppt", None, None, 3)  # 0: the model's defaults
    assert core.parse_tune_settings("<v1>", "tiny", "tokens", 0.01, 5, 0).ratio == 0.01
    with pytest.raises(ValueError, match="one non-empty word without spaces"):
        core.parse_tune_settings("two words", "tiny", "ppt", 0, 5, 0)
    with pytest.raises(AppError, match="recipe 'lora' is not one of ppt, dreamstyler, full, tokens"):
        core.parse_tune_settings("<v1>", "tiny", "lora", 0, 5, 0)
    with pytest.raises(AppError, match=r"ratio must be a fraction in \(0, 1\]"):
        core.parse_tune_settings("<v1>", "tiny", "ppt", 2, 5, 0)
    with pytest.raises(AppError, match=r"steps must be a whole number in \[1, 100000\], got 2.5"):
        core.parse_tune_settings("<v1>", "tiny", "ppt", 0, 2.5, 0)
    with pytest.raises(AppError, match="seed must be"):
        core.parse_tune_settings("<v1>", "tiny", "ppt", 0, 5, -1)
    g = core.parse_generate_settings("  a  piece, <v1> ", 1, 2)
    assert (g.prompt, g.seed, g.duration) == ("a piece, <v1>", 1, 2.0)
    with pytest.raises(AppError, match="between 0.5 and 60 seconds"):
        core.parse_generate_settings("x", 0, 600)


def _run_events(steps: int = 4) -> list[TuneProgress]:
    ev = [TuneProgress("encoding", 0, 1), TuneProgress("encoding", 1, 1, elapsed=0.5)]
    ev += [TuneProgress("sensitivity", i, 8, None if i == 0 else 5.0, 1.0 + i, None if i == 0 else 2.0)
           for i in range(9)]  # fmt: skip
    ev += [TuneProgress("selection", 0, 1, elapsed=10), TuneProgress("selection", 1, 1, elapsed=11)]
    ev += [TuneProgress("training", i, steps, None if i == 0 else 5.0 - i, 11.0 + i, None if i == 0 else 75.0)
           for i in range(steps + 1)]  # fmt: skip
    return ev + [TuneProgress("done", 1, 1, 1.0, 20.0)]


def test_progress_moves_forward_and_reads_well():
    events = _run_events()
    fractions = [core.progress_fraction(p) for p in events]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert core.format_progress(events[-2]) == ("training: step 4 of 4 · loss 1.000 · 15 s elapsed · about 1 min "
                                                "15 s left in this phase")  # fmt: skip
    assert core.format_progress(TuneProgress("selection", 0, 1, elapsed=3.2)) == "choosing the pivots · 3.2 s elapsed"
    assert core.format_progress(events[-1]) == "done in 20 s, last loss 1.000"
    assert core.format_progress(None).startswith("starting")
    page = core.progress_html(JobStatus("failed", events[5], message="failed: <v1> & 'x'"))
    assert "failed: &lt;v1&gt; &amp; &#x27;x&#x27;" in page and 'data-state="failed"' in page and "ppt-error" in page
    assert 'value="0"' in core.progress_html(None) and 'data-state="idle"' in core.progress_html(None)


class _StandIn:
    """A tune() stand-in that reports a scripted run through `progress`, as tuning.tune does, and writes `out`;
    `stop_at` events in, it waits until the job is cancelled (so the test decides when)."""

    def __init__(self, events, fail: BaseException | None = None, stop_at: int | None = None):
        self.events, self.fail, self.stop_at = events, fail, stop_at
        self.reached = threading.Event()
        self.kwargs: dict = {}

    def __call__(self, reference, *, progress, out, **kw):
        self.kwargs = dict(kw, reference=reference)
        for i, p in enumerate(self.events):
            if i == self.stop_at:
                self.reached.set()
                for _ in range(1000):  # until the job is cancelled: the next report raises TuneCancelled
                    progress(p)
                    threading.Event().wait(0.01)
                raise AssertionError("not cancelled")
            progress(p)
            if self.fail is not None and p.phase == "sensitivity" and p.step == 2:
                raise self.fail
        with open(out, "wb") as f:
            f.write(b"concept")


def _job(tmp_path, tune, **settings) -> core.TuneJob:
    w = Workdir(str(tmp_path / "wd"))
    return core.TuneJob("ref.wav", TuneSettings(**settings), w.new_folder("runs", "<v1>"), workdir=w, tune=tune)


def test_tune_job_done_cancelled_failed(tmp_path):
    tune = _StandIn(_run_events(4))
    st = _job(tmp_path, tune, steps=4, ratio=0.01).start().wait(30)
    assert st.state == "done" and st.losses == (4.0, 3.0, 2.0, 1.0) and st.message.startswith("done: 4 steps in")
    assert os.path.isfile(st.concept_path) and os.path.basename(st.concept_path) == "v1.ppt"
    assert os.path.isfile(st.loss_png) and tune.kwargs["verbose"] is False
    assert {k: tune.kwargs[k] for k in ("model", "identifier", "preset", "ratio", "steps", "seed")} == dict(
        model="tiny", identifier="<v1>", preset="ppt", ratio=0.01, steps=4, seed=0)

    tune = _StandIn(_run_events(400), stop_at=20)
    job = _job(tmp_path, tune, steps=400).start()
    assert tune.reached.wait(30) and not job.status().finished
    assert job.cancel()
    st = job.wait(30)
    assert st.state == "cancelled" and st.message.startswith("cancelled at training") and st.concept_path is None
    assert "no concept file was written" in st.message and not os.path.exists(job.concept_path)
    assert not job.cancel()  # already over

    st = _job(tmp_path, _StandIn(_run_events(), fail=TuneError("steps=0 must be >= 1"))).start().wait(30)
    assert (st.state, st.message) == ("failed", "failed: steps=0 must be >= 1")
    st = _job(tmp_path, _StandIn(_run_events(), fail=RuntimeError("boom"))).start().wait(30)
    assert st.state == "failed" and "unexpected error (RuntimeError: boom); this is a bug" in st.message


def test_one_run_at_a_time_per_tab(tmp_path):
    w = Workdir(str(tmp_path / "wd"))
    state = core.AppState(w)
    with pytest.raises(AppError, match="choose a reference first"):
        state.start_tune("s", TuneSettings())
    state.session("s").reference = core.ReferenceInfo("r.wav", "r.wav", 1.0, SR, 1)
    tune = _StandIn(_run_events(400), stop_at=3)
    job = state.start_tune("s", TuneSettings(), tune=tune)
    assert tune.reached.wait(30)
    with pytest.raises(AppError, match="already going in this tab"):
        state.start_tune("s", TuneSettings(), tune=tune)
    assert state.cancel("s") and job.wait(30).state == "cancelled"
    assert not state.cancel("nobody")


def test_cancel_stops_a_real_tune_cleanly(tmp_path):
    """tune()'s progress hook on the random-init model: the run reports every phase, cancelling at the first
    training step stops it, the model is restored and no concept file is written."""
    pytest.importorskip("audiocraft")
    import ppt_fast

    w = Workdir(str(tmp_path / "wd"))
    ref = os.path.join(w.root, "uploads", "ref.wav")
    write_wav(ref, synth_reference(3.0, SR, seed=5), SR, normalize=None)
    model = ppt_fast.load_model("tiny-random")
    before = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    seen: list[TuneProgress] = []

    def tune(reference, **kw):
        kw["model"] = model  # the same run on a model object, to check it is left as it was
        return ppt_fast.tune(reference, **kw)

    job = core.TuneJob(ref, TuneSettings(model="tiny-random", steps=50), w.new_folder("runs", "<v1>"), workdir=w,
                       tune=tune)  # fmt: skip
    real_progress = job._progress

    def progress(p):
        seen.append(p)
        if p.phase == "training" and p.step >= 1:
            job.cancel()
        real_progress(p)

    job._progress = progress
    st = job.start().wait(120)
    assert st.state == "cancelled", st.message
    assert [p.phase for p in seen][:1] == ["encoding"] and {"sensitivity", "selection", "training"} <= {
        p.phase for p in seen}  # fmt: skip
    assert seen[-1].phase == "training" and seen[-1].step == 1 and seen[-1].loss is not None
    assert not os.path.exists(job.concept_path)
    after = dict(model.lm.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # bitwise the model it was
    assert not ppt_fast.identifiers.get_bank(model.lm).identifiers()


def _concept(ident: str, model: str = "tiny"):
    from ppt_fast import Concept
    from ppt_fast.pivots import PivotSet

    piv = PivotSet(["w"], [(4, 4)], torch.tensor([0, 2]), torch.tensor([1, 5], dtype=torch.int32))
    return Concept([ident], {ident: torch.randn(3, 8)}, piv, torch.randn(2), meta={"model": model, "preset": "ppt"})


def test_library_lists_what_concept_info_prints(tmp_path):
    from ppt_fast.concept import ConceptFileError, describe_concept

    w = Workdir(str(tmp_path / "wd"))
    lib = core.Library(w)
    assert core.library_html([]).count("No concept files yet") == 1
    run = w.new_folder("runs", "<v1>")
    c1 = _concept("<v1>")
    c1.save(os.path.join(run, "v1.ppt"))
    src = os.path.join(w.root, ".gradio", "x", "two <v2>.ppt")
    os.makedirs(os.path.dirname(src))
    _concept("<v2>").save(src)
    e2 = lib.add_upload(src, max_bytes=10**6)
    assert e2.name == "library/two_v2.ppt" and e2.identifiers == ("<v2>",) and e2.model == "tiny"
    with pytest.raises(ConceptFileError):
        lib.add_upload(_cache_file(w, "bad.ppt", b"not a concept file"), max_bytes=10**6)
    assert not os.path.exists(os.path.join(w.root, "library", "bad.ppt"))  # refused: not kept
    with pytest.raises(AppError, match="accepts files up to"):
        lib.add_upload(src, max_bytes=10)
    entries = lib.entries()
    assert {e.identifiers for e in entries} == {("<v1>",), ("<v2>",)}
    e1 = next(e for e in entries if e.identifiers == ("<v1>",))
    name = os.path.relpath(os.path.join(run, "v1.ppt"), w.root)
    assert list(e1.lines[:-1]) == describe_concept(c1, name) and e1.lines[-1].endswith(" bytes")
    page = core.library_html(entries)
    assert "&lt;v1&gt;" in page and "<v1>" not in page and 'data-count="2"' in page
    with open(os.path.join(w.root, "library", "broken.ppt"), "wb") as f:
        f.write(b"garbage")
    broken = next(e for e in lib.entries() if e.name == "library/broken.ppt")
    assert broken.error and "unreadable" in broken.label and w.root not in broken.error
    assert core.default_prompt(["<v1>", "<v2>"]) == "<v1>, <v2>, a piece of music"


def test_generation_requests_are_checked_before_any_model_loads(tmp_path):
    w = Workdir(str(tmp_path / "wd"))
    path = os.path.join(w.root, "library", "v1.ppt")
    _concept("<v1>").save(path)

    def no_model(name):
        raise AssertionError("no model is loaded for a refused request")

    cache = core.ModelCache(loader=no_model)
    g = core.GenerateSettings("funky jazz")
    with pytest.raises(AppError, match="does not name <v1>: write the identifier into it"):
        core.generate_pair(cache, w, path, g, model="tiny")
    with pytest.raises(AppError, match="choose one or more concepts"):
        core.play_together(cache, w, [], g, model="tiny")
    with pytest.raises(AppError, match="outside the app's working folder"):
        core.play_together(cache, w, [__file__], g, model="tiny")
    assert core.strip_identifiers("<v1>, funky jazz", ["<v1>"]) == "funky jazz"
    assert core.strip_identifiers("a piece of music, <v1>, <v2>", ["<v1>", "<v2>"]) == "a piece of music"
    assert core.strip_identifiers("v1 synth, v10", ["v1"]) == "synth, v10"


def test_the_page_is_built_offline(tmp_path, monkeypatch):
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("pip install 'ppt_fast[app]'")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # as launch() does: nothing in /tmp/gradio
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from ppt_fast.app import make_state, ui

    page = ui.build(make_state(str(tmp_path / "wd"), models=["/some/checkpoint"]))
    assert page.analytics_enabled is False
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"ref-upload", "tune-btn", "cancel-btn", "tune-progress", "with-audio", "without-audio",
            "concept-file", "library-list", "library-play"} <= ids  # fmt: skip
    model = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "model")
    assert [c[1] for c in model.choices] == ["tiny", "tiny-random", "hf-tiny-random", "/some/checkpoint"]
    t = ui.theme()
    fonts = [*t._font, *t._font_mono]
    assert not any(type(f).__name__ == "GoogleFont" for f in fonts)  # nothing fetched to draw text
    assert "fonts.googleapis" not in t._get_theme_css() and "@import" not in t._get_theme_css()


def test_import_ppt_fast_never_imports_gradio():
    code = ("import sys, ppt_fast, ppt_fast.cli, ppt_fast.app, ppt_fast.app.core; ppt_fast.cli.build_parser(); "
            "print('gradio' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_refuses_bad_app_flags(tmp_path, capsys, monkeypatch):
    from ppt_fast import app as app_pkg
    from ppt_fast import cli

    assert cli.main(["app", "--port", "0"]) == 2
    assert "--port must be in [1, 65535]" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["app", "--workdir", str(tmp_path / "file")]) == 2
    assert "--workdir" in capsys.readouterr().err
    assert cli.main(["app", "--max-file-size", "-1", "--workdir", str(tmp_path / "w")]) == 2
    capsys.readouterr()
    if importlib.util.find_spec("gradio") is not None:  # a port another program holds: the flag to change, no bug
        import socket

        monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # launch() sets both: restored after
        monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            assert cli.main(["app", "--port", str(port), "--workdir", str(tmp_path / "w")]) == 2
        assert f"--port {port} on 127.0.0.1 cannot be opened (in use by another program?)" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else object())
    with pytest.raises(ImportError, match=r"pip install 'ppt_fast\[app\]'"):
        app_pkg.require_gradio()
    assert cli.main(["app", "--workdir", str(tmp_path / "w")]) == 2
    assert "ppt-fast: error: `ppt-fast app` needs Gradio: pip install 'ppt_fast[app]'" in capsys.readouterr().err
