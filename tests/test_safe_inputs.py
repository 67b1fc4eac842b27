"""Bad input is refused at its boundary, before any long work, with a message naming the problem and the fix: reference
audio (ppt_fast/audio.py, reference.py), identifiers, templates and out= (identifiers.py, tuning.py), and
generation arguments (generation.py). Each class is checked with fresh random inputs."""

import importlib
import logging
import math
import os
import random
import re
import string
import threading

import pytest
import soundfile as sf
import torch

from ppt_fast import audio as A
from ppt_fast.audio import AudioError, synth_reference, write_wav

pytest.importorskip("audiocraft")

from ppt_fast import identifiers as ids  # noqa: E402
from ppt_fast import reference as data  # noqa: E402

T = importlib.import_module("ppt_fast.tuning")
G = importlib.import_module("ppt_fast.generation")

FAST = dict(model="tiny-random", steps=2, sensitivity_batches=1, batch_size=2, segment_seconds=1.0, verbose=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model is loaded or trained: every refusal here must come before both."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded / trained before the bad input was refused")

    monkeypatch.setattr(T, "load_host", boom)
    monkeypatch.setattr(G, "load_host", boom)
    return boom


@pytest.fixture
def no_tune(no_work, monkeypatch):
    """no_work, and tune() must not start tune_model either."""
    monkeypatch.setattr(T, "tune_model", no_work)


def _music(seconds: float, sr: int = 16000) -> torch.Tensor:
    return synth_reference(seconds, sr, seed=random.randint(0, 10**6))


def _word(n: int = 5) -> str:
    return "".join(random.choice(string.ascii_lowercase) for _ in range(n))


# ---- reference audio ------------------------------------------------------------------------------------------------
def test_dc_only_reference_is_silent():
    n = random.randint(16000, 40000)
    level = random.choice([-1, 1]) * random.uniform(0.01, 0.9)
    with pytest.raises(AudioError, match=f"silent apart from a DC offset of {abs(level):.2e}"):
        data.load_reference((torch.full((1, n), level), 16000), 16000, 1)
    quiet = torch.full((2, n), level) + 1e-5 * torch.randn(2, n)  # DC + noise far below -80 dBFS
    with pytest.raises(AudioError, match="silent"):
        data.load_reference((quiet, 16000), 16000, 1)
    music = _music(2.0) + level * 0.5  # DC under real music: accepted
    audio, _, _ = data.load_reference((music, 16000), 16000, 1)
    assert audio.shape == (1, 32000)


def test_reference_above_full_scale_is_scaled_down_with_a_warning(caplog):
    clip = _music(1.5)
    peak = random.uniform(1.5, 6.0)
    loud = clip / clip.abs().max() * peak
    with caplog.at_level(logging.WARNING, logger="ppt_fast.reference"):
        audio, _, _ = data.load_reference((loud, 16000), 16000, 1)
    assert f"peaks at {peak:.2f}, above full scale" in caplog.text
    # Same rate and channels: no resampling, one gain, waveform kept.
    torch.testing.assert_close(audio, loud / peak, rtol=1e-6, atol=1e-7)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ppt_fast.reference"):
        data.load_reference((clip, 16000), 16000, 1)
    assert "full scale" not in caplog.text


@pytest.mark.parametrize(
    "dtype,scale,offset",
    [(torch.int16, 32768.0, 0), (torch.int32, 2.0**31, 0), (torch.int8, 128.0, 0), (torch.uint8, 128.0, 128)],
)
def test_integer_references_are_rescaled_by_their_range(dtype, scale, offset):
    info = torch.iinfo(dtype)
    n = random.randint(16000, 24000)
    pcm = torch.randint(max(info.min, -(2**30)), min(info.max, 2**30), (1, n), dtype=torch.int64).to(dtype)
    audio, _, _ = data.load_reference((pcm, 16000), 16000, 1)
    want = (pcm.double() - offset) / scale
    torch.testing.assert_close(audio.double(), want, rtol=0, atol=1e-7)  # float32 rounding of values in [-1, 1]
    assert float(audio.abs().max()) <= 1.0
    np_audio, _, _ = data.load_reference((pcm.numpy(), 16000), 16000, 1)
    assert torch.equal(np_audio, audio)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_samples_without_an_audio_convention_are_refused(dtype):
    x = (torch.rand(1, 20000) > 0.5).to(dtype)
    with pytest.raises(AudioError, match=f"dtype {dtype}"):
        data.load_reference((x, 16000), 16000, 1)


