"""tune() -> concept file -> fresh base model: exact reproduction; generate with and without concepts."""

import importlib

import pytest
import torch

import ppt_fast  # noqa: E402

pytest.importorskip("audiocraft")

from ppt_fast import generate, load_model, tune  # noqa: E402
from ppt_fast.audio import synth_reference, write_wav  # noqa: E402
from ppt_fast.concept import Concept  # noqa: E402

T = importlib.import_module("ppt_fast.tuning")
FAST = dict(model="tiny-random", steps=5, sensitivity_batches=2, batch_size=2, segment_seconds=1.0, verbose=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    write_wav(d / "a.wav", synth_reference(3.0, 16000, seed=1, timbre="pluck"), 16000)
    write_wav(d / "b.wav", synth_reference(3.0, 16000, seed=2, timbre="bell"), 16000)
    return str(d / "a.wav"), str(d / "b.wav")


def _logits(mg, prompt):
    from audiocraft.modules.conditioners import ConditioningAttributes

    codes = torch.randint(0, mg.lm.card, (2, mg.lm.n_q, 25), generator=torch.Generator().manual_seed(7))
    attrs = [ConditioningAttributes(text={"description": prompt}) for _ in range(2)]
    prov = mg.lm.condition_provider
    with torch.no_grad():
        out = mg.lm.compute_predictions(codes, [], prov(prov.tokenize(attrs)))
    return out.logits[out.mask]


def test_fresh_base_plus_concept_file_reproduces_tuned_logits(refs, tmp_path):
    r = T.tune_model(refs[0], **FAST)
    path = tmp_path / "c.ppt"
    T._capture(r)[0].save(path)
    assert ppt_fast.Concept.load(path).meta["host"] == "audiocraft"  # the file records the host
    base = load_model("tiny-random")
    before = _logits(base, "a piece of music")
    Concept.load(path).apply(base.lm)
    for prompt in ("a piece of music, <v1>", "<v1> jazz", "a piece of music"):
        assert torch.equal(_logits(base, prompt), _logits(r.model, prompt)), prompt
    assert not torch.equal(_logits(base, "a piece of music"), before)  # the pivots changed the model itself


def test_same_seed_same_file_bytes(refs, tmp_path):
    a, b = tmp_path / "a.ppt", tmp_path / "b.ppt"
    ca = tune(refs[0], out=a, seed=4, **FAST)
    tune(refs[0], out=b, seed=4, **FAST)
    assert a.read_bytes() == b.read_bytes()
    assert isinstance(ca, Concept) and ca.identifiers == ["<v1>"]
    c = tmp_path / "c.ppt"
    tune(refs[0], out=c, seed=5, **FAST)
    assert c.read_bytes() != a.read_bytes()


def test_generate_with_and_without_concept(refs, tmp_path):
    path = tmp_path / "c.ppt"
    tune(refs[0], out=path, **{**FAST, "steps": 20})
    base = load_model("tiny-random")
    state = {k: v.clone() for k, v in base.lm.state_dict().items()}
    kw = dict(model=base, duration=0.5, seed=3, top_k=32)
    with_c = generate(["a piece of music, <v1>"], concepts=[str(path)], **kw)
    without = generate(["a piece of music, <v1>"], **kw)
    again = generate(["a piece of music, <v1>"], concepts=[str(path)], **kw)
    assert with_c.shape == without.shape == (1, 1, 8000)
    assert torch.isfinite(with_c).all() and torch.isfinite(without).all()
    assert not torch.equal(with_c, without)
    assert torch.equal(with_c, again)  # seeded
    # generate() applies concepts for the call only: the model object is left as it was.
    assert all(torch.equal(v, state[k]) for k, v in base.lm.state_dict().items())
    assert base.lm._ppt_fast_identifier_bank.identifiers() == []


def test_several_concepts_files_and_combined_prompt(refs, tmp_path):
    out = tmp_path / "concepts"
    cs = tune({"<v1>": refs[0], "<v2>": refs[1]}, out=out, **FAST)
    assert [c.identifiers for c in cs] == [["<v1>"], ["<v2>"]]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["v1.ppt", "v2.ppt"]
    audio = generate(
        ["<v1>, <v2>, electronic dance music", "<v2> solo"],
        concepts=[str(out / f) for f in files],
        model="tiny-random",
        duration=0.3,
        seed=1,
        top_k=16,
    )
    assert audio.shape == (2, 1, 4800) and torch.isfinite(audio).all()


def test_unverified_concept_file_generates_only_when_allowed(refs, tmp_path, capsys):
    """A concept file whose fingerprint is removed: `generate()` and `ppt-fast generate` refuse it (before the model
    loads) unless allowed; allowed, it generates exactly what the fingerprinted file does (same pivots, same seed)."""
    from ppt_fast.cli import main
    from ppt_fast.concept import ConceptError

    c = T._capture(T.tune_model(refs[0], **FAST))[0]
    verified, unverified = tmp_path / "v.ppt", tmp_path / "u.ppt"
    c.save(verified)
    c.fingerprint = {}
    c.save(unverified)
    assert Concept.load(unverified).unverified_names() == Concept.load(verified).touched_names()
    kw = dict(model="tiny-random", duration=0.3, seed=2, top_k=16)
    with pytest.raises(ConceptError, match="allow_unverified=True"):
        generate(["<v1> jazz"], concepts=[str(unverified)], **{**kw, "model": "no-such-model"})  # refused first
    a = generate(["<v1> jazz"], concepts=[str(unverified)], allow_unverified=True, **kw)
    assert torch.equal(a, generate(["<v1> jazz"], concepts=[str(verified)], **kw))

    argv = ["generate", "<v1> jazz", "--model", "tiny-random", "--duration", "0.3", "--seed", "2", "--top-k", "16"]
    out_v, out_u = tmp_path / "v.wav", tmp_path / "u.wav"
    assert main([*argv, "--concept", str(unverified), "--out", str(out_u)]) == 2
    assert "--allow-unverified" in capsys.readouterr().err and not out_u.exists()
    assert main([*argv, "--concept", str(verified), "--out", str(out_v)]) == 0
    assert main([*argv, "--concept", str(unverified), "--out", str(out_u), "--allow-unverified"]) == 0
    assert out_u.read_bytes() == out_v.read_bytes()
    capsys.readouterr()


def test_generate_names_clips_that_came_out_silent(monkeypatch, caplog):
    base = load_model("tiny-random")
    loud = torch.sin(torch.linspace(0, 200, 8000)).view(1, 1, -1)
    monkeypatch.setattr(base, "generate", lambda prompts, progress=False: torch.cat([loud, 1e-6 * loud, loud]))
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        audio = generate(["a", "b", "c"], model=base, duration=0.5)
    assert audio.shape == (3, 1, 8000)
    silent = [r.getMessage() for r in caplog.records if "came out silent" in r.getMessage()]
    assert len(silent) == 1 and "clip 1 (prompt 'b')" in silent[0] and "another seed" in silent[0]


def test_generate_resamples_silent_clips_with_the_next_seeds(monkeypatch, caplog):
    base = load_model("tiny-random")
    loud = torch.sin(torch.linspace(0, 200, 8000)).view(1, 1, -1)
    calls = []

    def fake(prompts, progress=False):  # clip 'b' is silent on the first sample only
        calls.append((list(prompts), torch.initial_seed()))
        return torch.cat([(1e-6 if (p == "b" and len(calls) == 1) else 1.0) * loud for p in prompts])

    monkeypatch.setattr(base, "generate", fake)
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        audio = generate(["a", "b", "c"], model=base, duration=0.5, seed=7, resample_silent=2)
    assert calls == [(["a", "b", "c"], 7), (["b"], 8)]  # only the silent prompt, with the next seed
    assert torch.equal(audio, torch.cat([loud, loud, loud])) and not caplog.records

    # a clip that stays silent: every re-sample is tried, then the warning says so
    calls.clear()
    monkeypatch.setattr(base, "generate", lambda prompts, progress=False: calls.append(prompts) or 1e-6 * loud)
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        generate(["b"], model=base, duration=0.5, seed=7, resample_silent=2)
    assert len(calls) == 3
    assert any("still there after 2 re-sample(s)" in r.getMessage() for r in caplog.records)


def test_generate_finds_silent_stretches_inside_clips(monkeypatch, caplog):
    """A clip that is loud overall but silent for 1 s or more is reported (naming where) and re-sampled; a shorter
    gap is music (a rest), left alone."""
    base = load_model("tiny-random")
    sr = base.sample_rate
    loud = torch.sin(torch.linspace(0, 800, 2 * sr)).view(1, 1, -1)
    gap = loud.clone()
    gap[..., sr // 2 : sr // 2 + sr] = 0  # 0.5-1.5 s: two whole half-second windows
    rest = loud.clone()
    rest[..., sr // 2 : sr] = 0  # one window: under SILENT_STRETCH_SECONDS
    calls = []

    def fake(prompts, progress=False):
        calls.append(list(prompts))
        return torch.cat([{"gap": gap, "rest": rest}.get(p, loud) if len(calls) == 1 else loud for p in prompts])

    monkeypatch.setattr(base, "generate", fake)
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        generate(["gap", "rest"], model=base, duration=2.0)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "clip 0 (prompt 'gap') came out silent 0.5-1.5 s" in msgs[0], msgs
    calls.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="ppt_fast.generation"):
        audio = generate(["gap", "rest"], model=base, duration=2.0, seed=3, resample_silent=1)
    assert calls == [["gap", "rest"], ["gap"]] and not caplog.records
    assert torch.equal(audio[0], loud[0]) and torch.equal(audio[1], rest[0])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_generate_refuses_a_bad_resample_count(bad):
    with pytest.raises(ValueError, match="resample_silent"):
        generate(["a"], model=load_model("tiny-random"), duration=0.5, resample_silent=bad)
