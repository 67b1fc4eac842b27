"""report.html (ppt_fast.report_html): escaping, relative paths inside the folder, every referenced file exists, no
external resource; the demo's and the protocol's pages built from their real outputs (stand-in model)."""

from __future__ import annotations

import html
import html.parser
import os
import struct
import types
import urllib.parse

import pytest
import torch

from ppt_fast.audio import synth_reference, write_wav
from ppt_fast.report_html import (
    Clip,
    Figure,
    Link,
    ReportError,
    Section,
    Table,
    loss_curves_png,
    relative_path,
    render_report,
    spectrogram_db,
    spectrogram_png,
    write_report,
)

SR = 16000
EVIL = "<script>alert('x')</script> & \"quoted\""


class _Refs(html.parser.HTMLParser):
    """Every src/href/content attribute and every tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append((tag, v))


def check_page(folder: str, page: str) -> _Refs:
    """The contract: no script, no external reference, every src/href a relative path to an existing file inside
    `folder`. Returns what the page references."""
    p = _Refs()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags  # no script, no external stylesheet
    for _tag, ref in p.refs:
        assert not urllib.parse.urlsplit(ref).scheme and not ref.startswith(("/", "//")), ref
        path = os.path.join(folder, urllib.parse.unquote(ref))
        assert os.path.isfile(path), ref
        root = os.path.realpath(folder)
        assert os.path.commonpath([root, os.path.realpath(path)]) == root, ref
    assert "Content-Security-Policy" in page and "default-src 'none'" in html.unescape(page)
    assert "@import" not in page and "url(" not in page  # no font or stylesheet pulled in by the CSS
    return p


def _files(tmp_path):
    (tmp_path / "clips").mkdir()
    a = tmp_path / "clips" / "a b#1.wav"
    write_wav(str(a), synth_reference(1.0, SR, seed=1), SR, normalize=None)
    spectrogram_png(synth_reference(1.0, SR, seed=1), SR, str(tmp_path / "clips" / "a.png"), title=EVIL)
    loss_curves_png({"ppt": [3.0, 2.5, 2.0], EVIL: []}, str(tmp_path / "loss.png"), title=EVIL)
    (tmp_path / "c.ppt").write_bytes(b"x")
    return "clips/a b#1.wav"


def test_page_escapes_every_string_and_references_files_beside_it(tmp_path):
    wav = _files(tmp_path)
    sections = [
        Section(EVIL, [EVIL, Clip(EVIL, wav, "clips/a.png", caption=EVIL),
                       [Clip("one", wav), Clip("two", wav, "clips/a.png")]]),
        Section("table", [Table([EVIL, "b"], [["0.491 ± 0.015", EVIL], ["n/a", "`code` <b>"]], caption=EVIL),
                          Table([], [["key", "value"]])]),
        Section("fig", [Figure("loss.png", EVIL), Link(EVIL, "c.ppt", note=EVIL)]),
    ]  # fmt: skip
    page = render_report(str(tmp_path), EVIL, sections, intro=EVIL)
    assert "<script>" not in page and "alert(&#x27;x&#x27;)" in page and "&quot;quoted&quot;" in page
    assert "<b>" not in page and "<code>code</code> &lt;b&gt;" in page  # backticks: code; markup stays text
    refs = check_page(str(tmp_path), page)
    assert ("audio", "clips/a%20b%231.wav") in refs.refs  # URL-quoted: a space and a # do not cut the path
    assert page.count("<audio") == 3 and 'preload="auto"' in page
    assert '<td class="num">0.491 ± 0.015</td>' in page  # numbers right-aligned, text not
    path = write_report(str(tmp_path), "t", sections)
    assert path == os.path.join(str(tmp_path), "report.html") and open(path).read().startswith("<!doctype html>")


@pytest.mark.parametrize("bad, why", [("/etc/passwd", "not a path relative"), ("../x.wav", "leaves or re-enters"),
                                      ("clips/../../x.wav", "leaves"), ("clips//a.png", "leaves"),
                                      ("https://example.com/a.wav", "not a path relative"), ("missing.wav", "does not "
                                      "exist"), ("C:\\a.wav", "not a path relative"), ("clips", "does not exist")])
def test_paths_must_be_files_inside_the_folder(tmp_path, bad, why):  # fmt: skip
    _files(tmp_path)
    with pytest.raises(ReportError, match=why):
        relative_path(str(tmp_path), bad)
    with pytest.raises(ReportError):
        render_report(str(tmp_path), "t", [Section("s", [Clip("c", bad)])])


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.wav"
    write_wav(str(outside), synth_reference(1.0, SR), SR, normalize=None)
    folder = tmp_path / "report"
    folder.mkdir()
    os.symlink(outside, folder / "link.wav")
    with pytest.raises(ReportError, match="outside the report's folder"):
        relative_path(str(folder), "link.wav")


def test_table_rows_must_match_the_headers(tmp_path):
    with pytest.raises(ReportError, match="2 cells for 3 columns"):
        render_report(str(tmp_path), "t", [Section("s", [Table(["a", "b", "c"], [["1", "2"]])])])


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_spectrogram_follows_the_signal(tmp_path):
    t = torch.arange(SR) / SR
    tone = torch.sin(2 * torch.pi * 1000.0 * t)[None]  # [1, T]
    db, times, freqs = spectrogram_db(tone, SR)
    assert db.max() == 0 and db.min() >= -80 and len(times) == db.shape[1]
    peak = freqs[db.mean(axis=1).argmax()]
    assert abs(peak - 1000.0) <= SR / 1024  # the loudest bin is the tone's, within one bin
    for shape in ((SR,), (2, SR), (1, 2, SR)):  # [T], [C, T], [1, C, T]
        assert _png_size(spectrogram_png(torch.randn(shape), SR, str(tmp_path / "s.png"))) == (600, 240)
    with pytest.raises(ValueError, match="with samples"):
        spectrogram_db(torch.zeros(0), SR)
    assert _png_size(loss_curves_png({}, str(tmp_path / "empty.png"))) == (650, 360)  # "no loss recorded"


def test_demo_page(tmp_path, monkeypatch):
    """The demo's report.html from its files (stand-in tune result; the musicnn scores are 'n/a' with the reason
    when the tagger is absent, as here)."""
    from ppt_fast import cli
    from ppt_fast.eval import musicnn

    monkeypatch.setattr(musicnn, "is_available", lambda: False)
    out = str(tmp_path)
    ref = synth_reference(3.0, SR, seed=2)
    write_wav(os.path.join(out, "reference.wav"), ref, SR, normalize=None)
    a, b = synth_reference(1.0, SR, seed=3)[None], synth_reference(1.0, SR, seed=4)[None]
    for name, clip in (("with_concept.wav", a[0]), ("without_concept.wav", b[0])):
        write_wav(os.path.join(out, name), clip, SR, normalize=None)
    loss_curves_png({"<v1>": [3.0, 2.0]}, os.path.join(out, "loss.png"))
    (tmp_path / "concept.ppt").write_bytes(b"x")
    result = types.SimpleNamespace(losses=[3.0, 2.0], pivots={"<v1>": types.SimpleNamespace(count=0)},
                                   scope_entries=0, settings={"preset": "tokens"}, train_seconds=0.5)  # fmt: skip
    page = cli._write_demo_report(out, what=EVIL, prompt="a piece of music, <v1>", result=result, ident="<v1>", a=a,
                                  b=b, sample_rate=SR, level="-14.0 LUFS", concept_written=True, png_written=True)
    text = open(page).read()
    refs = check_page(out, text)
    srcs = {r for _, r in refs.refs}
    assert {"reference.wav", "with_concept.wav", "without_concept.wav", "reference.png", "with_concept.png",
            "without_concept.png", "loss.png", "concept.ppt"} == srcs  # fmt: skip
    assert "musicnn" in text and "n/a" in text and "Not measured" in text and "&lt;script&gt;" in text


def test_protocol_page(tmp_path, monkeypatch):
    """run_protocol writes report.html beside results.json: the references, every arm's clips with spectrograms,
    the metrics with ± standard errors and the loss curves (stand-in tune / generate / metrics: the wiring)."""
    pytest.importorskip("tinysoundfont")
    import ppt_fast
    from ppt_fast.eval import dataset, metrics
    from ppt_fast.eval.protocol import Settings, run_protocol

    man = dataset.build(str(tmp_path / "ds"), concepts=["violin"], seconds=4.0, heldout=1, heldout_seconds=2.0,
                        sample_rate=SR)  # fmt: skip
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))

    class _Concept:
        pivots, dense = types.SimpleNamespace(count=5), {}

        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"x" * 10)

    def fake_tune(reference, *, callback=None, steps=None, **kw):
        for i in range(4):
            callback(i, 3.0 - 0.3 * i)
        return _Concept()

    def fake_generate(prompts, *, duration, seed, **kw):
        return 0.1 * torch.randn(len(prompts), 1, int(duration * SR), generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(ppt_fast, "tune", fake_tune, raising=False)
    monkeypatch.setattr(ppt_fast, "generate", fake_generate, raising=False)
    monkeypatch.setattr(ppt_fast, "load_model", lambda *a, **k: types.SimpleNamespace(sample_rate=SR), raising=False)
    monkeypatch.setattr(metrics, "audio_alignment", lambda *a, **k: float(torch.rand((), generator=g)))
    monkeypatch.setattr(metrics, "copying", lambda *a, **k: float(torch.rand((), generator=g)))
    score = lambda *a, **k: metrics.TextAlignmentScore(float(torch.rand((), generator=g)), metrics.TAG_PROXY)
    monkeypatch.setattr(metrics, "text_alignment", score)
    monkeypatch.setattr(metrics, "diversity", lambda *a, **k: float(torch.rand((), generator=g)))
    out = tmp_path / "out"
    s = Settings(duration=1.0, clips_per_prompt=2, prompts=("{}, slow", "{}, fast"), held_in_clips=0)
    report = run_protocol(man, str(out), settings=s, methods=["base", "ppt-1%"], concepts=["violin"])
    text = (out / "report.html").read_text()
    refs = {r for _, r in check_page(str(out), text).refs}
    assert "clips/reference-violin.wav" in refs and "clips/loss-violin.png" in refs
    rows = {r["method"]: r for r in report["results"]}
    assert rows["ppt-1%"]["losses"] == pytest.approx([3.0, 2.7, 2.4, 2.1]) and rows["base"]["losses"] == []
    for r in rows.values():  # one clip per prompt kept, each with its spectrogram, all referenced by the page
        assert len(r["clip_files"]) == 2
        for f in r["clip_files"]:
            assert f in refs and f[:-4] + ".png" in refs
    assert text.count("<audio") == 5  # the reference + 2 arms x 2 prompts
    assert " ± " in text and "audio alignment ↑" in text and "ppt-1%, prompt 2" in text
