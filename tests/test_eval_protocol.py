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
from ppt_fast.synth import read_wav

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
        self.pivots, self.dense = argparse.Namespace(count=7), {}

    def save(self, path):  # the protocol keeps every arm's concept file and reports its size
        with open(path, "wb") as f:
            f.write(b"x" * 100)


def _install_fakes(monkeypatch, calls):
    """tune -> concepts that remember their reference; generate -> verbatim excerpts of the reference of the first
    concept named in the prompt (a maximally overfit 'model'), or noise without concepts."""

    def fake_tune(reference, *, model, identifier, preset, steps, seed, verbose, **kw):
        calls.append(("tune", preset, kw.get("ratio"), kw.get("n_tokens"), isinstance(reference, dict)))
        if isinstance(reference, dict):
            return [_FakeConcept(i, r, preset, kw.get("n_tokens")) for i, r in reference.items()]
        return _FakeConcept(identifier, reference, preset, kw.get("n_tokens"))

    def fake_generate(prompts, *, model, concepts, duration, seed, top_k, allow_unverified):
        assert allow_unverified is False
        calls.append(("generate", tuple(prompts), len(concepts)))
        n = int(duration * SR)
        g = torch.Generator().manual_seed(seed)
        out = []
        for i, p in enumerate(prompts):
            named = [c for c in concepts if c.identifier in p]
            if named:
                ref = torch.from_numpy(read_wav(named[0].reference)[0])
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
    s = Settings(duration=3.2, clips_per_prompt=2, prompts=("{}, slow",), held_in_clips=0)
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
    r = rows[("ppt-1%", "violin")]  # every arm's concept file kept and sized; standard errors over the clips
    assert r["concept_bytes"] == 100 and r["trainable"] == 7 and r["held_in_loss_rise"] is None
    assert r["audio_alignment_n"] == r["copying_n"] == 2 and r["audio_alignment_se"] >= 0
    assert os.path.getsize(tmp_path / "concepts" / "ppt-1%-violin-1.ppt") == 100
    assert rows[("base", "violin")]["concept_bytes"] is None and rows[("base", "violin")]["trainable"] is None


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
    return all(importlib.util.find_spec(m) is not None for m in ("audiocraft", "ppt_fast.concept", "ppt_fast.tuning"))


@pytest.mark.slow
@pytest.mark.integration
@needs_musicnn
@pytest.mark.skipif(not _has_tune_stack(), reason="needs audiocraft and ppt_fast.concept / ppt_fast.tuning")
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


