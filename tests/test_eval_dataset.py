"""The rendered concept dataset: determinism, manifest contents, renderer errors."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from ppt_fast import synth
from ppt_fast.eval import dataset

pytest.importorskip("tinysoundfont")
pytest.importorskip("pretty_midi")


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_build_is_deterministic_and_manifest_complete(tmp_path):
    kw = dict(concepts=["violin", "drums"], seconds=3.0, heldout=2, heldout_seconds=2.0, sample_rate=16000)
    a = dataset.build(str(tmp_path / "a"), **kw)
    b = dataset.build(str(tmp_path / "b"), **kw)
    ma, mb = dataset.load_manifest(a), dataset.load_manifest(b)
    assert ma.concepts == ["violin", "drums"]
    data = json.load(open(a))
    assert data["renderer"] == "tinysoundfont"
    assert data["soundfont"]["name"] == "TimGM6mb.sf2" and "GPL-2" in data["soundfont"]["licence"]
    for name in ma.concepts:
        c = ma.concept(name)
        assert {"name", "description", "tags", "reference", "heldout"} <= set(c)
        paths = [ma.reference_path(name), *ma.heldout_paths(name)]
        assert len(paths) == 3
        seeds = [c["reference"]["seed"]] + [h["seed"] for h in c["heldout"]]
        assert len(set(seeds)) == 3  # different compositions
        for pa, pb in zip(paths, [mb.reference_path(name), *mb.heldout_paths(name)]):
            assert _sha(pa) == _sha(pb)  # bit-reproducible
        audio, sr = synth.read_wav(paths[0])
        assert sr == 16000 and audio.shape == (1, 3 * 16000)
        rms = float(np.sqrt(np.mean(audio**2)))
        assert 0.03 < rms < 0.2  # normalised to -20 dBFS (peaks capped)
    # a different base seed gives different compositions
    c = dataset.build(str(tmp_path / "c"), **{**kw, "seed": 1})
    assert _sha(dataset.load_manifest(c).reference_path("violin")) != _sha(ma.reference_path("violin"))


def test_compositions_differ_between_seeds_and_styles():
    waltz = synth.compose(synth.CONCEPTS["piano_waltz"], 1, 10.0)
    arps = synth.compose(synth.CONCEPTS["piano_arpeggios"], 1, 10.0)
    assert waltz != synth.compose(synth.CONCEPTS["piano_waltz"], 2, 10.0)
    assert waltz == synth.compose(synth.CONCEPTS["piano_waltz"], 1, 10.0)
    # arpeggios: one short note at a time; the waltz: chords (several notes starting together), longer notes
    assert max(collections.Counter(n.start for n in arps).values()) == 1
    assert max(collections.Counter(n.start for n in waltz).values()) >= 3
    assert np.mean([n.end - n.start for n in arps]) < 0.7 * np.mean([n.end - n.start for n in waltz])
    assert all(n.start < 10.0 and n.end > n.start for n in waltz + arps)
    assert all(0 <= n.pitch <= 127 and 1 <= n.velocity <= 127 for n in waltz + arps)


def test_all_concepts_listed():
    assert len(synth.CONCEPTS) >= 10
    assert {"piano", "violin", "nylon_guitar", "trumpet", "flute", "organ", "marimba", "drums"} <= set(synth.CONCEPTS)
    assert set(dataset.EVAL_CONCEPTS) <= set(synth.CONCEPTS) and len(dataset.EVAL_CONCEPTS) == 10
    styles = [synth.CONCEPTS[n] for n in dataset.EVAL_CONCEPTS if synth.CONCEPTS[n].style in ("waltz", "arpeggios")]
    assert len({c.program for c in styles}) == 1 and len(styles) == 2  # two styles on one instrument
    assert len(synth.CONCEPTS) >= 20  # + the pretraining corpus' timbres


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="renderer"):
        dataset.build(str(tmp_path), renderer="timidity")
    with pytest.raises(ValueError, match="choose from"):
        dataset.build(str(tmp_path), concepts=["kazoo"])
    with pytest.raises(FileNotFoundError, match="soundfont"):
        dataset.build(str(tmp_path), concepts=["piano"], seconds=1, soundfont=str(tmp_path / "missing.sf2"))
    if shutil.which("fluidsynth") is None:
        with pytest.raises(FileNotFoundError, match="apt-get install fluidsynth"):
            dataset.build(str(tmp_path), renderer="fluidsynth")
    with pytest.raises(ValueError, match="not a ppt_fast concept manifest"):
        p = tmp_path / "m.json"
        p.write_text("{}")
        dataset.load_manifest(str(p))


@pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not os.path.exists(synth.FLUID_R3),
    reason="needs apt packages fluidsynth + fluid-soundfont-gm",
)
def test_fluidsynth_renderer(tmp_path):
    m = dataset.load_manifest(
        dataset.build(str(tmp_path), concepts=["flute"], seconds=2.0, heldout=0, renderer="fluidsynth")
    )
    audio, sr = synth.read_wav(m.reference_path("flute"))
    assert sr == 32000 and audio.shape == (1, 64000) and np.abs(audio).max() > 0.05
    assert m.data["soundfont"]["name"] == "FluidR3_GM.sf2" and "MIT" in m.data["soundfont"]["licence"]


def test_midi_writer_roundtrip(tmp_path):
    mido = pytest.importorskip("mido")
    notes = synth.compose(synth.CONCEPTS["marimba"], 3, 4.0)
    path = str(tmp_path / "x.mid")
    synth.write_midi(notes, {0: (12, False)}, path)
    mid = mido.MidiFile(path)
    ons = [m for m in mid.tracks[0] if m.type == "note_on" and m.velocity > 0]
    assert len(ons) == len(notes)
    assert abs(mid.length - max(n.end for n in notes)) < 0.01
