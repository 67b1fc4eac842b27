"""The four metrics on a small rendered subset of the concept dataset, plus bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppt_fast.eval import audio_alignment, copying, dataset, diversity, features, musicnn, retrieval, text_alignment
from ppt_fast.eval.metrics import prompt_tags
from ppt_fast.synth import read_wav

pytest.importorskip("tinysoundfont")
needs_musicnn = pytest.mark.skipif(not musicnn.is_available(), reason="pip install --no-deps musicnn==0.1.0")

SR = 32000
SUBSET = ["piano", "violin", "trumpet", "drums", "nylon_guitar"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """5 concepts, 8-s references, 2 held-out 4-s clips each (≈2 s to render)."""
    out = tmp_path_factory.mktemp("concepts")
    path = dataset.build(str(out), concepts=SUBSET, seconds=8.0, heldout=2, heldout_seconds=4.0, sample_rate=SR)
    return dataset.load_manifest(path)


def _clip(ds, name, which=0):
    path = ds.reference_path(name) if which < 0 else ds.heldout_paths(name)[which]
    return torch.from_numpy(read_wav(path)[0])


@needs_musicnn
def test_retrieval_same_concept_scores_higher(ds):
    r = retrieval(ds.path, embedder="musicnn")
    assert r["n"] == 2 * len(SUBSET)
    assert r["top1"] >= 0.9, r["confusions"]
    assert r["same_mean"] > r["different_mean"] + 0.2


def test_retrieval_weight_free_embedder_ranks_too(ds):
    r = retrieval(ds.path, embedder="mfcc")
    assert r["top1"] >= 0.6, r["confusions"]
    assert r["same_mean"] > r["different_mean"]


@needs_musicnn
def test_audio_alignment_batch_and_resampling(ds):
    ref = _clip(ds, "violin", -1)
    same = torch.stack([_clip(ds, "violin", 0), _clip(ds, "violin", 1)])  # [2, 1, T]
    other = torch.stack([_clip(ds, "drums", 0), _clip(ds, "trumpet", 0)])
    s_same, s_other = audio_alignment(same, ref, SR), audio_alignment(other, ref, SR)
    assert s_same > s_other + 0.2
    # a [C, T] stereo clip and a reference at another rate give the same number (within resampling error)
    stereo = same[0].expand(2, -1)
    ref16 = features.resample(ref, SR, 16000)
    a = audio_alignment(stereo, ref16, SR, reference_sample_rate=16000)
    b = audio_alignment(same[0], ref, SR)
    assert abs(a - b) < 0.01
    # batched = mean of single clips
    singles = [audio_alignment(same[i], ref, SR) for i in range(2)]
    assert abs(s_same - sum(singles) / 2) < 1e-5


@needs_musicnn
def test_copying_detects_verbatim_excerpts(ds):
    ref = _clip(ds, "piano", -1)
    g = torch.Generator().manual_seed(0)
    start = 54321  # not a multiple of the 256-sample hop at 16 kHz
    excerpt = 0.5 * ref[:, start : start + 4 * SR] + 0.003 * torch.randn(1, 4 * SR, generator=g)
    new_piece = _clip(ds, "piano", 0)
    copied, fresh = copying(excerpt, ref, SR), copying(new_piece, ref, SR)
    assert copied > 0.9
    assert fresh < 0.65
    assert copied > fresh + 0.3
    # embedding similarity cannot tell them apart: both are "piano"
    assert audio_alignment(new_piece, ref, SR) > 0.8


@needs_musicnn
def test_diversity(ds):
    varied = torch.stack([_clip(ds, n, 0) for n in ("piano", "violin", "drums")])
    same_piece = torch.stack([_clip(ds, "piano", 0), 0.7 * _clip(ds, "piano", 0)])
    d_varied, d_same = diversity(varied, SR), diversity(same_piece, SR)
    assert d_varied > 0.2
    # a gain change is hardly diversity (log10(10000 x + 1) is not exactly gain-invariant: measured 0.005)
    assert d_same < 0.02
    with pytest.raises(ValueError, match="at least 2 clips"):
        diversity(varied[:1], SR)


@needs_musicnn
def test_text_alignment_tag_proxy(ds):
    violin = _clip(ds, "violin", 0)
    drums = _clip(ds, "drums", 0)
    s = text_alignment(violin, "a violin piece, slow", SR)
    assert s.method == "musicnn-tag-proxy" and s.tags == ("violin", "slow")
    assert "not CLAP" in s.label
    assert float(text_alignment(drums, "drums", SR)) > float(text_alignment(violin, "drums", SR))
    none = text_alignment(violin, "<v1> in a large hall", SR)
    assert math.isnan(none.value) and none.tags == ()


def test_prompt_tags():
    assert prompt_tags("Fast piano, no vocals!") == ("fast", "piano", "no vocals")
    assert prompt_tags("<v1>, <v2>, electronic dance music") == ("electronic", "dance")
    assert prompt_tags("drum and percussion") == ("drums",)


def test_clap_unavailable_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="clap_checkpoint"):
        text_alignment(torch.randn(1, SR * 4), "piano", SR, clap_checkpoint=str(tmp_path / "nope.pt"))
    ckpt = tmp_path / "clap.pt"
    ckpt.write_bytes(b"x")
    try:
        import laion_clap  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install laion-clap"):
            text_alignment(torch.randn(1, SR * 4), "piano", SR, clap_checkpoint=str(ckpt))


@pytest.mark.parametrize("embedder", ["mfcc", pytest.param("musicnn", marks=needs_musicnn)])
def test_bad_input(embedder):
    ref = 0.1 * torch.randn(1, SR * 4)
    with pytest.raises(ValueError, match="pad='repeat'"):
        audio_alignment(torch.randn(1, SR), ref, SR, embedder=embedder)
    # repeat-padding makes a short clip usable
    assert -1.0 <= audio_alignment(0.1 * torch.randn(1, SR), ref, SR, embedder=embedder, pad="repeat") <= 1.0
    with pytest.raises(ValueError, match="reference is silent"):
        audio_alignment(ref, torch.zeros(1, SR * 4), SR, embedder=embedder)
    assert audio_alignment(torch.zeros(1, SR * 4), ref, SR, embedder=embedder) == 0.0  # silent clip: 0, warned
    with pytest.raises(ValueError, match="channels first"):
        audio_alignment(ref.T.contiguous(), ref, SR, embedder=embedder)
    with pytest.raises(ValueError, match="sample_rate"):
        audio_alignment(ref, ref, 32000.5, embedder=embedder)
    with pytest.raises(ValueError, match="embedder"):
        audio_alignment(ref, ref, SR, embedder="clap")
    with pytest.raises(ValueError, match="NaN"):
        audio_alignment(torch.full((1, SR * 4), float("nan")), ref, SR, embedder=embedder)
    with pytest.raises(ValueError, match="window_seconds"):
        copying(torch.randn(1, SR), ref, SR)


def test_resample_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    t = np.arange(32000 * 2) / 32000
    x = (np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    ours = features.resample(torch.from_numpy(x), 32000, 16000).numpy()
    ref = signal.resample_poly(x, 1, 2)
    assert ours.shape == ref.shape
    inner = slice(200, -200)  # edges differ by the filters' zero padding
    assert np.abs(ours[inner] - ref[inner]).max() < 5e-3
    up = features.resample(torch.from_numpy(x[:4410]), 44100, 48000)
    assert up.shape[-1] == math.ceil(4410 * 48000 / 44100)