@pytest.mark.integration
@needs_musicnn
@pytest.mark.skipif(not _has_tune_stack() or importlib.util.find_spec("peft") is None, reason="needs audiocraft, peft")
def test_protocol_runs_the_peers_and_their_held_in_cost(manifest, tmp_path, capsys):
    """PEFT's LoRA and SHiRA arms through `ppt-fast eval --protocol` on the random-init model: their adapter / concept
    files, the trainable count, and the held-in cost (base samples under the prompts' text, no identifier)."""
    p = _parser()
    args = p.parse_args(["eval", "--protocol", "--dataset", manifest, "--model", "tiny-random", "--concepts", "violin",
                         "--methods", "base,lora,shira", "--steps", "2", "--clips", "2", "--duration", "3.2",
                         "--prompts", "a piece of music, {}", "--top-k", "32", "--held-in-clips", "1",
                         "--out", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "lora" in printed and "held_in_loss_rise" in printed and "±" in printed and "_clips" not in printed
    report = json.load(open(tmp_path / "results.json"))
    rows = {r["method"]: r for r in report["results"]}
    assert rows["base"]["held_in_loss_rise"] == 0.0
    lora, shira = rows["lora"], rows["shira"]
    assert lora["rank"] == 16 and lora["adapter_bytes"] >= 4 * lora["trainable"]
    assert os.path.exists(tmp_path / "adapters" / "lora-violin" / "adapter_config.json")
    assert shira["adapter_bytes"] is None and "SparseAdamW" in shira["impl"] and shira["trainable"] > 0
    for r in (lora, shira):
        assert isinstance(r["held_in_loss_rise"], float) and r["held_in_loss_rise"] != 0.0
        assert r["concept_bytes"] == os.path.getsize(tmp_path / "concepts" / f"{r['method']}-violin-1.ppt")
    md = (tmp_path / "report.md").read_text()
    assert "| lora |" in md and "| shira |" in md and "PEFT's adapter folder" in md


def test_caveats_follow_what_the_model_is_not_its_name(tmp_path):
    """A weights file from `ppt-fast pretrain` passed by path is the trained default kind of model, as `tiny` is."""
    from ppt_fast.eval.protocol import _caveats, _kind_keys
    from ppt_fast.tiny.pretrain import ASSET

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


# ---------------------------------------------------------------------------------------------------------------------
# Strict JSON: a missing or non-finite score is null, never a bare NaN (issue 22)
# ---------------------------------------------------------------------------------------------------------------------
def _strict_load(path):
    """json.load that refuses NaN / Infinity (what a strict reader, e.g. a browser's JSON.parse, does)."""
    with open(path) as f:
        return json.load(f, parse_constant=lambda name: pytest.fail(f"{path} holds a bare {name}"))


def test_dumps_json_writes_null_for_non_finite():
    from ppt_fast.eval.protocol import dumps_json

    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    x = torch.rand(3, generator=g).tolist()
    obj = {"a": float("nan"), "b": [float("inf"), x[0]], "c": (x[1], -float("inf")), "d": {"e": [x[2], None]},
           "n": 3, "ok": True, "s": "nan"}  # fmt: skip
    back = json.loads(dumps_json(obj), parse_constant=lambda name: pytest.fail(name))
    assert back == {"a": None, "b": [None, x[0]], "c": [x[1], None], "d": {"e": [x[2], None]}, "n": 3, "ok": True,
                    "s": "nan"}  # fmt: skip


def test_results_json_is_strict_and_reads_back(manifest, tmp_path, monkeypatch):
    """A prompt that names no tag word has no text-alignment score (NaN in memory): results.json says null, and the
    report made from the file reads n/a exactly as the one made from memory."""
    from ppt_fast.eval import metrics
    from ppt_fast.eval.protocol import markdown_report

    calls = []
    _install_fakes(monkeypatch, calls)
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    monkeypatch.setattr(metrics, "audio_alignment", lambda *a, **k: float(torch.rand((), generator=g)))
    monkeypatch.setattr(metrics, "copying", lambda *a, **k: float("nan"))
    monkeypatch.setattr(
        metrics, "text_alignment", lambda *a, **k: metrics.TextAlignmentScore(float("nan"), metrics.TAG_PROXY)
    )
    monkeypatch.setattr(metrics, "diversity", lambda *a, **k: float(torch.rand((), generator=g)))
    s = Settings(duration=3.2, clips_per_prompt=2, prompts=("{}, played",), held_in_clips=0)
    report = run_protocol(manifest, str(tmp_path), settings=s, methods=["base", "ppt-1%"], concepts=["violin"])
    on_disk = _strict_load(tmp_path / "results.json")
    for r in on_disk["results"]:
        assert r["text_alignment"] is None and r["copying"] is None
        assert all(p["text_alignment"] is None for p in r["prompts"])
        assert isinstance(r["audio_alignment"], float) and 0 <= r["audio_alignment"] <= 1
    assert markdown_report(on_disk) == markdown_report(report)
    assert "| n/a |" in (tmp_path / "report.md").read_text()


@needs_musicnn
def test_retrieval_json_is_strict(manifest, tmp_path, monkeypatch, capsys):
    from ppt_fast.eval import metrics

    monkeypatch.setattr(
        metrics,
        "retrieval",
        lambda *a, **k: {
            "top1": float("nan"),
            "n": 0,
            "same_mean": float("nan"),
            "different_mean": float("inf"),
            "confusions": [],
        },
    )
    p = _parser()
    args = p.parse_args(["eval", "--retrieval", "--dataset", manifest, "--out", str(tmp_path)])
    assert args.func(args) == 0
    capsys.readouterr()
    r = _strict_load(tmp_path / "retrieval.json")
    assert r["top1"] is None and r["different_mean"] is None and r["n"] == 0


def test_default_model_eval_json_is_strict(tmp_path, monkeypatch):
    """`python -m ppt_fast.eval.default_model`: a figure that comes out NaN is written as null."""
    import types

    import ppt_fast.hosts.audiocraft.build as models
    from ppt_fast.eval import default_model as DM

    monkeypatch.setattr(ppt_fast, "load_model", lambda *a, **k: types.SimpleNamespace(sample_rate=16000))
    monkeypatch.setattr(models, "require_audiocraft", lambda: None)
    monkeypatch.setattr(DM.features, "get_embedder", lambda name: None)
    monkeypatch.setattr(DM, "gallery", lambda names, *a, **k: torch.zeros(len(names), 4))
    monkeypatch.setattr(DM, "text_control", lambda *a, **k: {"top1": float("nan"), "chance": 0.0625,
                                                              "diversity": float("inf")})  # fmt: skip
    out = tmp_path / "eval.json"
    assert DM.main(["--out", str(out), "--skip", "codec,sweep,long,preservation"]) == 0
    data = _strict_load(out)
    assert data["complete"] is True
    assert data["text_control"] == {"top1": None, "chance": 0.0625, "diversity": None}


def test_default_model_eval_refuses_an_unwritable_out_before_the_model(tmp_path, monkeypatch, capsys):
    """`python -m ppt_fast.eval.default_model --out X`: X a folder, a FIFO or under a file exits 2 (argparse's usage
    error naming --out) before audiocraft or the model is loaded; the FIFO is left alone."""
    import ppt_fast.hosts.audiocraft.build as models
    from ppt_fast.eval import default_model as DM

    def never(*a, **k):
        pytest.fail("loaded despite an unwritable --out")

    monkeypatch.setattr(models, "require_audiocraft", never)
    monkeypatch.setattr(ppt_fast, "load_model", never)
    fifo = tmp_path / "eval.json"
    os.mkfifo(fifo)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, words in ((fifo, "FIFO"), (tmp_path, "directory"), (blocker / "eval.json", "not a folder")):
        with pytest.raises(SystemExit) as e:
            DM.main(["--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--out: " in err and words in err and str(out) in err, err
    assert fifo.is_fifo()


def test_eval_package_writes_json_only_through_write_json():
    """Every JSON the eval CLI, protocol and default-model figures write goes through write_json (strict)."""
    import inspect

    from ppt_fast.eval import cli, default_model, protocol

    for mod in (cli, protocol, default_model):
        src = inspect.getsource(mod)
        assert "json.dump(" not in src and "json.dumps(report" not in src, mod.__name__


def test_base_arm_prompts_keep_the_identifier_without_a_warning_per_prompt(caplog):
    """The base arm generates "<v1>" prompts with no concept on purpose; generate()'s "names <v1> but no applied
    concept defines it" is for users, not for the protocol (it printed eight of them per run). Outside the base arm,
    and for a user's own call, the warning stays."""
    from ppt_fast import generate, load_model
    from ppt_fast.eval.protocol import Settings, _generate

    model = load_model("tiny-random")
    s = Settings(model=model, duration=0.3)
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        _generate(["a piece of music, <v1>"], [], s, seed=0)
    assert not [r for r in caplog.records if "no applied concept defines it" in r.getMessage()]
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        generate(["a piece of music, <v1>"], model=model, duration=0.3, seed=0)
    assert [r for r in caplog.records if "no applied concept defines it" in r.getMessage()]
