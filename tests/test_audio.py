import os

import numpy as np
import pytest
import soundfile as sf
import torch

from ppt_fast.audio import AudioError, read_audio, synth_reference, to_model_format, write_wav


def test_write_read_roundtrip(tmp_path):
    a = synth_reference(1.5, 16000, seed=3)
    path = write_wav(tmp_path / "x.wav", a, 16000)
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
        write_wav(tmp_path / "clip.wav", loud, 16000)
    with pytest.raises(ValueError, match="limit"):
        fit_peak(quiet, limit=1.5)


def test_write_wav_takes_integer_pcm_by_its_range(tmp_path):
    """An int16 clip is 16-bit PCM already: written through, sample for sample (not clipped as floats of +-32767)."""
    n = int(torch.randint(800, 4000, (1,)))
    pcm = torch.randint(-32768, 32768, (2, n), dtype=torch.int32).to(torch.int16)
    path = write_wav(tmp_path / "pcm.wav", pcm, 8000)
    back, sr = sf.read(path, dtype="int16", always_2d=True)
    assert sr == 8000 and np.array_equal(back.T, pcm.numpy())
    with pytest.raises(AudioError, match="sample rate 0 must be a whole number"):
        write_wav(tmp_path / "zero.wav", pcm, 0)
    assert sorted(os.listdir(tmp_path)) == ["pcm.wav"]
