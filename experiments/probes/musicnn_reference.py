"""Compute reference outputs of the ORIGINAL musicnn MTT tagger (TensorFlow) on fixed inputs, once.

The PyTorch port (ppt_fast/eval/musicnn.py) is tested against the file this writes
(tests/data/musicnn_reference.npz); CI never installs TensorFlow. Run it in a throw-away venv outside the repo:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tf_keras librosa
    /tmp/tfvenv/bin/pip install --no-deps musicnn==0.1.0
    TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python experiments/probes/musicnn_reference.py \
        tests/data/musicnn_reference.npz

(versions used for the committed file: tensorflow-cpu 2.21.0, tf_keras 2.21.0, librosa 0.11.0, numpy 2.4.6)

Inputs: two deterministic synthetic clips at 16 kHz stored as int16 (a harmonic "plucked" melody with a noise-burst
beat, 6.5 s = 2 patches + a tail; a quieter sustained-pad chord clip, 3.2 s = 1 patch). Stored per clip:
the int16 audio, librosa's log-mel (``log10(10000 * mel + 1)`` in float32, pad_mode='reflect' as librosa had it when
musicnn was trained), and the TF graph's taggram / penultimate / max_pool / mean_pool / logits on every 187-frame
patch of that log-mel, computed patch by patch (not through musicnn.extractor(), whose batching loop returns the
first patch's penultimate features for every patch).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import librosa  # noqa: E402
import numpy as np  # noqa: E402

SR, N_FFT, HOP, N_MELS, PATCH = 16000, 512, 256, 96, 187


def synth_plucked(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    notes = [220.0, 277.18, 329.63, 440.0, 392.0, 329.63, 293.66, 246.94]
    step = 0.4
    for i, start in enumerate(np.arange(0, seconds, step)):
        f0 = notes[i % len(notes)]
        m = t >= start
        tt = t[m] - start
        env = np.exp(-tt * 5.0)
        out[m] += sum(np.sin(2 * np.pi * f0 * k * tt) * env / k**1.3 for k in range(1, 9)) * 0.3
    rng = np.random.default_rng(1234)
    noise = rng.standard_normal(t.size)
    for start in np.arange(0, seconds, 0.8):  # noise bursts: a crude beat
        m = (t >= start) & (t < start + 0.15)
        out[m] += noise[m] * np.exp(-(t[m] - start) * 30.0) * 0.5
    return out


def synth_pad(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    chord = [130.81, 164.81, 196.0, 261.63]
    vib = 1 + 0.003 * np.sin(2 * np.pi * 5 * t)
    out = sum(np.sin(2 * np.pi * f * vib * t) + 0.3 * np.sin(4 * np.pi * f * vib * t) for f in chord)
    return 0.05 * out * np.minimum(1.0, t / 0.3)


def to_int16(x: np.ndarray) -> np.ndarray:
    x = x / max(1.0, float(np.abs(x).max()) / 0.9)
    return np.round(x * 32767).astype(np.int16)


def logmel(audio: np.ndarray) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=audio, sr=SR, hop_length=HOP, n_fft=N_FFT, n_mels=N_MELS, pad_mode="reflect"
    ).T.astype(np.float32)
    return np.log10(np.float32(10000.0) * mel + np.float32(1.0)).astype(np.float32)


def main(out_path: str) -> None:
    import tensorflow as tf
    from musicnn import models

    tf.compat.v1.disable_eager_execution()
    clips = {"plucked": to_int16(synth_plucked(6.5)), "pad": to_int16(synth_pad(3.2))}
    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, PATCH, N_MELS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        y, timbral, temporal, cnn1, cnn2, cnn3, mean_pool, max_pool, penultimate = models.define_model(
            x, is_training, "MTT_musicnn", 50
        )
        normalized_y = tf.nn.sigmoid(y)
    sess = tf.compat.v1.Session()
    sess.run(tf.compat.v1.global_variables_initializer())
    saver = tf.compat.v1.train.Saver()
    saver.restore(sess, os.path.join(os.path.dirname(models.__file__), "MTT_musicnn") + "/")
    out: dict[str, np.ndarray] = {}
    for name, pcm in clips.items():
        audio = pcm.astype(np.float32) / 32768.0
        rep = logmel(audio)
        starts = range(0, rep.shape[0] - PATCH + 1, PATCH)
        batch = np.stack([rep[s : s + PATCH] for s in starts])
        res = {k: [] for k in ("taggram", "logits", "penultimate", "max_pool", "mean_pool")}
        for patch in batch:  # one patch per run, as musicnn does (BATCH_SIZE = 1)
            tg, lg, pen, mx, mn = sess.run(
                [normalized_y, y, penultimate, max_pool, mean_pool], feed_dict={x: patch[None], is_training: False}
            )
            for k, v in zip(res, (tg, lg, pen, mx, mn)):
                res[k].append(v[0])
        out[f"{name}/audio_int16"] = pcm
        out[f"{name}/logmel"] = rep
        for k, v in res.items():
            out[f"{name}/{k}"] = np.stack(v).astype(np.float32)
        top = np.argsort(-out[f"{name}/taggram"].mean(0))[:5]
        print(name, rep.shape, batch.shape, "top tags:", top.tolist())
    sess.close()
    out["versions"] = np.array(f"tensorflow {tf.__version__}; librosa {librosa.__version__}; numpy {np.__version__}")
    np.savez_compressed(out_path, **out)
    print("wrote", out_path, os.path.getsize(out_path), "bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/musicnn_reference.npz")
