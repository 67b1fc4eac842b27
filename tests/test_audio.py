import os
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from ppt_fast.audio import (
    AudioError,
    loudness_normalize,
    read_audio,
    synth_reference,
    to_model_format,
    true_peak_db,
    write_wav,
)


def test_write_read_roundtrip(tmp_path):
    a = synth_reference(1.5, 16000, seed=3)
    path = write_wav(tmp_path / "x.wav", a, 16000, normalize=None)  # as given: the default normalises the level
    b, sr = read_audio(path)
    assert sr == 16000 and b.shape == a.shape
    # 16-bit PCM: quantisation error at most half a step (1/32768) plus clipping of nothing (|a| <= 0.51).
    assert (a - b).abs().max() <= 1 / 32768 + 1e-7
    assert os.listdir(tmp_path) == ["x.wav"]  # no temporary file left beside it


def test_write_accepts_batch_of_one_and_1d(tmp_path):
    a = torch.rand(1, 1, 800) - 0.5
    write_wav(tmp_path / "a.wav", a, 8000)
    write_wav(tmp_path / "b.wav", a[0, 0], 8000)
    assert sf.info(str(tmp_path / "a.wav")).frames == 800


@pytest.mark.parametrize(
    "audio,match",
    [(torch.rand(2, 1, 10), "batch"), (torch.full((1, 10), float("nan")), "NaN"), (torch.rand(2, 2, 2, 2), "shape")],
)
def test_write_rejects(tmp_path, audio, match):
    with pytest.raises(AudioError, match=match):
        write_wav(tmp_path / "x.wav", audio, 16000)


def test_read_errors(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="cannot read"):
        read_audio(bad)
    with pytest.raises(AudioError, match="directory"):
        read_audio(tmp_path)


def test_resample_and_mix():
    sr = 22050
    t = torch.arange(sr) / sr
    stereo = torch.stack([torch.sin(2 * torch.pi * 440 * t), 0.5 * torch.sin(2 * torch.pi * 440 * t)])
    mono = to_model_format(stereo, sr, 16000, 1)
    assert mono.shape == (1, 16000)
    # Energy of a 440 Hz tone survives resampling: RMS of 0.75 * sin = 0.53.
    assert abs(float(mono.pow(2).mean().sqrt()) - 0.75 / np.sqrt(2)) < 0.01
    up = to_model_format(mono, 16000, 16000, 2)
    assert up.shape == (2, 16000) and torch.equal(up[0], up[1])


def test_synth_reference_deterministic_and_timbres():
    a = synth_reference(2.0, 16000, seed=1)
    assert torch.equal(a, synth_reference(2.0, 16000, seed=1))
    assert not torch.equal(a, synth_reference(2.0, 16000, seed=2))
    assert a.shape == (1, 32000) and a.abs().max() <= 0.52
    organ = synth_reference(2.0, 16000, seed=1, timbre="organ")
    assert not torch.allclose(a, organ)
    with pytest.raises(ValueError, match="timbre"):
        synth_reference(1.0, timbre="kazoo")


def test_written_files_get_umask_permissions_not_0600(tmp_path):
    """Atomic writers go through mkstemp (0600); the published file must be as shareable as a plain open()."""
    import stat

    old = os.umask(0o022)
    try:
        path = write_wav(tmp_path / "a.wav", torch.zeros(1, 1600), 16000)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_fit_peak_scales_down_with_one_gain_and_never_up(tmp_path):
    from ppt_fast.audio import fit_peak

    quiet = torch.full((1, 8), 0.5)
    (same,), gain = fit_peak(quiet)
    assert gain == 1.0 and torch.equal(same, quiet)
    loud = torch.tensor([[0.2, -3.9, 1.0]])
    other = torch.tensor([[0.5, 1.3, -0.1]])
    (a, b), gain = fit_peak(loud, other)
    assert gain == pytest.approx(0.99 / 3.9)
    assert float(a.abs().max()) == pytest.approx(0.99) and float(b.abs().max()) == pytest.approx(1.3 * 0.99 / 3.9)
    torch.testing.assert_close(b / a, other / loud)  # relative levels kept
    with pytest.raises(AudioError, match="NaN"):
        fit_peak(torch.tensor([float("nan"), 0.0]))
    with pytest.warns(UserWarning, match="1 samples above full scale.*fit_peak"):
        write_wav(tmp_path / "clip.wav", loud, 16000, normalize=None)  # as given: clipped, with the warning
    with pytest.raises(ValueError, match="limit"):
        fit_peak(quiet, limit=1.5)


