"""The musicnn MagnaTagATune tagger (Pons & Serra, 2019) ported to PyTorch, read from the TF1 checkpoint without TF.

The `musicnn` wheel (PyPI 0.1.0, ISC licence; install it with ``pip install --no-deps musicnn==0.1.0`` because its
metadata pins TensorFlow) ships TF1 checkpoints. This module parses the checkpoint's ``.index`` (a LevelDB-style
SSTable of ``BundleEntryProto`` records) and ``.data-00000-of-00001`` (raw little-endian tensors) itself, and rebuilds
the network in PyTorch. What had to match the TF graph exactly (``musicnn/models.py``):

- front end: log-mel at 16 kHz, n_fft 512, hop 256, 96 Slaney mels (librosa's defaults), ``log10(10000 x + 1)``
  computed in float32 (upstream casts the mel to float16 first, which overflows to ``inf`` for loud input);
- 3-s patches of 187 frames; BatchNorm (eps 1e-3, moving statistics) applied *after* the ReLU of each conv;
- TF ``'same'`` padding of the even temporal kernels (128, 64, 32) pads ``k//2 - 1`` before and ``k//2`` after;
- the back end's ``flatten(concat([max, mean], axis=2))`` interleaves max and mean per channel.

Upstream ``musicnn.extractor()`` returns the *first* patch's ``penultimate`` (and cnn1..3) features for every patch
(a variable-name slip in its batching loop); this port computes every patch.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.util
import logging
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
PATCH_FRAMES = 187
#: Fewest samples (at 16 kHz) that give one full patch with a centred STFT: 1 + T // HOP >= 187.
MIN_SAMPLES = (PATCH_FRAMES - 1) * HOP
BN_EPS = 1e-3

MTT_LABELS = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano", "ambient",
    "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing", "vocals", "no vocals",
    "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man",
    "classic", "choir", "voice", "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello",
    "no voice", "weird", "country", "metal", "female voice", "choral",
)  # fmt: skip

_INSTALL_HINT = "install the checkpoint files with `pip install --no-deps musicnn==0.1.0` (no TensorFlow is needed)"


# --------------------------------------------------------------------------------------------------------------------
# TF1 checkpoint reader (tensor bundle V2): no TensorFlow, no protobuf package.
# --------------------------------------------------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16, 10: np.bool_}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value) pairs (varint, fixed and length-delimited only)."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = struct.unpack_from("<Q", buf, i)[0], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = struct.unpack_from("<I", buf, i)[0], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((field, value))
    return out


def _table_block(buf: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    if buf[offset + size] != 0:  # the 1-byte trailer after each block names its compression
        raise ValueError("compressed checkpoint index blocks are not supported (TF writes them uncompressed)")
    data = buf[offset : offset + size]
    n_restarts = struct.unpack_from("<I", data, len(data) - 4)[0]
    end = len(data) - 4 - 4 * n_restarts
    entries, i, key = [], 0, b""
    while i < end:
        shared, i = _varint(data, i)
        unshared, i = _varint(data, i)
        value_len, i = _varint(data, i)
        key = key[:shared] + data[i : i + unshared]
        i += unshared
        entries.append((key, data[i : i + value_len]))
        i += value_len
    return entries


def read_tf_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Read every tensor of a TF (V2 bundle) checkpoint: ``prefix + '.index'`` and ``prefix + '.data-*'``.

    Returns ``{variable name: array}`` with TF's layouts (conv kernels ``[kh, kw, in, out]``, dense ``[in, out]``).
    """
    with open(prefix + ".index", "rb") as f:
        index = f.read()
    if len(index) < 48 or struct.unpack("<Q", index[-8:])[0] != _TABLE_MAGIC:
        raise ValueError(f"{prefix}.index is not a TF checkpoint index (bad table magic)")
    footer = index[-48:]
    _, j = _varint(footer, 0)  # metaindex offset
    _, j = _varint(footer, j)  # metaindex size
    index_off, j = _varint(footer, j)
    index_size, _ = _varint(footer, j)
    entries: dict[str, tuple[int, tuple[int, ...], int, int, int]] = {}
    num_shards = 1
    for _, handle in _table_block(index, index_off, index_size):
        block_off, k = _varint(handle, 0)
        block_size, _ = _varint(handle, k)
        for key, value in _table_block(index, block_off, block_size):
            fields = _proto_fields(value)
            if key == b"":  # BundleHeaderProto: num_shards = 1, endianness = 2
                for num, val in fields:
                    if num == 1:
                        num_shards = int(val)
                    if num == 2 and val != 0:
                        raise ValueError("big-endian checkpoints are not supported")
                continue
            dtype, shape, shard, offset, size = 1, (), 0, 0, 0
            for num, val in fields:
                if num == 1:
                    dtype = int(val)
                elif num == 2:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1 }
                    shape = tuple(int(dict(_proto_fields(dim)).get(1, 0)) for n, dim in _proto_fields(val) if n == 2)
                elif num == 3:
                    shard = int(val)
                elif num == 4:
                    offset = int(val)
                elif num == 5:
                    size = int(val)
                elif num == 7:
                    raise ValueError(f"sliced (partitioned) variable {key!r} is not supported")
            entries[key.decode()] = (dtype, shape, shard, offset, size)
    tensors: dict[str, np.ndarray] = {}
    shards: dict[int, bytes] = {}
    for name, (dtype, shape, shard, offset, size) in entries.items():
        if dtype not in _TF_DTYPES:
            continue
        if shard not in shards:
            with open(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}", "rb") as f:
                shards[shard] = f.read()
        np_dtype = np.dtype(_TF_DTYPES[dtype]).newbyteorder("<")
        count = math.prod(shape)
        if count * np_dtype.itemsize != size:
            raise ValueError(f"checkpoint entry {name}: shape {shape} does not match its {size} bytes")
        tensors[name] = np.frombuffer(shards[shard], dtype=np_dtype, count=count, offset=offset).reshape(shape).copy()
    return tensors


