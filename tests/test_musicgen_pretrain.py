"""The embedded default model: mel-RVQ codec, corpus descriptions, resumable pretraining, checked weights files."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("audiocraft")

from ppt_fast.tiny import pretrain as P  # noqa: E402
from ppt_fast.tiny.melcodec import (  # noqa: E402
    MelCodecConfig,
    MelRVQCodec,
    beam_encode,
    greedy_encode,
    mel_triangles,
    refine_codebooks,
)

SMALL = MelCodecConfig(n_mels=64, bins=16, griffin_lim_iters=8)


def _tone(seconds=1.0, f=440.0, sr=16000, harmonics=4):
    t = torch.arange(int(seconds * sr)) / sr
    return sum(0.3 / k * torch.sin(2 * torch.pi * f * k * t) for k in range(1, harmonics + 1)).view(1, 1, -1)


def test_triangles_partition_unity():
    tri = mel_triangles(16000, 1024, 256)
    assert tri.shape == (256, 513)
    torch.testing.assert_close(tri.sum(0), torch.ones(513), atol=1e-5, rtol=0)
    # Below ~100 Hz, 256 mel centres are closer than the 15.6-Hz bins: a few bands catch no bin. Their feature is a
    # constant (log of the floor) and decoding never reads them (zero weight on every bin).
    assert int((tri.sum(1) == 0).sum()) <= 8


def test_codec_interface_and_determinism():
    from audiocraft.models.encodec import CompressionModel

    codec = MelRVQCodec(SMALL)
    assert isinstance(codec, CompressionModel)
    frames = torch.cat([codec.log_mel(_tone(1.0, f))[0] for f in (220.0, 330.0, 440.0, 660.0)])
    codec.fit(frames, iters=3, seed=0)
    x = _tone(0.5, 330.0)
    codes, scale = codec.encode(x)
    assert scale is None and codes.shape == (1, SMALL.n_q, 25) and codes.dtype == torch.long
    assert int(codes.max()) < SMALL.bins
    y = codec.decode(codes)
    assert y.shape == (1, 1, 25 * SMALL.hop) and torch.isfinite(y).all()
    assert torch.equal(y, codec.decode(codes)) and torch.equal(codes, codec.encode(x)[0])
    assert codec.frame_rate == 50 and codec.cardinality == 16 and codec.num_codebooks == SMALL.n_q
    res = codec(_tone(0.51, 330.0))  # audiocraft's forward(): QuantizedResult at the input's length
    assert res.x.shape == (1, 1, 8160) and res.codes.shape == (1, SMALL.n_q, 25)
    assert float(res.bandwidth) == pytest.approx(4 * 4 * 50 / 1000)
    with pytest.raises(ValueError, match="mono"):
        codec.encode(torch.zeros(1, 2, 16000))


def test_decoding_caps_out_of_range_frames_and_keeps_the_rest(monkeypatch):
    codec = MelRVQCodec(SMALL)
    frames = torch.cat([codec.log_mel(_tone(1.0, f))[0] for f in (220.0, 330.0, 440.0)])
    codec.fit(frames, iters=3, seed=0)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 20, SMALL.n_mels, generator=g).clamp(-3, 3)  # inside the ceiling: decoded as before
    loud = z.clone()
    loud[0, 7:10] += 9.0  # what an LM's unusual code combination can sum to
    capped, in_range = codec.synthesise(loud), codec.synthesise(z)
    assert torch.equal(codec.synthesise(loud.clamp(max=MelRVQCodec.Z_CEILING)), capped)
    monkeypatch.setattr(MelRVQCodec, "Z_CEILING", float("inf"))  # no cap
    assert torch.equal(codec.synthesise(z), in_range)
    uncapped = codec.synthesise(loud)
    assert float(uncapped.abs().max()) > 20 * float(capped.abs().max())  # e^(9 x std) is far above the capped burst


def test_codec_residual_levels_reduce_error():
    codec = MelRVQCodec(SMALL)
    frames = torch.cat([codec.log_mel(_tone(1.0, f, harmonics=h))[0] for f in (200.0, 310.0, 520.0) for h in (1, 3)])
    fit = codec.fit(frames, iters=4, seed=1)
    e = fit["residual_energy"]
    assert all(b < a for a, b in zip(e, e[1:])) and e[-1] < 0.5


def test_codec_packed_state_round_trip_and_checks():
    """The weights file stores the codebooks as int8 + one scale per code vector: each entry within scale / 2,
    standardisation exact, the same codes for the fitted frames, and a state of another shape is refused."""
    codec = MelRVQCodec(SMALL)
    frames = torch.cat([codec.log_mel(_tone(1.0, f, harmonics=h))[0] for f in (200.0, 310.0, 520.0) for h in (1, 3)])
    codec.fit(frames, iters=4, seed=1)
    packed = codec.packed_state()
    assert packed["codebooks_int8"].dtype == torch.int8 and "bands" not in packed
    other = MelRVQCodec(SMALL)
    other.load_packed_state(packed)
    err = (other.codebooks - codec.codebooks).abs()
    assert bool((err <= packed["codebooks_scale"][..., None] / 2 + 1e-7).all()) and float(err.max()) > 0
    assert torch.equal(other.mean, codec.mean) and torch.equal(other.std, codec.std)
    x = _tone(0.5, 310.0, harmonics=3)
    z = codec.features(x)  # coding error through each codec's own encode + decode
    e_full = float((codec.decode_latent(codec.encode(x)[0]) - z).pow(2).mean())
    e_packed = float((other.decode_latent(other.encode(x)[0]) - z).pow(2).mean())
    bound = float(packed["codebooks_scale"].amax(1).sum() / 2) ** 2  # each level's vector within scale / 2
    assert e_packed <= e_full + bound and bound < 1e-2 * float(z.pow(2).mean())
    with pytest.raises(ValueError, match="codebooks_int8.*shape"):
        MelRVQCodec(replace(SMALL, bins=32)).load_packed_state(packed)
    with pytest.raises(ValueError, match="lacks 'std'"):
        other.load_packed_state({k: v for k, v in packed.items() if k != "std"})


def _coding_error(x, codebooks, codes):
    return ((x - sum(codebooks[k][codes[:, k]] for k in range(codebooks.shape[0]))) ** 2).sum(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_encode_against_exhaustive_search_and_greedy(seed):
    """A beam as wide as all partial paths (C^(K-1)) is exhaustive search: its error is the minimum over all C^K
    code tuples; beam 1 is greedy, code for code; a beam in between is on average no worse than greedy."""
    g = torch.Generator().manual_seed(seed)
    k_levels, c, d = 3, 5, 6
    codebooks = torch.randn(k_levels, c, d, generator=g) * torch.tensor([1.0, 0.6, 0.3]).view(-1, 1, 1)
    x = torch.randn(300, d, generator=g)
    grid = torch.cartesian_prod(*[torch.arange(c)] * k_levels)  # [C^K, K]
    best = torch.stack([_coding_error(x, codebooks, t.expand(x.shape[0], -1)) for t in grid], 1).min(1).values
    exact = beam_encode(x, codebooks, beam=c ** (k_levels - 1), chunk=77)  # chunking must not matter
    torch.testing.assert_close(_coding_error(x, codebooks, exact), best, rtol=1e-5, atol=1e-5)
    greedy = greedy_encode(x, codebooks)
    assert torch.equal(beam_encode(x, codebooks, beam=1), greedy)
    e_greedy, e_beam = _coding_error(x, codebooks, greedy), _coding_error(x, codebooks, beam_encode(x, codebooks, 3))
    assert float(e_beam.mean()) < float(e_greedy.mean()) and float(best.mean()) <= float(e_beam.mean())


def test_codec_encodes_with_its_beam_and_refinement_lowers_coding_error():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=g) * 3
    frames = centres[torch.randint(0, 12, (3000,), generator=g)] + torch.randn(3000, 16, generator=g)
    cfg = MelCodecConfig(n_mels=16, n_q=3, bins=8, encode_beam=4)
    codec = MelRVQCodec(cfg)
    fit = codec.fit(frames, iters=4, seed=0, refine_passes=3)
    errs = fit["refined_error"]
    assert len(errs) == 4 and all(b <= a for a, b in zip(errs, errs[1:])) and errs[-1] < 0.995 * errs[0]
    z = (frames - codec.mean) / codec.std
    codes = codec._quantize(z[None])[0].T  # the codec's own encoder: the beam of its config
    assert torch.equal(codes, beam_encode(z, codec.codebooks, 4))
    recorded = float(_coding_error(z, codec.codebooks, codes).sum() / (z**2).sum())
    assert recorded == pytest.approx(errs[-1], rel=1e-4)  # the figure reported is the encoder's, not the fit's
    again = codec.codebooks.clone()
    assert refine_codebooks(z, again, 0, beam=4) == pytest.approx([errs[-1]], rel=1e-4)


def test_configs_written_before_a_key_existed_still_match():
    """tiny-v2's weights file has no `encode_beam` / `codec_refine_passes`: read as their defaults (greedy, none)."""
    old = P.PretrainConfig().to_dict()
    del old["codec"]["encode_beam"], old["codec_refine_passes"]
    then = replace(P.PretrainConfig(), codec=replace(P.PretrainConfig().codec, encode_beam=1), codec_refine_passes=0)
    P._check_config(old, then, "w.pt", "weights file")
    with pytest.raises(P.PretrainError, match="differs in codec, codec_refine_passes"):
        P._check_config(old, P.PretrainConfig(), "w.pt", "weights file")


