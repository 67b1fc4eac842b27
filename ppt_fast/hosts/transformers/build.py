"""Building and loading Hugging Face transformers MusicGen models, offline.

- `build_tiny_random(seed)`: a small random-init `MusicgenForConditionalGeneration` built in code from its three
  sub-configs (a 1-layer T5 encoder, a small EnCodec, a 2-layer decoder with 4 codebooks of 64 codes), with a
  word-hash tokenizer built in code (`WordHashTokenizer`); no downloads. For tests.
- `build_shapes(name)`: random-init decoders with the real MusicGen shapes (small / medium / large) behind a
  t5-base-shaped encoder and a 32 kHz EnCodec-shaped codec; for benchmarks.
- `load_pretrained(path_or_id)`: a directory written by `save_pretrained` (with its tokenizer / processor files), or
  a Hub id found in the local Hugging Face cache (`HF_HUB_OFFLINE=1` is set for the call: nothing is fetched).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import torch

INSTALL_HINT = "transformers is not installed; pip install 'ppt_fast[transformers]' (transformers >= 4.40)"
TOKENIZER_KEY = "ppt_fast_tokenizer"  # in the model config: the code-built tokenizer a saved tiny model needs

SHAPES = {
    "hf-musicgen-small-shapes": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24),
    "hf-musicgen-medium-shapes": dict(hidden_size=1536, num_attention_heads=24, num_hidden_layers=48),
    "hf-musicgen-large-shapes": dict(hidden_size=2048, num_attention_heads=32, num_hidden_layers=48),
}


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return transformers


class WordHashTokenizer:
    """A tokenizer built in code (the tiny models have no vocabulary file): lower-cased words and punctuation,
    each hashed (sha1) into `[2, vocab_size)`; 0 is padding, 1 ends the sequence (as T5's `</s>`). Called like a
    transformers tokenizer: `tok(texts, padding=True, return_tensors="pt")` -> `{"input_ids", "attention_mask"}`."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab_size: int, max_words: int = 64) -> None:
        self.vocab_size = int(vocab_size)
        self.max_words = int(max_words)

    def spec(self) -> str:
        return f"word-hash/{self.vocab_size}/{self.max_words}"

    @classmethod
    def from_spec(cls, spec: str) -> WordHashTokenizer:
        m = re.fullmatch(r"word-hash/(\d+)/(\d+)", spec)
        if m is None:
            raise ValueError(f"unknown code-built tokenizer {spec!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def _index(self, word: str) -> int:
        digest = hashlib.sha1(word.encode()).digest()
        return 2 + int.from_bytes(digest[:4], "little") % (self.vocab_size - 2)

    def __call__(self, texts, padding: bool = True, return_tensors: str = "pt", **_: Any) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        rows = [[self._index(w) for w in re.findall(r"\w+|[^\w\s]", t.lower())][: self.max_words - 1] + [1]
                for t in texts]  # fmt: skip
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _config(text: dict, audio: dict, decoder: dict, melody: dict | None = None) -> Any:
    """A MusicgenConfig of the three sub-configs, or with `melody` (`num_chroma`, `chroma_length`) a
    MusicgenMelodyConfig (its decoder has no cross-attention: the condition is prepended to the audio sequence)."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config
    from transformers.utils import logging as hf_logging

    if melody is not None:
        from transformers import MusicgenMelodyConfig as MusicgenConfig
        from transformers import MusicgenMelodyDecoderConfig as MusicgenDecoderConfig

    t5 = T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **text)
    enc = EncodecConfig(**audio)
    codes = enc.codebook_size
    # MusicGen's pad / BOS token is the code one past the codebook (the decoder's embeddings have codebook + 1 rows),
    # which the config validator warns about for every MusicGen checkpoint; quiet for this build.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        dec = MusicgenDecoderConfig(vocab_size=codes, pad_token_id=codes, bos_token_id=codes,
                                    decoder_start_token_id=codes, **decoder)  # fmt: skip
        return MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict(),
                              **(melody or {}))  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)


def _random_codebooks(model: Any) -> None:
    """EnCodec's codebooks start at zero (checkpoints fill them), which encodes every frame to code 0. For a random-init
    codec, fill each level with residual latent frames of random audio (what a k-means initialisation starts from),
    so audio encodes to varied codes and codes decode to varied audio."""
    codec = model.audio_encoder
    sr = int(model.config.audio_encoder.sampling_rate)
    channels = int(model.config.audio_encoder.audio_channels)
    with torch.no_grad():
        audio = torch.randn(4, channels, sr) * torch.linspace(0.02, 0.5, 4).view(4, 1, 1)
        frames = codec.encoder(audio).transpose(1, 2).reshape(-1, model.config.audio_encoder.codebook_dim)
        residual = frames
        for layer in codec.quantizer.layers:
            book = layer.codebook
            pick = torch.randint(0, residual.shape[0], (book.embed.shape[0],))
            book.embed.copy_(residual[pick] + 1e-3 * torch.randn_like(book.embed))
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            residual = residual - book.decode(book.encode(residual))


def _generation_defaults(model: Any) -> None:
    gc = model.generation_config
    gc.pad_token_id = gc.decoder_start_token_id = gc.bos_token_id = model.config.decoder.pad_token_id
    gc.do_sample, gc.guidance_scale, gc.top_k, gc.max_length = True, 3.0, 250, 1500


def _random_model(cfg: Any, tok: WordHashTokenizer, name: str, seed: int, device) -> tuple[Any, WordHashTokenizer]:
    """A MusicGen of `cfg`, random-init from `seed` (random codebooks too), named `name`, with its code-built
    tokenizer named in the config so that a save_pretrained folder reloads with it."""
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    setattr(cfg, TOKENIZER_KEY, tok.spec())
    melody = cfg.model_type == "musicgen_melody"
    cls = MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(cfg)
        _random_codebooks(model)
    _generation_defaults(model)
    model.name = name
    return model.to(device).eval(), tok


def build_tiny_random(seed: int = 0, device: str | torch.device = "cpu", melody: bool = False,
                      ) -> tuple[Any, WordHashTokenizer]:  # fmt: skip
    """A small random-init MusicGen (16 kHz mono, 50 Hz frames, 4 codebooks of 64 codes, decoder dim 48, 2 layers,
    text encoder dim 32: `enc_to_dec_proj` is in use, as on the real checkpoints) and its tokenizer. `melody`: a
    `MusicgenMelodyForConditionalGeneration` of the same sizes (12 chroma bins, a 16-frame chroma prefix)."""
    require_transformers()
    tok = WordHashTokenizer(vocab_size=128)
    cfg = _config(
        dict(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
        dict(sampling_rate=16000, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2], codebook_size=64,
             hidden_size=16, codebook_dim=16, target_bandwidths=[1.2], num_residual_layers=1, num_lstm_layers=1),
        # initializer_factor 0.2 (MusicGen's 0.02 x 10): a random decoder whose samples follow its text condition,
        # so tests can see prompts and concepts change what is generated
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, num_codebooks=4,
             max_position_embeddings=2048, initializer_factor=0.2),
        melody=dict(num_chroma=12, chroma_length=16) if melody else None,
    )  # fmt: skip
    return _random_model(cfg, tok, "hf-tiny-random-melody" if melody else "hf-tiny-random", seed, device)


def build_shapes(name: str, seed: int = 0, device: str | torch.device = "cpu") -> tuple[Any, WordHashTokenizer]:
    """A random-init decoder with the real shapes of `name` (see SHAPES), a t5-base-shaped text encoder (768-d,
    12 layers) and a 32 kHz EnCodec-shaped codec with 4 codebooks of 2048 codes."""
    require_transformers()
    tok = WordHashTokenizer(vocab_size=32128)
    cfg = _config(
        dict(vocab_size=tok.vocab_size, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
        dict(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048,
             hidden_size=128, codebook_dim=128, target_bandwidths=[2.2], num_residual_layers=1, num_lstm_layers=2),
        dict(ffn_dim=4 * SHAPES[name]["hidden_size"], num_codebooks=4, max_position_embeddings=2048,
             **SHAPES[name]),
    )  # fmt: skip
    return _random_model(cfg, tok, name, seed, device)


def tokenizer_for(model: Any, source: str | None = None) -> Any:
    """The tokenizer of `model`: the code-built one its config names, else the one saved with it in `source` (a
    directory or a cached Hub id). ValueError naming what is missing otherwise."""
    spec = getattr(model.config, TOKENIZER_KEY, None)
    if spec:
        return WordHashTokenizer.from_spec(spec)
    if source is None:
        source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source:
        raise ValueError(
            "this MusicGen has no tokenizer ppt_fast can find: pass the model's directory or Hub id instead of the "
            "object, or save its processor next to it (processor.save_pretrained(folder))"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no tokenizer for {source!r} on this machine ({type(e).__name__}): save the processor with the model "
            "(processor.save_pretrained(folder)) or have the Hub id's files in the local Hugging Face cache"
        ) from None


def is_pretrained_dir(path: str) -> bool:
    """A directory `save_pretrained` wrote for a MusicGen (its config.json names model_type musicgen[_melody])."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    import json

    try:
        with open(cfg) as f:
            return str(json.load(f).get("model_type", "")).startswith("musicgen")
    except (OSError, ValueError):
        return False


def load_pretrained(source: str, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """A MusicGen (and its tokenizer) from a `save_pretrained` directory or a Hub id in the local cache; nothing is
    downloaded. ValueError saying what is missing otherwise."""
    transformers = require_transformers()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        cls = (transformers.MusicgenMelodyForConditionalGeneration if config.model_type == "musicgen_melody"
               else transformers.MusicgenForConditionalGeneration)  # fmt: skip
        model = cls.from_pretrained(source, local_files_only=True)
    except OSError as e:
        raise ValueError(
            f"model {source!r}: not a save_pretrained directory and not in the local Hugging Face cache ({e}); "
            "download it once where the Hub is reachable (huggingface-cli download facebook/musicgen-small) or pass "
            "a directory"
        ) from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    model.name = os.path.basename(os.path.normpath(source))
    return model.to(device).eval(), tokenizer_for(model, source)


def is_musicgen(model: Any) -> bool:
    """Whether `model` is a transformers MusicGen (plain or melody), checked without importing transformers."""
    return any(c.__name__ in ("MusicgenForConditionalGeneration", "MusicgenMelodyForConditionalGeneration")
               and c.__module__.startswith("transformers.") for c in type(model).__mro__)  # fmt: skip