def test_write_wav_takes_integer_pcm_by_its_range(tmp_path):
    """An int16 clip is 16-bit PCM already: with normalize=None written through, sample for sample (not clipped as
    floats of +-32767)."""
    n = int(torch.randint(800, 4000, (1,)))
    pcm = torch.randint(-32768, 32768, (2, n), dtype=torch.int32).to(torch.int16)
    path = write_wav(tmp_path / "pcm.wav", pcm, 8000, normalize=None)
    back, sr = sf.read(path, dtype="int16", always_2d=True)
    assert sr == 8000 and np.array_equal(back.T, pcm.numpy())
    with pytest.raises(AudioError, match="sample rate 0 must be a whole number"):
        write_wav(tmp_path / "zero.wav", pcm, 0)
    assert sorted(os.listdir(tmp_path)) == ["pcm.wav"]


# --- loudness normalisation (write_wav's default): -14 LUFS integrated, true peak <= -1 dBTP -------------------------


def _music_like(rng, seconds, sr, channels=1):
    """A steady sine/noise mix (`[C, T]` float64), different per channel, faded in and out over 10 ms."""
    t = np.arange(int(seconds * sr)) / sr
    out = []
    for _ in range(channels):
        f = rng.uniform(150, 2000)
        x = np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.5 * np.sin(2 * np.pi * 1.5 * f * t)
        out.append(x + 0.3 * rng.standard_normal(t.size))
    x = np.stack(out)
    fade = np.minimum(1.0, np.minimum(np.arange(t.size), np.arange(t.size)[::-1]) / (0.01 * sr))
    return x * fade


def _bursts(rng, seconds, sr):
    """High crest factor: a quiet tone with five loud, fast-decaying tone bursts (drum-like hits), `[1, T]`."""
    t = np.arange(int(seconds * sr)) / sr
    x = 0.05 * np.sin(2 * np.pi * 220 * t)
    tt = np.arange(int(0.1 * sr)) / sr
    for start in rng.choice(np.arange(int(0.05 * sr), t.size - tt.size, tt.size), 5, replace=False):
        f = rng.uniform(400, 3000)
        x[start : start + tt.size] += 3 * np.exp(-60 * tt) * np.sin(2 * np.pi * f * tt + rng.uniform(0, 6))
    return x[None]


def _lufs_of_file(path):
    """Integrated loudness of a written file, measured independently: soundfile's samples, pyloudnorm's meter."""
    import pyloudnorm

    data, sr = sf.read(str(path), dtype="float64", always_2d=True)
    return pyloudnorm.Meter(sr).integrated_loudness(data)


def _true_peak_fft8(x):
    """A fresh true-peak reading (dBTP): FFT (ideal band-limited) resampling to 8x, zero-padded against wrap-around."""
    from scipy.signal import resample

    x = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (512, 512)))
    return 20 * np.log10(np.abs(resample(x, 8 * x.shape[-1], axis=-1)).max())


def _read(path):
    data, sr = sf.read(str(path), dtype="float64", always_2d=True)
    return data.T, sr


@pytest.mark.parametrize("level", [0.003, 0.2, 1.0, 10.0])
@pytest.mark.parametrize("channels", [1, 2])
def test_default_write_brings_any_level_to_minus_14_lufs(tmp_path, level, channels):
    rng = np.random.default_rng(int(level * 1000) + channels)
    x = _music_like(rng, float(rng.uniform(2.0, 4.0)), 16000, channels) * level
    x = torch.from_numpy(x).float()
    _, report = loudness_normalize(x, 16000)
    assert not report.ceiling_limited and not report.silent and report.method == "bs1770"
    assert report.output_lufs == pytest.approx(-14.0, abs=1e-6) and report.true_peak_dbtp <= -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no clipping warning, no RuntimeWarning from a log of zero
        path = write_wav(tmp_path / "x.wav", x, 16000)
    assert _lufs_of_file(path) == pytest.approx(-14.0, abs=0.1)
    back, _ = _read(path)
    assert back.shape == tuple(x.shape)