def checkpoint_prefix(model: str = "MTT_musicnn") -> str:
    """Path prefix of the checkpoint shipped in the installed ``musicnn`` wheel (e.g. ``.../MTT_musicnn/``)."""
    if model != "MTT_musicnn":
        raise ValueError(f"model={model!r}: only 'MTT_musicnn' is ported (its 200-d embedding and 50 MTT tags)")
    spec = importlib.util.find_spec("musicnn")  # locate without importing (musicnn's modules import TensorFlow)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the musicnn package is not installed: {_INSTALL_HINT}")
    prefix = os.path.join(list(spec.submodule_search_locations)[0], model) + os.sep
    if not os.path.exists(prefix + ".index"):
        raise FileNotFoundError(f"{prefix}.index is missing from the musicnn install: {_INSTALL_HINT}")
    return prefix


# --------------------------------------------------------------------------------------------------------------------
# Front end: librosa-compatible mel spectrogram in torch.
# --------------------------------------------------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mels = f / f_sp
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> torch.Tensor:
    """Slaney-normalised triangular mel filters as librosa.filters.mel builds them: float32 ``[n_mels, n_fft//2+1]``."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def mel_power(audio: torch.Tensor, *, pad_mode: str = "reflect", hop: int = HOP) -> torch.Tensor:
    """Mel power spectrogram of 16-kHz mono audio ``[..., T]`` -> float32 ``[..., frames, 96]``, frames = 1 + T//hop.

    Matches ``librosa.feature.melspectrogram(y, sr=16000, n_fft=512, hop_length=256, n_mels=96, pad_mode=pad_mode)``
    (centred frames, periodic Hann window, power 2). ``reflect`` is what librosa used when musicnn was trained.
    """
    x = audio.to(torch.float32)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    spec = torch.stft(
        x,
        n_fft=N_FFT,
        hop_length=hop,
        window=torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=x.device),
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )
    power = spec.real.square() + spec.imag.square()  # [N, freq, frames]
    mel = torch.matmul(mel_filterbank().to(x.device), power)  # [N, 96, frames]
    return mel.transpose(1, 2).reshape(*lead, -1, N_MELS)


def log_mel(audio: torch.Tensor, hop: int = HOP) -> torch.Tensor:
    """musicnn's input representation: ``log10(10000 * mel + 1)`` in float32, ``[..., frames, 96]``."""
    return torch.log10(10000.0 * mel_power(audio, hop=hop) + 1.0)