@pytest.mark.parametrize("rate", [0, -20, 16000.5, float("nan"), float("inf"), True, "16000", None])
def test_bad_sample_rates_are_refused(rate):
    with pytest.raises(AudioError, match=r"sample rate .* must be a whole number of Hz > 0"):
        data.load_reference((_music(2.0), rate), 16000, 1)


def test_whole_float_sample_rate_is_accepted():
    audio, _, _ = data.load_reference((_music(1.5), 16000.0), 16000, 1)
    assert audio.shape == (1, 24000)


def test_reference_shapes():
    clip = _music(1.25)
    want, _, _ = data.load_reference((clip, 16000), 16000, 1)
    for same in (clip[None], clip[0]):  # a batch of one [1, C, T], a bare [T]
        got, _, _ = data.load_reference((same, 16000), 16000, 1)
        assert torch.equal(got, want)
    with pytest.raises(AudioError, match=r"looks like \[samples, channels\]; pass samples.T"):
        data.load_reference((clip.expand(2, -1).T.contiguous(), 16000), 16000, 1)
    with pytest.raises(AudioError, match="got 3 dimensions"):
        data.load_reference((clip.expand(2, -1)[:, None], 16000), 16000, 1)
    with pytest.raises(AudioError, match="holds no samples"):
        data.load_reference((torch.zeros(1, 0), 16000), 16000, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_samples_are_refused(bad):
    clip = _music(1.5)
    k = random.randint(1, 50)
    clip[0, torch.randperm(clip.shape[-1])[:k]] = bad
    with pytest.raises(AudioError, match=f"has {k} NaN/inf samples"):
        data.load_reference((clip, 16000), 16000, 1)


def test_reference_length_bounds():
    with pytest.raises(AudioError, match=f"the maximum is {data.MAX_SECONDS:g} s"):
        data.check_audio(torch.randn(1, 100 * int(data.MAX_SECONDS) + 100), 100, "long")


def test_a_truncated_wav_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "clip.wav"
    frames = random.randint(16000, 30000)
    write_wav(path, torch.rand(2, frames) - 0.5, 16000)
    with caplog.at_level(logging.WARNING, logger="ppt_fast.audio"):
        a, _ = A.read_audio(path)
    assert a.shape == (2, frames) and "truncated" not in caplog.text
    cut = random.randint(1, frames // 2)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 4 * cut])  # 16-bit stereo: 4 bytes a frame
    with caplog.at_level(logging.WARNING, logger="ppt_fast.audio"):
        b, _ = A.read_audio(path)
    assert b.shape == (2, frames - cut)
    assert f"{path} is truncated: its header promises {frames} samples" in caplog.text
    assert f"the file holds {frames - cut}" in caplog.text


def test_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "ref.wav"
    os.mkfifo(fifo)

    def unblock():  # were the FIFO opened for reading, this writer would let the test end (and fail) instead of hang
        with open(fifo, "wb"):
            pass

    t = threading.Timer(10.0, unblock)
    t.daemon = True
    t.start()
    try:
        with pytest.raises(AudioError, match="is a FIFO"):
            A.read_audio(fifo)
    finally:
        t.cancel()


def test_read_audio_checks_the_length_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    write_wav(path, torch.rand(1, 16000) - 0.5, 16000)
    monkeypatch.setattr(sf, "read", lambda *a, **k: pytest.fail("samples read before the length was checked"))
    with pytest.raises(AudioError, match="is 1 s long; the maximum is 0.5 s"):
        A.read_audio(path, max_seconds=0.5)


def test_awkward_rate_pairs_resample_by_fft(monkeypatch):
    """44 099 -> 16 000 Hz would make julius build a 0.7 G-entry filter bank; the FFT path gives the same signal."""
    import julius

    assert A._julius_kernel_entries(44099, 16000) > A.RESAMPLE_KERNEL_MAX
    assert A._julius_kernel_entries(11025, 32000) <= A.RESAMPLE_KERNEL_MAX  # the costliest common pair stays julius
    monkeypatch.setattr(julius, "resample_frac", lambda *a, **k: pytest.fail("julius called for an awkward pair"))
    sr, f0 = 44099, random.uniform(100, 4000)
    n = random.randint(sr, 2 * sr)
    x = 0.5 * torch.sin(2 * math.pi * f0 * torch.arange(n, dtype=torch.float64) / sr)[None].float()
    y = A.to_model_format(x, sr, 16000, 1)
    assert y.shape == (1, n * 16000 // sr)
    ref = 0.5 * torch.sin(2 * math.pi * f0 * torch.arange(y.shape[-1], dtype=torch.float64) / 16000)[None]
    # The FFT treats the (zero-padded) clip as periodic, so its edges ring; inside, the error is what julius reaches
    # on common pairs (1e-5 to 5e-5 measured); a time stretch of one sample over the clip would be 1e-2.
    m = y.shape[-1] // 10
    assert (y[:, m:-m].double() - ref[:, m:-m]).abs().max() < 2e-4


def test_cached_codes_that_do_not_fit_the_codec_are_re_encoded(tmp_path, caplog):
    from ppt_fast.models import load_model

    mg = load_model("tiny-random")
    ref = tmp_path / "ref.wav"
    write_wav(ref, _music(2.0), 16000)
    first = data.encode_reference(mg, str(ref), segment_seconds=1.0, codec_fingerprint="fp")
    card = mg.compression_model.cardinality
    bad_codes = first.codes.clone()
    idx = tuple(random.randrange(s) for s in bad_codes.shape)
    bad_codes[idx] = card + random.randint(0, 5)
    for bad, why in ((bad_codes, "outside the codebook"), (first.codes[:, :2], "shape"),
                     (first.codes.int(), "not int64"), ({"codes": first.codes}, "not int64")):  # fmt: skip
        torch.save(bad, first.cache_path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ppt_fast.reference"):
            again = data.encode_reference(mg, str(ref), segment_seconds=1.0, codec_fingerprint="fp")
        assert why in caplog.text and "re-encoding" in caplog.text
        assert torch.equal(again.codes, first.codes)
        assert torch.equal(torch.load(first.cache_path, weights_only=True), first.codes)  # the cache is repaired


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    from ppt_fast.models import load_model

    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    monkeypatch.setenv("PPT_FAST_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="ppt_fast.reference"):
        enc = data.encode_reference(load_model("tiny-random"), (_music(2.0), 16000), segment_seconds=1.0,
                                    codec_fingerprint="fp")  # fmt: skip
    assert enc.codes.shape[0] == 3 and "cannot write the codes cache" in caplog.text


# ---- identifiers and templates --------------------------------------------------------------------------------------
def test_identifiers_match_whole_tokens_only():
    bank = ids.IdentifierBank(4)
    word = _word(3) + str(random.randint(1, 9))  # a bare identifier, e.g. "qzx7"
    bank.add(word, torch.zeros(1, 4))
    glued = f"a {word}0 synth, na{word} pop, {word}_x"
    assert bank.split(glued) == (glued, [])
    assert bank.split(f"{word}, ({word}) {word}-lead {word}") == ("( ) -lead", [word] * 4)
    br = f"<{_word(4)}>"
    bank.add(br, torch.zeros(2, 4))
    assert bank.split(f"({br}) jazz{br}, {br},") == ("( ) jazz", [br] * 3)
    assert bank.split(f"<{br[1:-1]}0>") == (f"<{br[1:-1]}0>", [])
    assert ids.mentions(word, f"x {word}.") and not ids.mentions(word, f"x{word}")


def test_identifier_that_is_a_word_of_the_templates_is_refused(no_work):
    ok = (_music(2.0), 16000)
    for ident, template in (("music", "a piece of music, {}"), ("piece", "a piece of music, {}"),
                            ("<jazz>", "smooth Jazz, {}"), ("<v1>", "<v1> jazz, {}")):  # fmt: skip
        with pytest.raises(T.TuneError, match=rf"identifier {ident!r} collides with the template {template!r}"):
            T.tune_model(ok, identifier=ident, templates=[template], **FAST)
    word = _word()
    with pytest.raises(T.TuneError, match=f"{word!r} is an ordinary word of the prior prompt"):
        T.tune_model(ok, identifier=f"<{word}>", prior=1.0, prior_prompts=[f"calm {word} music"], **FAST)
    with pytest.raises(T.TuneError, match=f"prior prompt 'calm {word} music' names the identifier {word!r}"):
        T.tune_model(ok, identifier=word, prior=1.0, prior_prompts=[f"calm {word} music"], **FAST)


@pytest.mark.parametrize(
    "template,match",
    [("{} in {style}", r"has a field \{style\}"), ("{0}, jazz", r"has a field \{0\}"), ("{:>9}", r"field \{:>9\}"),
     ("{} and {}", "has 2 '{}'"), ("a {} song {", "literal braces"), ("   ", "not a non-empty string"),
     (7, "not a non-empty string")],
)  # fmt: skip
def test_bad_templates_are_named(no_work, template, match):
    with pytest.raises(T.TuneError, match=match) as e:
        T.tune_model((_music(2.0), 16000), templates=[template], **FAST)
    assert repr(template) in str(e.value)


def test_template_braces_and_slots():
    assert T._prompts(["{{x}} mood", "a {} song", "{{{}}}"], ["<v1>"]) == ["{x} mood, <v1>", "a <v1> song", "{<v1>}"]
    with pytest.raises(T.TuneError, match="must be a list of strings"):
        T.tune_model((_music(2.0), 16000), templates="a {} song", **FAST)


# ---- out= -----------------------------------------------------------------------------------------------------------
def test_out_file_names_are_injective_and_stay_in_the_folder(no_tune, tmp_path):
    ok = (_music(2.0), 16000)
    w = _word()
    for a, b in ((f"<{w}>", f"../{w}"), (f"[{w}]", f"<{w.upper()}>"), ("<>", "[]")):
        with pytest.raises(T.TuneError, match=re.escape(f"identifiers {a!r} and {b!r} would both be written to")):
            T.tune({a: ok, b: ok}, out=tmp_path / "out", **FAST)
    for ident in (f"../../{w}", f"/etc/{w}", "..", f"..\\{w}", f"<{w}/../..>", "./."):
        name = T.concept_file_name(ident)
        assert os.sep not in name and "/" not in name and not name.startswith(".") and name.endswith(".ppt")
        assert os.path.dirname(os.path.normpath(os.path.join(tmp_path, name))) == str(tmp_path)
    assert os.listdir(tmp_path) == []


def test_unwritable_out_is_refused_before_tuning(no_tune, tmp_path):
    ok = (_music(2.0), 16000)
    f = tmp_path / "file.ppt"
    f.write_bytes(b"saved before")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir" / "v1.ppt").mkdir(parents=True)
    cases = [(ok, tmp_path, "is a directory, not a regular file"), (ok, f / "x.ppt", "is a regular file, not a folder"),
             (ok, fifo, "is a FIFO"), ({"<v1>": ok}, f, "is a regular file, not a folder"),
             ({"<v1>": ok}, tmp_path / "dir", "v1.ppt' is a directory"), (ok, 3, "must be a path")]  # fmt: skip
    for ref, out, match in cases:
        with pytest.raises(T.TuneError, match=match):
            T.tune(ref, out=out, **FAST)
    assert f.read_bytes() == b"saved before" and os.path.exists(fifo) and not (tmp_path / "x.ppt").exists()


def test_bad_tune_settings_are_refused_before_the_model_loads(no_work):
    ok = (_music(2.0), 16000)
    for kw, match in ((dict(steps=1.5), "steps=1.5"), (dict(lr=float("nan")), "lr=nan"), (dict(count=2.5), "count"),
                      (dict(segment_seconds=0.0), "segment_seconds=0.0"), (dict(seed=-1), "seed=-1"),
                      (dict(max_norm=float("inf")), "max_norm=inf"), (dict(criterion="l1"), "criterion"),
                      (dict(n_tokens="3"), "n_tokens"), (dict(batch_size=True), "batch_size=True")):  # fmt: skip
        with pytest.raises(T.TuneError, match=match):
            T.tune_model(ok, **{**FAST, **kw})


# ---- generation -----------------------------------------------------------------------------------------------------
_BAD_GENERATE = [
    (dict(duration=float("inf")), "duration=inf"), (dict(duration=float("nan")), "duration=nan"),
    (dict(duration=1e6), r"duration=1000000.0 .* \(0, 600\]"), (dict(duration=0), "duration=0"),
    (dict(duration=-1.0), "duration=-1.0"), (dict(duration="5"), "duration='5'"),
    (dict(temperature=-0.1), "temperature=-0.1"), (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=1e-9), "temperature=1e-09"), (dict(top_k=-1), "top_k=-1"), (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_k=True), "top_k=True"), (dict(top_p=-0.1), "top_p=-0.1"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=float("nan")), "top_p=nan"), (dict(cfg_coef=float("nan")), "cfg_coef=nan"),
    (dict(cfg_coef=-1.0), "cfg_coef=-1.0"), (dict(cfg_coef=1e4), "cfg_coef=10000.0"), (dict(seed=-1), "seed=-1"),
    (dict(seed=1.5), "seed=1.5"), (dict(seed=2**63), "seed="), (dict(scale=float("nan")), "scale=nan"),
    (dict(scale=float("inf")), "scale=inf"), (dict(scale=11.0), "scale=11.0"), (dict(resample_silent=-1), "resample"),
    (dict(resample_silent=11), "resample_silent=11"), (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=""), "prompt 0 is empty"), (dict(prompts=["ok", "  "]), "prompt 1 is empty"),
    (dict(prompts=[1]), "prompt 0 is a int"), (dict(prompts=b"x"), "got bytes"), (dict(prompts={"a": 1}), "got dict"),
]  # fmt: skip


@pytest.mark.parametrize("kw,match", _BAD_GENERATE)
def test_bad_generation_arguments_are_refused_before_the_model_loads(no_work, kw, match):
    kw = dict(kw)
    prompts = kw.pop("prompts", [_word()])
    with pytest.raises(G.GenerateError, match=match):
        G.generate(prompts, model="tiny-random", **kw)


def test_generation_bounds_that_need_the_model(monkeypatch):
    from ppt_fast.models import load_model

    mg = load_model("tiny-random")
    monkeypatch.setattr(G, "_sample", lambda *a, **k: pytest.fail("sampled past a refused bound"))
    with pytest.raises(G.GenerateError, match=r"shorter than one frame of this model \(1/50 s\)"):
        G.generate([_word()], model=mg, duration=0.01)
    monkeypatch.setattr(G, "_available_memory", lambda: 2**20)
    n = random.randint(2, 9)
    need = 2 * 4 * n * 16000 * 4.0 / 2**30
    with pytest.raises(G.GenerateError, match=rf"{n} clip\(s\) of 4 s would take about {need:.1f} GiB"):
        G.generate([_word()] * n, model=mg, duration=4.0)


def test_valid_edge_settings_generate():
    """temperature 0 (greedy), nucleus sampling, top_k 0, cfg 0: accepted and sampled."""
    from ppt_fast.models import load_model

    mg = load_model("tiny-random")
    a = G.generate(["a piece of music"], model=mg, duration=0.1, seed=1, temperature=0, top_p=0.9, top_k=0)
    b = G.generate(["a piece of music"], model=mg, duration=0.1, seed=2, temperature=0, cfg_coef=0.0)
    assert a.shape == b.shape == (1, 1, 1600) and torch.isfinite(a).all()