def test_high_crest_factor_is_limited_by_the_true_peak_ceiling(tmp_path):
    rng = np.random.default_rng(7)
    sr = 32000  # MusicGen's rate
    x = torch.from_numpy(_bursts(rng, 3.0, sr)).float()
    y, report = loudness_normalize(x, sr)
    # At -14 LUFS its peaks would be far above -1 dBTP: the ceiling sets the gain, the clip ends up quieter.
    assert report.ceiling_limited and report.output_lufs < -14.0 - 3
    assert report.true_peak_dbtp == pytest.approx(-1.0, abs=1e-6)
    assert true_peak_db(y) == pytest.approx(-1.0, abs=1e-3)
    path = write_wav(tmp_path / "hits.wav", x, sr)
    back, _ = _read(path)
    assert true_peak_db(back) <= -1.0 + 0.1 and true_peak_db(back) >= -1.1  # at the ceiling, not far below it
    assert _true_peak_fft8(back) <= -1.0 + 0.1  # a second, independent reading (8x, ideal band-limited)
    assert _lufs_of_file(path) == pytest.approx(report.output_lufs, abs=0.1)
    # The ceiling on a custom target too: -23 LUFS (EBU R128) with a -6 dBTP ceiling.
    y, report = loudness_normalize(x, sr, target_lufs=-23.0, peak_ceiling_db=-6.0)
    assert report.ceiling_limited and _true_peak_fft8(y.numpy()) <= -6.0 + 0.1


def test_true_peak_db_finds_the_peak_between_samples():
    # A sine at a quarter of the sample rate, sampled 45 degrees off its crests: every sample is at 0.707 (-3 dB),
    # the waveform peaks at 1.0 (0 dBTP). Faded in and out: an abrupt start would ring above its level.
    n = np.arange(4000)
    x = np.sin(np.pi / 2 * n + np.pi / 4) * np.minimum(1, np.minimum(n, n[::-1]) / 200)
    assert 20 * np.log10(np.abs(x).max()) == pytest.approx(-3.01, abs=0.01)
    assert true_peak_db(x) == pytest.approx(0.0, abs=0.1)
    assert true_peak_db(torch.zeros(2, 100)) == -np.inf
    with pytest.raises(ValueError, match="oversample"):
        true_peak_db(x, oversample=0)


