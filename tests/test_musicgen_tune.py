import importlib
import math

import pytest
import soundfile as sf
import torch

pytest.importorskip("audiocraft")

from ppt_fast.audio import AudioError, synth_reference, write_wav  # noqa: E402
from ppt_fast.models import load_host, load_model  # noqa: E402

T = importlib.import_module("ppt_fast.tuning")

FAST = dict(model="tiny-random", steps=6, sensitivity_batches=2, batch_size=2, segment_seconds=1.0, verbose=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    # 22.05 kHz stereo: exercises resampling and mixing to the tiny model's 16 kHz mono.
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    a = synth_reference(4.0, 22050, seed=5)
    write_wav(path, torch.cat([a, 0.8 * a]), 22050)
    return str(path)


def _eval_loss(mg, pool_codes, prompt):
    from ppt_fast.eval.default_model import teacher_forced_loss

    return teacher_forced_loss(mg, pool_codes, [prompt] * pool_codes.shape[0])


def test_ppt_loss_down_and_only_trained_entries_change(ref_wav):
    base = {k: v.clone() for k, v in load_model("tiny-random").lm.state_dict().items()}
    r = T.tune_model(
        ref_wav, model="tiny-random", steps=30, sensitivity_batches=2, batch_size=4, segment_seconds=1.0, verbose=False
    )
    lm = r.model.lm
    # Loss on the reference (all segments, the training prompt) goes down against the base model + initial tokens.
    from ppt_fast import reference as data

    enc = data.encode_reference(r.model, ref_wav, segment_seconds=1.0, codec_fingerprint="x", use_cache=False)
    after = _eval_loss(r.model, enc.codes, "a piece of music, <v1>")
    assert r.losses[0] - after > 0.1, (r.losses[0], after)
    # Nothing outside the trained pivots changed, bit for bit; and the pivots did move.
    masks = r.trained.to_masks()
    changed_any = 0
    for name, now in lm.state_dict().items():
        diff = now != base[name]
        if name in masks:
            assert not (diff & ~masks[name]).any(), name
            changed_any += int(diff.sum())
        else:
            assert not diff.any(), name
    assert changed_any > 0.5 * r.trained.count
    piv = r.pivots["<v1>"]
    from ppt_fast.scope import Scope

    scope = Scope.preset("ppt").numel(lm)
    assert scope == sum(3 * lm.dim * lm.dim for n, _ in lm.named_parameters() if n.endswith("self_attn.in_proj_weight"))
    assert piv.count == max(1, round(0.01 * scope))
    for name in piv.names:
        if piv.indices_of(name).numel():
            assert "self_attn.in_proj_weight" in name or "cross_attention.in_proj_weight" in name
    # Self-attention pivots lie in the V rows [2d:3d], cross-attention pivots in K/V [d:3d].
    d = lm.dim
    for name, idx in piv:
        if idx.numel():
            rows = idx.long() // d
            lo = 2 * d if "self_attn" in name else d
            assert rows.min() >= lo and rows.max() < 3 * d
    assert set(r.tokens) == {"<v1>"} and r.tokens["<v1>"].shape == (3, lm.dim)


def test_same_seed_same_result(ref_wav):
    a = T.tune_model(ref_wav, seed=3, **FAST)
    b = T.tune_model(ref_wav, seed=3, **FAST)
    assert a.pivots["<v1>"].equal(b.pivots["<v1>"])
    assert torch.equal(a.tokens["<v1>"], b.tokens["<v1>"])
    sa, sb = a.model.lm.state_dict(), b.model.lm.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.losses == b.losses


def test_activation_checkpointing_same_result(ref_wav):
    """Recomputing activations in backward changes memory, not results; the model's setting is restored."""
    a = T.tune_model(ref_wav, seed=3, **FAST)
    b = T.tune_model(ref_wav, seed=3, activation_checkpointing=True, **FAST)
    assert a.losses == b.losses
    assert torch.equal(a.tokens["<v1>"], b.tokens["<v1>"])
    sa, sb = a.model.lm.state_dict(), b.model.lm.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.model.lm.transformer.checkpointing == "none"


@pytest.mark.parametrize("preset", ["tokens", "dreamstyler", pytest.param("full", marks=pytest.mark.slow)])
def test_presets_train_what_they_say(ref_wav, preset):
    base = load_model("tiny-random").lm.state_dict()
    r = T.tune_model(ref_wav, preset=preset, **FAST)
    now = r.model.lm.state_dict()
    changed = {k for k in now if not torch.equal(now[k], base[k])}
    d = r.model.lm.dim
    if preset == "tokens":
        assert not changed and r.trained.count == 0
    elif preset == "dreamstyler":
        assert changed and all("in_proj_weight" in k for k in changed)
        for name, (lo, hi) in r.dense_rows.items():
            assert "cross_attention" in name and (lo, hi) == (d, 3 * d)
            # Q rows of cross-attention stay frozen; K/V rows are trained in full.
            assert torch.equal(now[name][:d], base[name][:d])
            assert (now[name][d:] != base[name][d:]).float().mean() > 0.9
    else:
        assert len(changed) > 0.8 * len([k for k, v in base.items() if v.is_floating_point()])
    assert not torch.equal(
        r.tokens["<v1>"], T._init_tokens(load_host("tiny-random"), "music", 3, torch.Generator().manual_seed(0))
    )


@pytest.mark.slow  # the roundtrip tests cover several concepts end to end
def test_several_concepts(tmp_path):
    a = tmp_path / "a.wav"
    b = tmp_path / "b.wav"
    write_wav(a, synth_reference(3.0, 16000, seed=1, timbre="pluck"), 16000)
    write_wav(b, synth_reference(3.0, 16000, seed=2, timbre="organ"), 16000)
    r = T.tune_model({"<v1>": str(a), "<v2>": str(b)}, **FAST)
    assert r.identifiers == ["<v1>", "<v2>"]
    p1, p2 = r.pivots["<v1>"], r.pivots["<v2>"]
    assert p1.count == p2.count > 0 and not p1.equal(p2)
    m1, m2, mu = p1.to_masks(), p2.to_masks(), r.trained.to_masks()
    for n in mu:
        assert torch.equal(mu[n], m1[n] | m2[n])
    bank = r.model.lm._ppt_fast_identifier_bank
    assert bank.identifiers() == ["<v1>", "<v2>"]


def _bad(tmp_path, name, audio, sr=16000):
    p = tmp_path / name
    sf.write(str(p), audio.T.numpy(), sr, subtype="FLOAT")
    return str(p)


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(T, "_make_batch", lambda *a, **k: calls.append(1))
    with pytest.raises(AudioError, match="does not exist"):
        T.tune_model(str(tmp_path / "nope.wav"), **FAST)
    with pytest.raises(AudioError, match="silent"):
        T.tune_model(_bad(tmp_path, "s.wav", torch.zeros(1, 32000)), **FAST)
    with pytest.raises(AudioError, match=r"minimum is 1 s"):
        T.tune_model(_bad(tmp_path, "short.wav", synth_reference(0.5, 16000)), **FAST)
    nan = synth_reference(2.0, 16000)
    nan[0, 100] = float("nan")
    with pytest.raises(AudioError, match="NaN"):
        T.tune_model(_bad(tmp_path, "nan.wav", nan), **FAST)
    bad = tmp_path / "bad.wav"
    bad.write_text("hello")
    with pytest.raises(AudioError, match="cannot read"):
        T.tune_model(str(bad), **FAST)
    ok = _bad(tmp_path, "ok.wav", synth_reference(2.0, 16000))
    with pytest.raises(T.TuneError, match="collides"):
        T.tune_model(ok, identifier="<music>", **FAST)
    with pytest.raises(T.TuneError, match="one non-empty word"):
        T.tune_model(ok, identifier="my concept", **FAST)
    with pytest.raises(T.TuneError, match="preset"):
        T.tune_model(ok, preset="lora", **FAST)
    with pytest.raises(T.TuneError, match="ratio"):
        T.tune_model(ok, ratio=1.5, **FAST)
    for bad_prior in (-1.0, float("nan"), float("inf")):
        with pytest.raises(T.TuneError, match=r"prior=.* finite weight >= 0"):
            T.tune_model(ok, prior=bad_prior, **FAST)
    with pytest.raises(T.TuneError, match="prior_clips=0"):
        T.tune_model(ok, prior=1.0, prior_clips=0, **FAST)
    with pytest.raises(T.TuneError, match=r"names the identifier '<v1>'"):
        T.tune_model(ok, prior=1.0, prior_prompts=["jazz, <v1>"], **FAST)
    with pytest.raises(T.TuneError, match=r"names the identifier '<v1>'"):
        T.tune_model(ok, prior=1.0, prior_prompts=["jazz with <v1>."], **FAST)  # glued to punctuation
    with pytest.raises(T.TuneError, match="no prior prompt"):
        T.tune_model(ok, prior=1.0, templates=["{}"], **FAST)
    assert not calls


def test_reference_cache(ref_wav, tmp_path):
    from ppt_fast import reference as data

    mg = load_model("tiny-random")
    a = data.encode_reference(mg, ref_wav, segment_seconds=1.0, codec_fingerprint="fp")
    assert a.cache_path and a.codes.dtype == torch.int64 and a.codes.shape[1:] == (4, 50)
    b = data.encode_reference(mg, ref_wav, segment_seconds=1.0, codec_fingerprint="fp")
    assert b.cache_path == a.cache_path and torch.equal(a.codes, b.codes)
    c = data.encode_reference(mg, ref_wav, segment_seconds=1.0, codec_fingerprint="other")
    assert c.cache_path != a.cache_path
    # 4 s at 1 s windows with 50 % hop -> 7 windows.
    assert a.codes.shape[0] == 7


def test_class_prompts():
    got = T.class_prompts(["a piece of music, {}", "{}, slow", "a {} song", "x, {}, y", "{}", "plain", "{} ,slow"])
    assert got == ["a piece of music", "slow", "a song", "x, y", "plain"]


def test_prior_preservation(ref_wav, monkeypatch):
    """prior > 0: the base model's own clips for the prompts without the identifier are sampled once, before the
    identifier exists, and fitted in every step beside the reference, which keeps the model's loss on them lower
    than tuning without them does."""
    pools = []
    real = T._prior_pool

    def spy(host, prompts, clips, seconds, seed):
        assert not host.identifier_bank().identifiers()  # sampled from the base model, before the tokens
        codes, texts = real(host, prompts, clips, seconds, seed)
        pools.append((list(prompts), clips, seconds, codes, texts))
        return codes, texts

    monkeypatch.setattr(T, "_prior_pool", spy)
    kw = dict(FAST, steps=20, batch_size=4)
    a = T.tune_model(ref_wav, **kw)
    assert not pools and a.prior_losses == [] and a.settings["prior"] == 0.0
    b = T.tune_model(ref_wav, prior=4.0, prior_clips=4, **kw)
    ((prompts, clips, seconds, codes, texts),) = pools
    assert (prompts, clips, seconds) == (["a piece of music"], 4, 1.0)
    assert codes.shape == (4, 4, 50) and texts == ["a piece of music"] * 4
    assert len(b.prior_losses) == 20 and all(math.isfinite(x) for x in b.prior_losses)
    assert b.settings["prior"] == 4.0 and b.settings["prior_prompts"] == ["a piece of music"]
    assert b.settings["prior_clips"] == 4
    assert a.losses[0] == b.losses[0]  # same reference batch before the first update
    base = _eval_loss(load_model("tiny-random"), codes, "a piece of music")
    drift_a = _eval_loss(a.model, codes, "a piece of music") - base
    drift_b = _eval_loss(b.model, codes, "a piece of music") - base
    assert drift_b < 0.5 * drift_a, (drift_a, drift_b)
    # the reference is still learnt
    assert b.losses[-1] < b.losses[0] - 0.05, (b.losses[0], b.losses[-1])
    # preset "tokens" trains nothing the prompts without the identifier read: no prior clips are sampled
    c = T.tune_model(ref_wav, preset="tokens", prior=1.0, **FAST)
    assert len(pools) == 1 and c.settings["prior"] == 0.0 and c.prior_losses == []


def test_default_ratio_per_model(ref_wav):
    assert T.default_ratio("tiny") == 0.001 and T.default_ratio("tiny-random") == 0.01
    assert T.default_ratio("facebook/musicgen-small") == 0.01
    r = T.tune_model(ref_wav, ratio=None, **dict(FAST, steps=0))
    assert r.settings["ratio"] == 0.01
    # presets that select no pivots record no ratio
    assert T.tune_model(ref_wav, preset="tokens", **dict(FAST, steps=0)).settings["ratio"] is None


def test_a_trained_default_gets_its_defaults_however_it_is_passed(tmp_path):
    """A model made by `ppt-fast pretrain` gets the trained default's settings whether it is named ("tiny"), a weights
    file loaded by path, or a MusicGen object loaded from either; before, only the name did, and a candidate's
    weights file was tuned with real MusicGen's (1 % of the pivots, 500 steps of 10-s segments)."""
    from ppt_fast.tiny.pretrain import ASSET

    def numbers(model, **given):
        c = T.TuneConfig(model=model, **given).resolved()
        return c.steps, c.lr, c.token_lr, c.batch_size, c.segment_seconds, c.prior

    want = numbers("tiny")
    assert want[:5] == (150, 1e-4, 5e-3, 4, 2.0)
    copy = tmp_path / "retrained.pt"
    copy.write_bytes(open(ASSET, "rb").read())
    for model in (ASSET, str(copy), load_model("tiny"), load_model(str(copy))):
        assert T.model_kind(model) == "trained"
        assert T.default_ratio(model) == 0.001 and T.TuneConfig(model=model).resolved().ratio == 0.001
        assert numbers(model) == want
    for model in ("tiny-random", load_model("tiny-random")):
        assert T.model_kind(model) == "tiny-random" and T.default_ratio(model) == 0.01
        assert numbers(model)[:5] == (150, 3e-3, 2e-2, 4, 2.0)
    for model in ("facebook/musicgen-small", "musicgen-small-shapes", str(tmp_path / "missing.pt")):
        assert T.model_kind(model) == "other" and T.default_ratio(model) == 0.01
        assert numbers(model)[:5] == (500, 1e-4, 5e-3, 4, 10.0)
    # what the caller passes wins over every default
    given = dict(steps=7, lr=1e-3, token_lr=1e-2, batch_size=2, segment_seconds=1.0, prior=0.5)
    assert numbers(str(copy), **given) == (7, 1e-3, 1e-2, 2, 1.0, 0.5)
    assert T.TuneConfig(model="tiny", count=5).resolved().ratio is None  # count wins over the default ratio


def test_random_twin_moves_the_same_values_to_random_in_scope_entries(ref_wav):
    """The eval's control arm: the concept's deltas, value for value, at other entries of the same tensors' in-scope
    rows; the model the concept was made for ends unchanged."""
    from ppt_fast import tune
    from ppt_fast.eval.default_model import random_twin

    concept = tune(ref_wav, ratio=0.02, **dict(FAST, steps=4))
    model = load_model("tiny-random")
    before = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    concept.apply(model)
    deltas = {n: p.detach() - before[n] for n, p in model.lm.named_parameters() if not torch.equal(p, before[n])}
    concept.remove(model)
    assert all(torch.equal(p, before[n]) for n, p in model.lm.named_parameters())
    assert deltas and all("in_proj_weight" in n for n in deltas)
    moved = random_twin(model, concept, seed=0)
    assert moved == sum(int((d != 0).sum()) for d in deltas.values())
    d = model.lm.dim
    overlap = 0
    for n, p in model.lm.named_parameters():
        change = p.detach() - before[n]
        if n not in deltas:
            assert not change.any(), n
            continue
        # same multiset of values (each added once to a zero-delta entry)
        torch.testing.assert_close(change[change != 0].sort().values, deltas[n][deltas[n] != 0].sort().values)
        rows = change.nonzero()[:, 0]
        lo = 2 * d if "self_attn" in n else d
        assert rows.min() >= lo and rows.max() < 3 * d, n
        overlap += int(((change != 0) & (deltas[n] != 0)).sum())
    assert overlap < 0.1 * moved  # random places, not the concept's
    # a different seed, different places; a dense concept cannot have a twin
    other = load_model("tiny-random")
    random_twin(other, concept, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(other.lm.parameters(), model.lm.parameters()))
    with pytest.raises(ValueError, match="sparse concept"):
        random_twin(load_model("tiny-random"), tune(ref_wav, preset="full", **dict(FAST, steps=1)))


def test_tune_signature_is_tune_config():
    """tune() lists every setting (no **kwargs), each with TuneConfig's default; tune_model refuses unknown ones."""
    import dataclasses
    import inspect

    params = inspect.signature(T.tune).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fields = {f.name: f.default for f in dataclasses.fields(T.TuneConfig)}
    assert set(params) - {"reference", "out"} == set(fields)
    for name, default in fields.items():
        assert params[name].default == default, name
    with pytest.raises(T.TuneError, match="unknown tune setting"):
        T.tune_model("x.wav", stepz=3)


def test_progress_reports_every_phase_and_cancel_leaves_the_model_as_given(ref_wav):
    seen = []
    T.tune_model(ref_wav, progress=seen.append, **dict(FAST, steps=3))
    phases = [p.phase for p in seen]
    assert [ph for i, ph in enumerate(phases) if i == 0 or phases[i - 1] != ph] == list(T.TuneProgress.PHASES)
    train = [p for p in seen if p.phase == "training"]
    assert [p.step for p in train] == [0, 1, 2, 3] and all(p.total == 3 for p in train)
    assert train[0].loss is None and all(p.loss is not None and math.isfinite(p.loss) for p in train[1:])
    assert train[0].eta is None and all(p.eta is not None and p.eta >= 0 for p in train[1:])
    assert [p.step for p in seen if p.phase == "sensitivity"] == [0, 1, 2]
    assert all(b.elapsed >= a.elapsed for a, b in zip(seen, seen[1:]))

    # Cancelled at step 2 of a model object tuned in place: its weights bitwise as given, no identifier left.
    mg = load_model("tiny-random")
    base = {k: v.clone() for k, v in mg.lm.state_dict().items()}

    def cancel(p):
        if p.phase == "training" and p.step == 2:
            raise T.TuneCancelled("stop")

    with pytest.raises(T.TuneCancelled):
        T.tune_model(ref_wav, progress=cancel, **dict(FAST, model=mg, steps=5))
    for k, v in mg.lm.state_dict().items():
        assert torch.equal(v, base[k]), k
    host = load_host(mg)
    assert not host.identifier_bank().has("<v1>")
    assert all(not p.requires_grad for p in mg.lm.parameters())
