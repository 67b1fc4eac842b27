"""The protocol and the CLI: wiring checked with a stand-in tune/generate (fast), then end to end on the tiny
MusicGen (slow)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest
import torch

import ppt_fast
from ppt_fast.eval import cli as eval_cli
from ppt_fast.eval import dataset, musicnn
from ppt_fast.eval.protocol import METHODS, Settings, run_protocol, text_part

pytest.importorskip("tinysoundfont")
needs_musicnn = pytest.mark.skipif(not musicnn.is_available(), reason="pip install --no-deps musicnn==0.1.0")
SR = 16000


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol_ds")
    return dataset.build(str(out), concepts=["violin", "drums"], seconds=8.0, heldout=1, heldout_seconds=4.0,
                         sample_rate=SR)  # fmt: skip


class _FakeConcept:
    def __init__(self, identifier, reference, preset, n_tokens):
        self.identifier, self.reference, self.preset, self.n_tokens = identifier, reference, preset, n_tokens


def _install_fakes(monkeypatch, calls):
    """tune -> concepts that remember their reference; generate -> verbatim excerpts of the reference of the first
    concept named in the prompt (a maximally overfit 'model'), or noise without concepts."""

    def fake_tune(reference, *, model, identifier, preset, steps, seed, verbose, **kw):
        calls.append(("tune", preset, kw.get("ratio"), kw.get("n_tokens"), isinstance(reference, dict)))
        if isinstance(reference, dict):
            return [_FakeConcept(i, r, preset, kw.get("n_tokens")) for i, r in reference.items()]
        return _FakeConcept(identifier, reference, preset, kw.get("n_tokens"))

    def fake_generate(prompts, *, model, concepts, duration, seed, top_k):
        calls.append(("generate", tuple(prompts), len(concepts)))
        n = int(duration * SR)
        g = torch.Generator().manual_seed(seed)
        out = []
        for i, p in enumerate(prompts):
            named = [c for c in concepts if c.identifier in p]
            if named:
                ref = torch.from_numpy(dataset.read_wav(named[0].reference)[0])
                start = 1000 + 7919 * i
                out.append(ref[:, start : start + n])
            else:
                out.append(0.1 * torch.randn(1, n, generator=g))
        return torch.stack(out)

    class _Model:
        sample_rate = SR

    monkeypatch.setattr(ppt_fast, "tune", fake_tune, raising=False)
    monkeypatch.setattr(ppt_fast, "generate", fake_generate, raising=False)
    monkeypatch.setattr(ppt_fast, "load_model", lambda *a, **k: _Model(), raising=False)


@needs_musicnn
def test_protocol_wiring_with_stand_in_model(manifest, tmp_path, monkeypatch):
    calls = []
    _install_fakes(monkeypatch, calls)
    s = Settings(duration=3.2, clips_per_prompt=2, prompts=("{}, slow",))
    report = run_protocol(manifest, str(tmp_path), settings=s, methods=["base", "ppt-1%", "pair-1tok", "pair-3tok"])
    tunes = [c for c in calls if c[0] == "tune"]
    assert ("tune", "ppt", 0.01, 3, False) in tunes and ("tune", "ppt", 0.01, 1, True) in tunes
    rows = {(r["method"], "+".join(r["concepts"])): r for r in report["results"]}
    assert set(rows) == {("base", "violin"), ("base", "drums"), ("ppt-1%", "violin"), ("ppt-1%", "drums"),
                         ("pair-1tok", "violin+drums"), ("pair-3tok", "violin+drums")}  # fmt: skip
    # the stand-in copies the reference: alignment and copying high for ppt, low for base (noise)
    for c in ("violin", "drums"):
        assert rows[("ppt-1%", c)]["audio_alignment"] > rows[("base", c)]["audio_alignment"] + 0.2
        assert rows[("ppt-1%", c)]["copying"] > 0.85 > 0.5 > rows[("base", c)]["copying"]
    pair = rows[("pair-3tok", "violin+drums")]
    # "<v1>, <v2>, ..." -> the stand-in plays <v1> (violin) only: concept 1 dominates, balance is low
    assert pair["audio_alignment[violin]"] > pair["audio_alignment[drums]"]
    assert pair["pair_balance"] == pytest.approx(pair["audio_alignment[drums]"])
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["text_alignment_method"] == "musicnn-tag-proxy"
    md = (tmp_path / "report.md").read_text()
    assert "not CLAP" in md and "default one trained here" in md
    assert "| ppt-1% |" in md and "pair-3tok" in md


def test_text_part():
    assert text_part("<v1>, <v2>, electronic dance music") == "electronic dance music"
    assert text_part("a piece of music, <v1>") == "a piece of music"
    assert text_part("<v1> slow and soft") == "slow and soft"


def test_methods_cover_the_issue():
    assert {"full", "tokens", "ppt-0.1%", "ppt-1%", "ppt-5%", "dreamstyler", "pair-1tok", "pair-3tok"} <= set(METHODS)
    assert {METHODS[m].ratio for m in ("ppt-0.1%", "ppt-1%", "ppt-5%")} == {0.001, 0.01, 0.05}


def _parser():
    p = argparse.ArgumentParser(prog="ppt-fast")
    eval_cli.register(p.add_subparsers(dest="command"))
    return p


def test_cli_dataset_build_and_errors(tmp_path, capsys):
    p = _parser()
    argv = ["dataset", "build", str(tmp_path / "d"), "--seconds", "2", "--heldout", "1", "--heldout-seconds", "1"]
    args = p.parse_args(argv + ["--concepts", "flute,marimba", "--sample-rate", "16000"])
    assert args.func(args) == 0
    assert "flute, marimba" in capsys.readouterr().out
    m = dataset.load_manifest(str(tmp_path / "d"))
    assert m.concepts == ["flute", "marimba"] and m.sample_rate == 16000
    bad = p.parse_args(["dataset", "build", str(tmp_path / "e"), "--concepts", "kazoo"])
    assert bad.func(bad) == 2
    assert "kazoo" in capsys.readouterr().err
    ev = p.parse_args(["eval", "--protocol"])
    assert ev.func(ev) == 2
    assert "--dataset" in capsys.readouterr().err
    ev = p.parse_args(["eval", "--concept", str(tmp_path / "missing.ppt"), "--reference", "x.wav"])
    assert ev.func(ev) == 2


@needs_musicnn
def test_cli_retrieval(manifest, tmp_path, capsys):
    p = _parser()
    args = p.parse_args(["eval", "--retrieval", "--dataset", manifest, "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "top-1 retrieval 1.000 over 2" in out
    assert json.load(open(tmp_path / "retrieval.json"))["top1"] == 1.0


@pytest.mark.slow
@pytest.mark.integration
@needs_musicnn
@pytest.mark.skipif(importlib.util.find_spec("audiocraft") is None, reason="needs audiocraft")
def test_protocol_base_model_generates_and_scores(manifest, tmp_path):
    """The generate -> score half of the protocol on the real tiny MusicGen (no tuning needed)."""
    s = Settings(model="tiny-random", duration=3.2, clips_per_prompt=2, prompts=("{}, slow",), top_k=32)
    report = run_protocol(manifest, str(tmp_path), settings=s, concepts=["drums"], methods=["base"])
    (row,) = report["results"]
    assert -1.0 <= row["audio_alignment"] <= 1.0 and 0.0 <= row["diversity"] <= 2.0
    assert -1.0 <= row["copying"] <= 1.0 and 0.0 <= row["text_alignment"] <= 1.0  # "slow" is an MTT tag
    assert "tiny random-init" in (tmp_path / "report.md").read_text()


def _has_tune_stack() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("audiocraft", "ppt_fast.concept", "ppt_fast.musicgen"))


@pytest.mark.slow
@pytest.mark.integration
@needs_musicnn
@pytest.mark.skipif(not _has_tune_stack(), reason="needs audiocraft and ppt_fast.concept / ppt_fast.musicgen")
def test_protocol_end_to_end_tiny(manifest, tmp_path):
    s = Settings(
        model="tiny-random", steps=2, duration=3.2, clips_per_prompt=2, prompts=("a piece of music, {}",), top_k=32
    )
    methods = ["base", "tokens", "ppt-1%", "dreamstyler", "full", "pair-1tok", "pair-3tok"]
    report = run_protocol(manifest, str(tmp_path), settings=s, concepts=["violin"], methods=methods)
    assert len(report["results"]) == 7
    for r in report["results"]:
        for key in ("text_alignment", "diversity"):
            assert key in r
        aligns = [v for k, v in r.items() if k.startswith("audio_alignment")]
        assert aligns and all(-1.0 <= a <= 1.0 for a in aligns)
    assert os.path.exists(tmp_path / "report.md")
    assert "tiny random-init" in (tmp_path / "report.md").read_text()


def test_caveats_follow_what_the_model_is_not_its_name(tmp_path):
    """A weights file from `ppt-fast pretrain` passed by path is the trained default kind of model, as `tiny` is."""
    from ppt_fast.eval.protocol import _caveats, _kind_keys
    from ppt_fast.musicgen.pretrain import ASSET

    copy = tmp_path / "retrained.pt"
    copy.write_bytes(open(ASSET, "rb").read())
    assert _kind_keys("tiny") == _kind_keys(str(copy)) == {"tiny_model": True, "model_kind": "trained"}
    assert _kind_keys("tiny-random") == {"tiny_model": True, "model_kind": "tiny-random"}
    assert _kind_keys("facebook/musicgen-small") == {"tiny_model": False, "model_kind": "other"}
    trained = " ".join(_caveats({"model_kind": "trained"}))
    assert "small default one trained here" in trained and "random-init" not in trained
    assert "random-init" in " ".join(_caveats({"model_kind": "tiny-random"}))
    assert not any("trained here" in n or "random-init" in n for n in _caveats({"model_kind": "other"}))
    # reports written before model_kind existed read as before
    assert "trained here" in " ".join(_caveats({"model": "tiny", "tiny_model": True}))
    assert "random-init" in " ".join(_caveats({"model": "tiny-random", "tiny_model": True}))