def test_silence_is_left_as_it_is(tmp_path):
    rng = np.random.default_rng(3)
    for quiet in (torch.zeros(1, 32000), torch.from_numpy(1e-5 * rng.standard_normal((2, 32000))).float()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no divide-by-zero or invalid-value RuntimeWarning
            y, report = loudness_normalize(quiet, 16000)
        assert y is quiet and report.silent and report.gain_db == 0.0 and not report.ceiling_limited
        assert report.measured_lufs < -70 and not np.isnan(report.measured_lufs) and not np.isnan(report.output_lufs)
        assert "silent" in str(report) and "unchanged" in str(report)
        a = write_wav(tmp_path / "a.wav", quiet, 16000)
        b = write_wav(tmp_path / "b.wav", quiet, 16000, normalize=None)
        assert open(a, "rb").read() == open(b, "rb").read()
    # K-weighting does not hear a DC offset (silent), but its peak is above the ceiling: scaled down to it, never up.
    t = np.clip(np.arange(64000) / 32000, 0, 1)
    dc = torch.from_numpy(3 * t * t * (3 - 2 * t))[None]
    y, report = loudness_normalize(dc, 16000)
    assert report.silent and report.ceiling_limited and true_peak_db(y) == pytest.approx(-1.0, abs=1e-3)
    # No samples at all: unchanged.
    empty = torch.zeros(1, 0)
    y, report = loudness_normalize(empty, 16000)
    assert y is empty and report.method == "none"


def test_clip_shorter_than_the_400_ms_block_is_measured_by_its_k_weighted_rms(tmp_path):
    """pyloudnorm refuses clips under one 400-ms block; loudness_normalize measures them as one block of their own
    length (same K-weighting, ungated) and normalises them like any other."""
    import pyloudnorm

    rng = np.random.default_rng(11)
    long = _music_like(rng, 2.0, 16000)
    long[:, :160] = long[:, 160:320]  # no fade-in: the 200-ms cut is as steady as the rest
    short = torch.from_numpy(long[:, 1600:4800]).float()  # 200 ms
    with pytest.raises(ValueError, match="block size"):
        pyloudnorm.Meter(16000).integrated_loudness(short[0].double().numpy())
    _, ref = loudness_normalize(torch.from_numpy(long).float(), 16000)
    y, report = loudness_normalize(short, 16000)
    assert report.method == "short" and "400 ms" in str(report) and not report.silent
    assert report.gain_db == pytest.approx(ref.gain_db, abs=0.3)  # the same level as the 2-s take of the same sound
    path = write_wav(tmp_path / "short.wav", short, 16000)
    data, sr = sf.read(str(path), dtype="float64")
    assert data.shape == (3200,)
    # Read back and measured by pyloudnorm as one 200-ms block: at the target.
    assert pyloudnorm.Meter(sr, block_size=0.2).integrated_loudness(data) == pytest.approx(-14.0, abs=0.1)
    for n in (1, 7, 160):  # a handful of samples: finite, within the ceiling
        y, report = loudness_normalize(torch.from_numpy(rng.standard_normal((1, n))).float(), 16000)
        assert torch.isfinite(y).all() and report.true_peak_dbtp <= -1.0 + 1e-9


def test_stereo_keeps_the_balance_and_refuses_more_than_five_channels(tmp_path):
    rng = np.random.default_rng(5)
    x = _music_like(rng, 3.0, 16000, channels=2)
    x[1] *= 0.3  # right channel 10 dB quieter
    path = write_wav(tmp_path / "st.wav", torch.from_numpy(x).float(), 16000)
    back, _ = _read(path)
    assert back.shape == x.shape
    assert _lufs_of_file(path) == pytest.approx(-14.0, abs=0.1)
    gains = np.sqrt((back**2).mean(-1) / (x**2).mean(-1))
    assert gains[0] == pytest.approx(gains[1], rel=1e-3)  # one gain for both channels
    with pytest.raises(AudioError, match="6 channels.*up to 5"):
        loudness_normalize(torch.from_numpy(rng.standard_normal((6, 16000))).float(), 16000)


def test_nan_and_inf_are_refused_naming_the_fix(tmp_path):
    for bad in (float("nan"), float("inf")):
        x = torch.rand(2, 16000) - 0.5
        x[1, 99] = bad
        with pytest.raises(AudioError, match="1 NaN or inf samples.*nan_to_num"):
            loudness_normalize(x, 16000)
        with pytest.raises(AudioError, match="NaN or inf"):
            true_peak_db(x.numpy())
        with pytest.raises(AudioError, match="write_wav: audio holds NaN or inf samples"):
            write_wav(tmp_path / "x.wav", x, 16000)
    assert os.listdir(tmp_path) == []


def test_loudness_normalize_keeps_type_dtype_and_shape():
    rng = np.random.default_rng(9)
    x = _music_like(rng, 1.0, 8000)
    mono64 = x[0] * 3.0
    y, report = loudness_normalize(mono64, 8000)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64 and y.shape == mono64.shape
    np.testing.assert_allclose(y, mono64 * report.gain)
    assert mono64.max() == pytest.approx(x[0].max() * 3.0)  # the input is not modified in place
    t32 = torch.from_numpy(x).float()
    y, report = loudness_normalize(t32, 8000)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == t32.shape
    # Integer PCM: taken by its range, returned as the same integer type (rounded).
    pcm = (x * 2000).round().astype(np.int16)
    y, report = loudness_normalize(pcm, 8000)
    assert y.dtype == np.int16 and y.shape == pcm.shape and report.output_lufs == pytest.approx(-14.0, abs=1e-6)
    np.testing.assert_allclose(y, pcm * report.gain, atol=0.5 + 1e-9)
    yt, _ = loudness_normalize(torch.from_numpy(pcm), 8000)
    assert yt.dtype == torch.int16 and np.array_equal(yt.numpy(), y)
    with pytest.raises(AudioError, match="shape"):
        loudness_normalize(torch.zeros(1, 2, 800), 8000)
    with pytest.raises(AudioError, match="sample rate"):
        loudness_normalize(t32, 0)
    for kw in ({"target_lufs": 3.0}, {"target_lufs": float("nan")}, {"peak_ceiling_db": 0.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            loudness_normalize(t32, 8000, **kw)


def test_default_write_of_integer_pcm_is_normalised(tmp_path):
    rng = np.random.default_rng(4)
    pcm = torch.from_numpy((_music_like(rng, 2.0, 8000, channels=2) * 1500).round().astype(np.int16))
    path = write_wav(tmp_path / "pcm.wav", pcm, 8000)
    assert _lufs_of_file(path) == pytest.approx(-14.0, abs=0.1)


def test_normalize_none_writes_the_samples_as_given_bitwise(tmp_path):
    g = torch.Generator().manual_seed(int(np.random.default_rng(2).integers(1 << 30)))
    x = torch.rand(2, 8000, generator=g) - 0.5
    x[0, 10], x[1, 20] = 1.7, -2.5  # above full scale: clipped as before, with the warning
    ref = tmp_path / "ref.wav"
    sf.write(str(ref), x.clamp(-1, 1).t().numpy(), 16000, subtype="PCM_16", format="WAV")  # today's conversion
    with pytest.warns(UserWarning, match="2 samples above full scale"):
        path = write_wav(tmp_path / "none.wav", x, 16000, normalize=None)
    with pytest.warns(UserWarning, match="2 samples above full scale"):
        false = write_wav(tmp_path / "false.wav", x, 16000, normalize=False)
    want = sf.read(str(ref), dtype="int16")[0]
    assert np.array_equal(sf.read(path, dtype="int16")[0], want)
    assert np.array_equal(sf.read(false, dtype="int16")[0], want)
    with pytest.raises(ValueError, match="normalize must be 'loudness', 'peak' or None"):
        write_wav(tmp_path / "bad.wav", x, 16000, normalize="lufs")


def test_loud_raw_output_written_with_the_default_is_not_clipped(tmp_path):
    """Issue 29: generated audio peaking at 10 used to be written clipped (with a warning); now it is turned down."""
    rng = np.random.default_rng(29)
    x = _music_like(rng, 3.0, 32000)
    x = torch.from_numpy(x / np.abs(x).max() * 10.0).float()  # peak 10, as raw decoder output can be
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "samples above full scale are clipped" warning would fail this
        path = write_wav(tmp_path / "loud.wav", x, 32000)
    back, _ = _read(path)
    assert np.abs(back).max() < 0.9  # nothing near full scale: -1 dBTP is 0.891
    gain = float((back[0] * x[0].numpy()).sum() / (x[0].numpy() ** 2).sum())
    assert np.abs(back[0] - gain * x[0].numpy()).max() <= 1 / 32768 + 1e-6  # the waveform, scaled: not clipped
    assert _lufs_of_file(path) == pytest.approx(-14.0, abs=0.1)
    assert true_peak_db(back) <= -1.0 + 0.1


def test_peak_mode_only_scales_clips_above_full_scale_down(tmp_path):
    rng = np.random.default_rng(8)
    x = torch.from_numpy(_music_like(rng, 1.0, 16000)).float()
    loud = x / x.abs().max() * 4.0
    path = write_wav(tmp_path / "loud.wav", loud, 16000, normalize="peak")
    back, _ = _read(path)
    assert np.abs(back).max() == pytest.approx(0.99, abs=1 / 32768)
    quiet = x / x.abs().max() * 0.3
    a = write_wav(tmp_path / "a.wav", quiet, 16000, normalize="peak")
    b = write_wav(tmp_path / "b.wav", quiet, 16000, normalize=None)
    assert open(a, "rb").read() == open(b, "rb").read()  # never up


def test_silent_windows_and_stretches():
    from ppt_fast.audio import SILENCE_RMS, silent_stretches, silent_windows

    sr = 1000
    x = torch.randn(3, 2, 4 * sr + 300) * 0.1  # 4.3 s: 8 whole half-second windows, a trailing part not measured
    x[0, :, 500:1500] = 0  # windows 1, 2: a 1-s stretch
    x[1, 0, 2000:4300] = 0  # one channel silent: the window is not (RMS over both channels)
    x[2, :, 1000:1500] = 0.5 * SILENCE_RMS  # one window below the threshold: a rest, not a stretch
    x[2, :, 3000:4300] = 0  # windows 6, 7 (and the trailing part)
    w = silent_windows(x, sr)
    assert w.shape == (3, 8)
    assert w[0].tolist() == [False, True, True, False, False, False, False, False]
    assert not w[1].any()
    assert w[2].tolist() == [False, False, True, False, False, False, True, True]
    assert silent_stretches(x, sr) == [[(0.5, 1.5)], [], [(3.0, 4.0)]]
    assert silent_stretches(x, sr, min_seconds=0.5) == [[(0.5, 1.5)], [], [(1.0, 1.5), (3.0, 4.0)]]
    assert silent_windows(x[0], sr).shape == (1, 8) and silent_windows(x[0, 0], sr).shape == (1, 8)
    assert silent_windows(x[..., :400], sr).shape == (3, 0) and silent_stretches(x[..., :400], sr) == [[], [], []]