def patches(logmel: torch.Tensor, hop_frames: int = PATCH_FRAMES) -> torch.Tensor:
    """Cut ``[frames, 96]`` into ``[n, 187, 96]`` patches (as musicnn batches: a shorter tail is dropped)."""
    frames = logmel.shape[-2]
    if frames < PATCH_FRAMES:
        raise ValueError(
            f"audio gives {frames} mel frames; musicnn needs at least {PATCH_FRAMES} "
            f"(≈{MIN_SAMPLES / SAMPLE_RATE:.2f} s at 16 kHz): pass longer audio or pad it (metrics: pad='repeat')"
        )
    starts = range(0, frames - PATCH_FRAMES + 1, hop_frames)
    return torch.stack([logmel[..., s : s + PATCH_FRAMES, :] for s in starts], dim=-3)


# --------------------------------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MusicnnOutput:
    """Per-patch outputs: ``taggram`` ``[n, 50]`` (sigmoid), ``penultimate`` ``[n, 200]``, ``logits`` ``[n, 50]``,
    ``max_pool`` / ``mean_pool`` ``[n, 753]`` (the back end's temporal pooling)."""

    taggram: torch.Tensor
    penultimate: torch.Tensor
    logits: torch.Tensor
    max_pool: torch.Tensor
    mean_pool: torch.Tensor


class _BN(torch.nn.Module):
    """Inference BatchNorm with TF's moving statistics (eps 1e-3) over the last axis... or channel axis 1."""

    def __init__(self, n: int):
        super().__init__()
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            self.register_buffer(name, torch.zeros(n))

    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = -1
        scale = self.gamma * torch.rsqrt(self.moving_variance + BN_EPS)
        shift = self.beta - self.moving_mean * scale
        return x * scale.view(shape) + shift.view(shape)


