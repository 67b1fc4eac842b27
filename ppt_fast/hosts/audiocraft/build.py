"""Building and loading MusicGen models: the embedded tiny model, random-init real shapes, real checkpoints.

Names `load_model` understands:
- `"tiny-random"`: a small MusicGen built in code from audiocraft's own classes (LMModel with the delay pattern and
  cross-attention conditioning on a LUT text conditioner with a word-hash tokenizer; EncodecModel with a small
  SEANet + RVQ), deterministic from `seed`, no downloads, no spaCy model. 16 kHz mono, 50 Hz frames, 4 codebooks of
  64 entries, LM dim 64, 2 layers, 4 heads.
- `"tiny"`: the embedded default, trained here (`ppt-fast pretrain`, see `ppt_fast.tiny.pretrain`): a mel-RVQ codec
  (16 kHz, 50 Hz frames, 8 x 1024 codes) and an 8.6 M-parameter LMModel (dim 256, 4 layers) trained on 16 rendered
  instruments; weights in `ppt_fast/assets/tiny-v8.pt` (+ `.json` provenance).
- a `.pt` weights file written by `ppt-fast pretrain --out FILE`.
- `"musicgen-small-shapes"`, `"musicgen-medium-shapes"`, `"musicgen-large-shapes"`: random-init LMs with the real
  MusicGen shapes (dim 1024/1536/2048, 24/48/48 layers, 4 x 2048 codes, no biases, norm-first), conditioned through a
  LUT conditioner whose 768-d table feeds a `output_proj` shaped exactly like T5-base's (768 -> dim); with a
  random-init 32 kHz EnCodec-shaped compression model. For benchmarks; no downloads.
- a directory holding an audiocraft checkpoint (`state_dict.bin`, `compression_state_dict.bin`), or a hub id such as
  `facebook/musicgen-small` found in the local Hugging Face cache (set `HF_HUB_OFFLINE=1` to be sure nothing is
  fetched); T5 (`t5-base`) must be cached too.
- an audiocraft `MusicGen` object passed in directly.

Every returned model has an identifier bank attached (`model.lm._ppt_fast_identifier_bank`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

import torch

from .patches import install_identifiers

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "audiocraft is not installed. Install it with `make install` (or `bash scripts/install_audiocraft.sh` inside "
    "your virtualenv): `pip install audiocraft==1.3.0` alone fails on Python 3.11 (its pins), the script installs "
    "it with --no-deps and the dependencies that work"
)

SHAPES = {
    "musicgen-small-shapes": dict(dim=1024, num_heads=16, num_layers=24),
    "musicgen-medium-shapes": dict(dim=1536, num_heads=24, num_layers=48),
    "musicgen-large-shapes": dict(dim=2048, num_heads=32, num_layers=48),
}
TINY_NAMES = ("tiny", "tiny-random")
MODEL_NAMES = (*TINY_NAMES, *SHAPES)


def require_audiocraft() -> Any:
    """Import audiocraft (takes ~10 s) or raise an ImportError saying how to install it."""
    try:
        import audiocraft  # noqa: F401
        from audiocraft.models import MusicGen  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    import audiocraft

    return audiocraft


class WordHashTokenizer:
    """Lower-cased words (letters, digits, apostrophes, hyphens) hashed into `n_bins - 1` bins; index 0 pads.

    A drop-in for audiocraft's `WhiteSpaceTokenizer` that needs no spaCy model (so nothing is downloaded).
    Uses a stable hash (blake2b), not Python's salted `hash`.
    """

    def __init__(self, n_bins: int, pad_idx: int = 0, max_words: int = 64) -> None:
        self.n_bins = n_bins
        self.pad_idx = pad_idx
        self.max_words = max_words

    def index(self, word: str) -> int:
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return 1 + h % (self.n_bins - 1)

    def __call__(self, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = []
        for text in texts:
            words = [] if text is None else re.findall(r"[\w'-]+", text.lower())[: self.max_words]
            seqs.append([self.index(w) for w in words])
        n = max(1, max(len(s) for s in seqs))
        tokens = torch.full((len(seqs), n), self.pad_idx, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.int)
        for i, s in enumerate(seqs):
            if s:
                tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
        return tokens, mask


def _text_provider(n_bins: int, lut_dim: int, output_dim: int):
    from audiocraft.modules.conditioners import ConditioningProvider, LUTConditioner

    cond = LUTConditioner(n_bins=n_bins, dim=lut_dim, output_dim=output_dim, tokenizer="noop")
    cond.tokenizer = WordHashTokenizer(n_bins)
    return ConditioningProvider({"description": cond})


def _lm(
    dim: int, num_heads: int, num_layers: int, n_q: int, card: int, *, lut_bins: int, lut_dim: int, musicgen: bool,
    cfg_dropout: float = 0.1, dropout: float = 0.1, hidden_scale: int = 4,
):  # fmt: skip
    from audiocraft.models.lm import LMModel
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
    from audiocraft.modules.conditioners import ConditionFuser

    pattern = DelayedPatternProvider(n_q=n_q)
    provider = _text_provider(lut_bins, lut_dim, dim)
    fuser = ConditionFuser({"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []})
    kwargs: dict[str, Any] = dict(
        n_q=n_q, card=card, dim=dim, num_heads=num_heads, num_layers=num_layers, hidden_scale=hidden_scale,
        cross_attention=True, causal=True, cfg_dropout=cfg_dropout, cfg_coef=3.0, positional_embedding="sin",
        activation="gelu", norm="layer_norm", dropout=dropout,
    )  # fmt: skip
    if musicgen:
        # musicgen_lm.yaml: no biases, norm-first, gaussian init scaled by depth, memory-efficient attention.
        kwargs.update(
            bias_proj=False, bias_ff=False, bias_attn=False, norm_first=True, weight_init="gaussian",
            depthwise_init="current", zero_bias_init=True, memory_efficient=True,
        )  # fmt: skip
    else:
        kwargs.update(norm_first=True, custom=True, weight_init="gaussian", depthwise_init="current")
    return LMModel(pattern, provider, fuser, **kwargs)


def _compression(sample_rate: int, ratios: list[int], dimension: int, n_filters: int, n_q: int, bins: int):
    from audiocraft.models.encodec import EncodecModel
    from audiocraft.modules import SEANetDecoder, SEANetEncoder
    from audiocraft.quantization import ResidualVectorQuantizer

    hop = 1
    for r in ratios:
        hop *= r
    frame_rate = sample_rate // hop
    seanet = dict(n_filters=n_filters, n_residual_layers=1, dimension=dimension, ratios=ratios)
    encoder = SEANetEncoder(**seanet)
    decoder = SEANetDecoder(**seanet)
    quantizer = ResidualVectorQuantizer(dimension=dimension, bins=bins, n_q=n_q, kmeans_init=False)
    model = EncodecModel(encoder, decoder, quantizer, frame_rate=frame_rate, sample_rate=sample_rate, channels=1)
    return model.eval()


def build_tiny(seed: int = 0, device: str | torch.device = "cpu"):
    """The tiny random-init MusicGen (see the module docstring); deterministic from `seed`."""
    require_audiocraft()
    from audiocraft.models import MusicGen

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        compression = _compression(16000, [8, 5, 4, 2], dimension=32, n_filters=8, n_q=4, bins=64)
        # Spread the random codebooks over what the random encoder produces on a fixed noise + tone signal, so
        # different sounds map to different codes (a random encoder's outputs rarely reach random codebooks).
        t = torch.arange(16000 * 4) / 16000
        probe = 0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + t)) + 0.1 * torch.randn_like(t)
        with torch.no_grad():
            # A random SEANet maps every input to nearly the same latent (per-dim std ~0.007 around a mean ~0.04),
            # so a random decoder would play the same sound for any codes. Fold a standardisation into the
            # encoder's last conv (latents ~ N(0, 1) per dim on the probe): encode and decode then both react to
            # the audio / the codes.
            z = compression.encoder(probe.view(1, 1, -1))[0]  # [D, F]
            mean, std = z.mean(1), z.std(1).clamp_min(1e-6)
            last = compression.encoder.model[-1].conv.conv
            last.weight.div_(std.view(-1, 1, 1))
            last.bias.sub_(mean).div_(std)
            frames = compression.encoder(probe.view(1, 1, -1))[0].t()  # [F, D]
            residual = frames
            for layer in compression.quantizer.vq.layers:
                cb = layer._codebook
                pick = torch.randperm(residual.shape[0])[: cb.embed.shape[0]]
                chosen = residual[pick] + 1e-3 * torch.randn_like(residual[pick])
                cb.embed.copy_(chosen)
                cb.embed_avg.copy_(chosen)
                cb.inited.fill_(1)
                q = cb.decode(cb.encode(residual))
                residual = residual - q
            # Same for the decoder's output: remove its DC offset and bring it to a 0.2 RMS on the probe's codes.
            codes, _ = compression.encode(probe.view(1, 1, -1))
            y = compression.decode(codes)
            out = compression.decoder.model[-1].conv.conv
            out.bias.sub_(y.mean())
            gain = 0.2 / float(y.std().clamp_min(1e-6))
            out.weight.mul_(gain)
            out.bias.mul_(gain)
        lm = _lm(64, 4, 2, n_q=4, card=64, lut_bins=512, lut_dim=64, musicgen=False)
    model = MusicGen("tiny-random", compression.to(device), lm.to(device).eval(), max_duration=30.0)
    model.set_generation_params(duration=2.0, top_k=32)
    install_identifiers(model.lm)
    return model


def build_shapes(name: str, seed: int = 0, device: str | torch.device = "cpu", with_compression: bool = True):
    """Random-init LM with the real musicgen small/medium/large shapes (see the module docstring)."""
    require_audiocraft()
    from audiocraft.models import MusicGen

    if name not in SHAPES:
        raise ValueError(f"unknown shapes {name!r}; choose one of {', '.join(SHAPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # EnCodec 32 kHz shapes: ratios 8*5*4*4 = 640 -> 50 Hz, 4 codebooks of 2048.
        compression = _compression(32000, [8, 5, 4, 4], dimension=128, n_filters=64, n_q=4, bins=2048)
        lm = _lm(**SHAPES[name], n_q=4, card=2048, lut_bins=1024, lut_dim=768, musicgen=True)
    model = MusicGen(name, compression.to(device), lm.to(device).eval(), max_duration=30.0)
    install_identifiers(model.lm)
    return model


def _hf_cached(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(repo_id, filename)
    return path if isinstance(path, str) else None


def _load_checkpoint(name: str, device: str | torch.device):
    require_audiocraft()
    from audiocraft.models import MusicGen

    missing: list[str] = []
    if os.path.isdir(name):
        for f in ("state_dict.bin", "compression_state_dict.bin"):
            if not os.path.isfile(os.path.join(name, f)):
                missing.append(os.path.join(name, f))
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        for f in ("state_dict.bin", "compression_state_dict.bin"):
            if _hf_cached(name, f) is None:
                missing.append(f"{name}/{f} (Hugging Face cache)")
    else:
        raise ValueError(
            f"model {name!r} is neither a built-in name ({', '.join(MODEL_NAMES)}), nor an existing checkpoint "
            "directory, nor a hub id like 'facebook/musicgen-small'"
        )
    if not missing and _hf_cached("t5-base", "config.json") is None:
        missing.append("t5-base (Hugging Face cache; MusicGen's text encoder)")
    if missing:
        raise FileNotFoundError(
            f"cannot load MusicGen {name!r} offline; missing: {'; '.join(missing)}. Fetch it once with network "
            f"access (e.g. `huggingface-cli download {name if '/' in name else 'facebook/musicgen-small'}` and "
            "`huggingface-cli download t5-base`), then run with HF_HUB_OFFLINE=1, or pass a local audiocraft "
            "checkpoint directory. ppt_fast ships no MusicGen weights; model='tiny' needs none."
        )
    model = MusicGen.get_pretrained(name, device=str(device))
    install_identifiers(model.lm)
    return model