def test_corpus_descriptions_name_the_instrument_and_vary():
    g = torch.Generator().manual_seed(0)
    texts = {P.describe("cello", P.clip_seed("cello", 0, i), g) for i in range(12)}
    assert len(texts) >= 6
    assert all(any(w in t for w in P.INSTRUMENT_WORDS["cello"]) for t in texts)
    assert not set(P.TRAIN_CONCEPTS) & set(P.HELDOUT_CONCEPTS)
    assert len(P.TRAIN_CONCEPTS) >= 12


def _run(tmp_path, cfg=P.QUICK, name="w", **kw):
    return P.pretrain(cfg, out=str(tmp_path / f"{name}.pt"), workdir=str(tmp_path / name), verbose=False, **kw)


def test_pretrain_quick_end_to_end_and_resume_is_exact(tmp_path):
    full = _run(tmp_path, name="a")
    assert full["corpus"]["clips"] == len(P.QUICK.train_concepts) * P.QUICK.clips
    stopped = _run(tmp_path, name="b", stop_after=3)  # an interruption after step 3 (last checkpoint: step 2)
    assert stopped["stopped_at"] == 3 and not (tmp_path / "b.pt").exists()
    _run(tmp_path, name="b")  # resumes from step 2
    a = P.load_trained(str(tmp_path / "a.pt"))
    b = P.load_trained(str(tmp_path / "b.pt"))
    for (k, va), vb in zip(a.lm.state_dict().items(), b.lm.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.sample_rate == 16000
    a.set_generation_params(duration=0.4, top_k=8)
    torch.manual_seed(0)
    audio = a.generate(["piano, slow"])
    assert audio.shape == (1, 1, 6400) and torch.isfinite(audio).all()
    # max_duration is the LM's training segment; longer clips are generated in windows (audiocraft's extension)
    assert a.max_duration == P.QUICK.segment_seconds
    a.set_generation_params(duration=2.5, top_k=8)
    audio = a.generate(["piano, slow"])
    assert audio.shape == (1, 1, 40000) and torch.isfinite(audio).all()


def test_corrupted_checkpoint_and_mismatched_config_are_refused(tmp_path):
    _run(tmp_path, name="c", stop_after=2)
    ckpt = tmp_path / "c" / "checkpoint.pt"
    data = ckpt.read_bytes()
    with pytest.raises(P.PretrainError, match="different pretraining config.*lr"):
        _run(tmp_path, cfg=replace(P.QUICK, lr=1e-4), name="c")
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(P.PretrainError, match="corrupted or truncated.*delete it"):
        _run(tmp_path, name="c")
    tampered = bytearray(data)
    tampered[-100] ^= 0xFF
    ckpt.write_bytes(bytes(tampered))
    with pytest.raises(P.PretrainError, match="corrupted or truncated"):
        _run(tmp_path, name="c")
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(P.PretrainError, match="not a ppt_fast pretraining checkpoint"):
        _run(tmp_path, name="c")
    _run(tmp_path, name="c", fresh=True)  # --fresh starts over
    assert (tmp_path / "c.pt").exists()


def test_weights_file_checks(tmp_path):
    from ppt_fast._io import CorruptFileError

    _run(tmp_path, name="d")
    path = tmp_path / "d.pt"
    with pytest.raises(P.PretrainError, match="different pretraining config"):
        P.load_trained(str(path), expected=replace(P.QUICK, steps=7))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="corrupted or truncated"):
        P.load_trained(str(bad))
    with pytest.raises(FileNotFoundError, match="ppt-fast pretrain"):
        P.load_trained(str(tmp_path / "missing.pt"))
    from ppt_fast import load_model

    m = load_model(str(path), device="cpu")
    assert m.lm._ppt_fast_identifier_bank is not None