class MusicnnMTT(torch.nn.Module):
    """musicnn 'MTT_musicnn': log-mel patches ``[n, 187, 96]`` float32 -> :class:`MusicnnOutput`.

    Layout inside: NCHW with H = time (187) and W = mel band (96).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bn_input = _BN(1)
        self.conv74 = torch.nn.Conv2d(1, 204, (7, 38))
        self.bn74 = _BN(204)
        self.conv77 = torch.nn.Conv2d(1, 204, (7, 67))
        self.bn77 = _BN(204)
        self.temporal = torch.nn.ModuleList(torch.nn.Conv2d(1, 51, (k, 1)) for k in (128, 64, 32))
        self.bn_temporal = torch.nn.ModuleList(_BN(51) for _ in range(3))
        self.mid = torch.nn.ModuleList(
            [torch.nn.Conv2d(1, 64, (7, 561)), *(torch.nn.Conv2d(1, 64, (7, 64)) for _ in range(2))]
        )
        self.bn_mid = torch.nn.ModuleList(_BN(64) for _ in range(3))
        self.bn_pool = _BN(1506)
        self.dense = torch.nn.Linear(1506, 200)
        self.bn_dense = _BN(200)
        self.out = torch.nn.Linear(200, 50)
        self.requires_grad_(False)

    def load_tf(self, tensors: dict[str, np.ndarray]) -> None:
        """Copy TF variables in graph-creation order (``batch_normalization_<i>``, ``conv2d_<i>``, ``dense_<i>``)."""

        def name(base: str, i: int) -> str:
            return base if i == 0 else f"{base}_{i}"

        bns = [self.bn_input, self.bn74, self.bn77, *self.bn_temporal, *self.bn_mid, self.bn_pool, self.bn_dense]
        for i, bn in enumerate(bns):
            for field in ("gamma", "beta", "moving_mean", "moving_variance"):
                value = torch.from_numpy(tensors[f"{name('batch_normalization', i)}/{field}"])
                getattr(bn, field).copy_(value.reshape(getattr(bn, field).shape))
        convs = [self.conv74, self.conv77, *self.temporal, *self.mid]
        for i, conv in enumerate(convs):
            kernel = torch.from_numpy(tensors[f"{name('conv2d', i)}/kernel"])  # [kh, kw, in, out]
            if tuple(kernel.permute(3, 2, 0, 1).shape) != tuple(conv.weight.shape):
                raise ValueError(
                    f"conv2d_{i}: checkpoint {tuple(kernel.shape)} does not fit {tuple(conv.weight.shape)}"
                )
            conv.weight.copy_(kernel.permute(3, 2, 0, 1))
            conv.bias.copy_(torch.from_numpy(tensors[f"{name('conv2d', i)}/bias"]))
        for i, dense in enumerate((self.dense, self.out)):
            dense.weight.copy_(torch.from_numpy(tensors[f"{name('dense', i)}/kernel"]).T)
            dense.bias.copy_(torch.from_numpy(tensors[f"{name('dense', i)}/bias"]))

    def forward(self, x: torch.Tensor) -> MusicnnOutput:
        if x.dim() != 3 or x.shape[-1] != N_MELS:
            raise ValueError(f"musicnn expects log-mel patches [n, frames, {N_MELS}], got {tuple(x.shape)}")
        x = self.bn_input(x.to(torch.float32).unsqueeze(1))  # [n, 1, T, 96]
        padded = F.pad(x, (0, 0, 3, 3))
        front = []
        for conv, bn in ((self.conv74, self.bn74), (self.conv77, self.bn77)):
            front.append(bn(F.relu(conv(padded))).amax(dim=3))  # [n, 204, T]
        for conv, bn in zip(self.temporal, self.bn_temporal):
            k = conv.kernel_size[0]
            y = conv(F.pad(x, (0, 0, k // 2 - 1, k // 2)))  # TF 'same' for an even kernel: the extra row goes after
            front.append(bn(F.relu(y)).amax(dim=3))  # [n, 51, T]
        front_cat = torch.cat(front, dim=1)  # [n, 561, T]
        feats = [front_cat]
        h = front_cat
        for i, (conv, bn) in enumerate(zip(self.mid, self.bn_mid)):
            # TF convolves [n, T, C, 1] with a [7, C] kernel: here C is the width of a 1-channel image.
            y = bn(F.relu(conv(F.pad(h.transpose(1, 2).unsqueeze(1), (0, 0, 3, 3))))).squeeze(3)  # [n, 64, T]
            h = y if i == 0 else y + h
            feats.append(h)
        mid = torch.cat(feats, dim=1)  # [n, 753, T]
        max_pool, mean_pool = mid.amax(dim=2), mid.mean(dim=2)
        flat = torch.stack([max_pool, mean_pool], dim=2).reshape(mid.shape[0], -1)  # [max0, mean0, max1, mean1, ...]
        penultimate = self.bn_dense(F.relu(self.dense(self.bn_pool(flat))))
        logits = self.out(penultimate)
        return MusicnnOutput(torch.sigmoid(logits), penultimate, logits, max_pool, mean_pool)


@functools.lru_cache(maxsize=1)
def load_musicnn(model: str = "MTT_musicnn") -> MusicnnMTT:
    """The ported tagger with the wheel's weights (cached per process; eval mode, no grad)."""
    net = MusicnnMTT()
    net.load_tf(read_tf_checkpoint(checkpoint_prefix(model)))
    return net.eval()


def is_available() -> bool:
    """True when the musicnn checkpoint files are installed."""
    try:
        checkpoint_prefix()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


_CACHE: collections.OrderedDict[tuple[str, int], MusicnnOutput] = collections.OrderedDict()
_CACHE_SIZE = 64


@torch.no_grad()
def embed_patches(audio_16k: torch.Tensor, *, hop_frames: int = PATCH_FRAMES) -> MusicnnOutput:
    """Run the tagger over 3-s patches of one mono 16-kHz clip ``[T]`` (T >= 47616 samples).

    The last 64 results are cached by the audio's bytes, so the metrics that score the same clips (alignment,
    diversity, tag proxy) run the network once per clip.
    """
    if audio_16k.dim() != 1:
        raise ValueError(f"embed_patches takes one mono clip [T], got {tuple(audio_16k.shape)}")
    x = audio_16k.detach().to("cpu", torch.float32).contiguous()
    key = (hashlib.sha1(x.numpy().tobytes()).hexdigest(), hop_frames)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    out = load_musicnn()(patches(log_mel(x), hop_frames))
    _CACHE[key] = out
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out
