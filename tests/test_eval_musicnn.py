"""The PyTorch port of musicnn against the original TF model's outputs (tests/data/musicnn_reference.npz, written once
by experiments/probes/musicnn_reference.py in a throw-away TensorFlow venv)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ppt_fast.eval import musicnn

pytestmark = pytest.mark.skipif(
    not musicnn.is_available(), reason="musicnn checkpoint not installed (pip install --no-deps musicnn==0.1.0)"
)

DATA = os.path.join(os.path.dirname(__file__), "data", "musicnn_reference.npz")
CLIPS = ("plucked", "pad")
# fp32 convolutions summed in a different order than TF's (oneDNN vs PyTorch): measured max error 2e-5 relative to
# the largest output. 2e-4 relative leaves 10x headroom and still catches any layout or padding slip (those move
# outputs by > 1e-2).
REL_TOL = 2e-4


@pytest.fixture(scope="module")
def ref():
    return np.load(DATA)


def _close(actual: torch.Tensor, expected: np.ndarray) -> float:
    exp = torch.from_numpy(expected)
    assert actual.shape == exp.shape
    err = (actual - exp).abs().max().item()
    assert err <= REL_TOL * exp.abs().max().item() + 1e-6, err
    return err


@pytest.mark.parametrize("clip", CLIPS)
def test_network_matches_tensorflow(ref, clip):
    out = musicnn.load_musicnn()(musicnn.patches(torch.from_numpy(ref[f"{clip}/logmel"])))
    for name in ("taggram", "logits", "penultimate", "max_pool", "mean_pool"):
        _close(getattr(out, name), ref[f"{clip}/{name}"])
    # the patches differ from each other (upstream extractor() would repeat the first patch's features)
    if out.penultimate.shape[0] > 1:
        assert (out.penultimate[0] - out.penultimate[1]).abs().max() > 1e-2


@pytest.mark.parametrize("clip", CLIPS)
def test_front_end_matches_librosa(ref, clip):
    audio = torch.from_numpy(ref[f"{clip}/audio_int16"].astype(np.float32) / 32768.0)
    _close(musicnn.log_mel(audio), ref[f"{clip}/logmel"])
    out = musicnn.embed_patches(audio)  # front end + network, end to end
    _close(out.taggram, ref[f"{clip}/taggram"])
    _close(out.penultimate, ref[f"{clip}/penultimate"])


def test_checkpoint_reader_shapes():
    tensors = musicnn.read_tf_checkpoint(musicnn.checkpoint_prefix())
    assert tensors["conv2d/kernel"].shape == (7, 38, 1, 204)
    assert tensors["conv2d_1/kernel"].shape == (7, 67, 1, 204)
    assert tensors["conv2d_2/kernel"].shape == (128, 1, 1, 51)
    assert tensors["conv2d_5/kernel"].shape == (7, 561, 1, 64)
    assert tensors["dense/kernel"].shape == (1506, 200)
    assert tensors["dense_1/kernel"].shape == (200, 50)
    assert tensors["batch_normalization_9/moving_variance"].shape == (1506,)
    assert all(np.isfinite(v).all() for v in tensors.values())


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=16000, n_fft=512, n_mels=96)
    np.testing.assert_allclose(musicnn.mel_filterbank().numpy(), expected, rtol=1e-5, atol=1e-8)


def test_short_audio_error():
    with pytest.raises(ValueError, match="at least 187"):
        musicnn.embed_patches(torch.randn(16000))