@pytest.mark.skipif(not os.path.isfile(P.ASSET), reason="the default model's weights are not in this checkout")
def test_shipped_default_model():
    import json

    from ppt_fast import load_model

    m = load_model("tiny", device="cpu")
    assert m.name == "tiny" and m.sample_rate == 16000
    assert os.path.getsize(P.ASSET) <= 20 * 2**20
    meta = json.loads(open(os.path.splitext(P.ASSET)[0] + ".json").read())
    assert meta["config"] == P.PretrainConfig().to_dict() and meta["seed"] == 0
    assert not set(meta["config"]["train_concepts"]) & set(meta["config"]["heldout_concepts"])
    assert m._ppt_fast_sampling == {"top_k": 64, "cfg_coef": 1.0, "temp": 0.85}  # what generate() uses by default


def test_default_model_figures_on_a_quick_model(tmp_path):
    """The figure code (gallery, codec round trip, text control) runs on a toy model and returns sane fractions."""
    from ppt_fast.eval import default_model as DM
    from ppt_fast.eval import features, musicnn

    if not musicnn.is_available():
        pytest.skip("musicnn checkpoint not installed")
    _run(tmp_path, name="e")
    model = P.load_trained(str(tmp_path / "e.pt"))
    emb = features.get_embedder("musicnn")
    names = list(P.QUICK.train_concepts)
    table = DM.gallery(names, model.sample_rate, emb, seconds=4.0)
    assert table.shape == (len(names), 200)
    torch.testing.assert_close(table.norm(dim=1), torch.ones(len(names)))
    rt = DM.codec_roundtrip(model, names, table, emb, clips=1, seconds=3.0)
    assert rt["n"] == len(names) and 0.0 <= rt["top1_codec"] <= 1.0
    assert rt["top1_original"] >= 2 / 3  # the embedder tells piano, flute and drums apart on the originals
    tc = DM.text_control(model, names, table, emb, clips=2, duration=1.0, top_k=8)
    rows = DM.sampling_sweep(model, names, table, emb, grid=((8, 0.7), (4, 1.0)), clips=1, duration=1.0)
    assert [(r["top_k"], r["temperature"]) for r in rows] == [(8, 0.7), (4, 1.0)]
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows)
    lc = DM.long_clips(model, names, table, emb, clips=1, seconds=2.0, window=1.0)
    assert len(lc["windowed"]) == len(lc["single_pass"]) == 2 and all(0.0 <= x <= 1.0 for x in lc["windowed"])
    assert model.max_duration == P.QUICK.segment_seconds == lc["max_duration"]  # restored after the single pass
    assert tc["n"] == 2 * len(names) and 0.0 <= tc["top1"] <= 1.0 and tc["chance"] == pytest.approx(1 / 3)
    # held-in set and teacher-forced loss: new compositions, right and wrong words, a mean over clips that does not
    # depend on the batching
    held, right, wrong = DM.held_in_set(model, names, clips=2, seconds=2.0, seed=3)
    assert held.shape[:2] == (2 * len(names), model.lm.num_codebooks) and held.shape[2] == round(2.0 * model.frame_rate)
    assert right == [P.INSTRUMENT_WORDS[n][0] for n in names for _ in range(2)]
    assert all(r != w for r, w in zip(right, wrong)) and sorted(set(wrong)) == sorted(set(right))
    a = DM.teacher_forced_loss(model, held, right, batch=8)
    b = DM.teacher_forced_loss(model, held, right, batch=1)
    assert a == pytest.approx(b, rel=1e-5) and 0 < a < 2 * math.log(model.lm.card)


@pytest.mark.parametrize("flag", ["--clips", "--text-clips", "--preservation-clips"])
def test_default_model_eval_refuses_clip_counts_below_one(flag, capsys):
    from ppt_fast.eval import default_model as DM

    with pytest.raises(SystemExit):
        DM.main([flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("rows,msg", [("ppt,bogus", "unknown row(s) ['bogus']"), ("base,twin", "add ppt")])
def test_default_model_eval_refuses_bad_rows(rows, msg, capsys):
    from ppt_fast.eval import default_model as DM

    with pytest.raises(SystemExit):
        DM.main(["--rows", rows])
    assert msg in capsys.readouterr().err


def test_default_model_eval_runs_every_part_in_one_invocation(tmp_path, monkeypatch):
    """main()'s plumbing with the measurements faked: every part runs in one invocation, the preservation rows get
    their methods (a sweep once shadowed them and `make eval-default` failed after 15 min), and a part that fails
    leaves the finished ones on disk, marked incomplete."""
    import json
    import types

    import ppt_fast
    from ppt_fast.eval import dataset as D
    from ppt_fast.eval import default_model as DM

    seen = {}
    monkeypatch.setattr(ppt_fast, "load_model", lambda *a, **k: types.SimpleNamespace(sample_rate=16000))
    monkeypatch.setattr(DM.features, "get_embedder", lambda name: None)
    monkeypatch.setattr(DM, "gallery", lambda names, *a, **k: torch.zeros(len(names), 4))
    per = {n: 1.0 for n in (*P.TRAIN_CONCEPTS, *P.HELDOUT_CONCEPTS)}
    monkeypatch.setattr(DM, "codec_roundtrip", lambda *a, **k: {"per_instrument": per, "top1_codec": 1.0,
                                                                 "top1_original": 1.0})  # fmt: skip
    monkeypatch.setattr(DM, "sampling_sweep", lambda *a, **k: [{"top_k": 64, "temperature": 0.7, "top1": 0.5}])
    monkeypatch.setattr(DM, "long_clips", lambda *a, **k: {"windowed": [0.5]})
    monkeypatch.setattr(DM, "text_control", lambda *a, **k: {"top1": 0.5, "chance": 0.06, "diversity": 0.3})
    monkeypatch.setattr(D, "build", lambda path, **k: path)
    monkeypatch.setattr(D, "load_manifest", lambda ds: types.SimpleNamespace(reference_path=lambda name: "ref.wav"))

    def preservation(model, ref, *a, methods, **k):
        seen["methods"] = [m[0] for m in methods]
        if seen.get("fail"):
            raise RuntimeError("preservation failed")
        return {"rows": []}

    monkeypatch.setattr(DM, "preservation", preservation)
    out = tmp_path / "eval.json"
    assert DM.main(["--out", str(out)]) == 0
    assert seen["methods"] == [label for label, _preset, _opts in DM.PRESERVATION_ROWS.values()]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert {"codec_roundtrip", "sampling_sweep", "long_clips", "text_control", "preservation"} <= set(report)
    seen["fail"] = True
    with pytest.raises(RuntimeError, match="preservation failed"):
        DM.main(["--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and "text_control_temperature_0.5" in report and "preservation" not in report


def test_per_instrument_clip_counts_shape_the_corpus_and_old_configs_still_read(tmp_path):
    cfg = replace(P.QUICK, clip_counts={"piano": 5})
    _codec, corpus, _ = P.prepare(cfg, str(tmp_path), verbose=False)
    assert [corpus.names.count(n) for n in cfg.train_concepts] == [5, 3, 3]
    assert corpus.codes.shape[0] == 11 and len(set(corpus.seeds)) == 11
    # the first 3 piano compositions are the ones a uniform corpus has: counts add compositions, they replace none
    _codec, uniform, _ = P.prepare(P.QUICK, str(tmp_path / "u"), verbose=False)
    assert corpus.seeds[:3] == uniform.seeds[:3]
    # a file written before clip_counts existed (tiny-v4) reads as a uniform corpus; a rebalanced config round-trips
    rebalanced = replace(P.PretrainConfig(), clip_counts={"piano": 160, "harp": 128})
    old = rebalanced.to_dict()
    del old["clip_counts"]
    assert P.PretrainConfig.from_dict(old).clip_counts == {}
    assert P.PretrainConfig.from_dict(rebalanced.to_dict()) == rebalanced
    assert rebalanced.digest() != P.PretrainConfig().digest() and rebalanced.clips_of("organ") == 96
    with pytest.raises(ValueError, match="violin.*not training instruments"):
        replace(P.QUICK, clip_counts={"violin": 4})
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        replace(P.QUICK, clip_counts={"piano": 0})


def test_codebook_weights_train_and_record_and_old_configs_still_read(tmp_path):
    cfg = replace(P.QUICK, codebook_weights=(3.0,) + (1.0,) * (P.QUICK.codec.n_q - 1))
    prov = P.pretrain(cfg, out=str(tmp_path / "w.pt"), workdir=str(tmp_path / "work"), verbose=False)
    assert all(math.isfinite(x) for x in prov["losses_every_10"])
    mg = P.load_trained(str(tmp_path / "w.pt"), expected=cfg)
    assert mg.lm.n_q == cfg.codec.n_q
    # the recorded loss is the solver's unweighted mean: equal weights train and record exactly the default run
    a = P.pretrain(replace(P.QUICK, codebook_weights=(2.0,) * P.QUICK.codec.n_q), out=str(tmp_path / "a.pt"),
                   workdir=str(tmp_path / "wa"), verbose=False)  # fmt: skip
    b = P.pretrain(P.QUICK, out=str(tmp_path / "b.pt"), workdir=str(tmp_path / "wb"), verbose=False)
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    # files written before the key existed (tiny-v4) read as equal weights and keep their digest; the default
    # (tiny-v8's 3x on codebook 0) is recorded and round-trips
    equal = replace(P.PretrainConfig(), codebook_weights=())
    old = equal.to_dict()
    assert "codebook_weights" not in old
    assert P.PretrainConfig.from_dict(old) == equal
    assert P.PretrainConfig().codebook_weights == (3.0,) + (1.0,) * 7
    weighted = P.PretrainConfig()
    assert weighted.to_dict()["codebook_weights"] == [3.0] + [1.0] * 7
    assert P.PretrainConfig.from_dict(weighted.to_dict()) == weighted
    assert weighted.digest() != equal.digest()
    for bad in ((1.0,) * 7, (0.0,) + (1.0,) * 7, (float("inf"),) + (1.0,) * 7):
        with pytest.raises(ValueError, match="one finite weight > 0 per codebook"):
            replace(P.PretrainConfig(), codebook_weights=bad)


def test_description_word_lists_are_part_of_the_recorded_config(tmp_path, monkeypatch):
    # the shipped lists record nothing new (the key is absent, as in tiny-v4's and tiny-v8's configs) ...
    assert "descriptions" not in P.PretrainConfig().to_dict()
    assert P.PretrainConfig().descriptions == P.TINY_V4_DESCRIPTIONS == P.descriptions_digest()
    # ... a config from other lists cannot be re-made here, and says so
    with pytest.raises(P.PretrainError, match="other word lists.*check out the commit"):
        P.prepare(replace(P.QUICK, descriptions="0" * 16), str(tmp_path), verbose=False)
    # changing a word list changes the default config: the shipped weights no longer match it and are refused
    monkeypatch.setitem(P.INSTRUMENT_WORDS, "piano", ("piano", "upright piano"))
    cfg = P.PretrainConfig()
    assert cfg.descriptions != P.TINY_V4_DESCRIPTIONS and cfg.to_dict()["descriptions"] == cfg.descriptions
    assert P.PretrainConfig.from_dict(cfg.to_dict()) == cfg
    if os.path.isfile(P.ASSET):
        with pytest.raises(P.PretrainError, match="differs in descriptions"):
            P.load_trained(P.ASSET, expected=cfg)


@pytest.mark.parametrize(
    "argv, want",
    [
        (["/venv/bin/ppt-fast", "pretrain", "--steps", "9"], "ppt-fast pretrain --steps 9"),
        ([os.path.join("repo", "ppt_fast", "cli.py"), "pretrain", "--out", "x.pt"], "ppt-fast pretrain --out x.pt"),
        (["-c"], None),  # pretrain() called from Python: no command to record
    ],
)
def test_the_weights_record_the_command_however_the_cli_was_started(monkeypatch, argv, want):
    monkeypatch.setattr("sys.argv", argv)
    assert P._cli_command() == want


def test_pretrain_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch):
    """The weights are written after ~50 minutes: a path that cannot take them is refused before anything runs."""
    from ppt_fast._io import UnwritablePathError

    monkeypatch.setattr(P, "prepare", lambda *a, **k: pytest.fail("pretraining started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (str(tmp_path), str(blocker / "w.pt"), "/dev/null"):
        with pytest.raises(UnwritablePathError):
            P.pretrain(P.QUICK, out=out, workdir=str(tmp_path / "work"), verbose=False)
