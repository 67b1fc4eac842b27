"""Which model a `model=` argument names, and the host that runs it.

`load_model` / `load_host` understand:
- `"tiny"`: the embedded default, trained here (`ppt-fast pretrain`, `ppt_fast.tiny`): a mel-RVQ codec (16 kHz, 50 Hz
  frames, 8 x 1024 codes) and an 8.6 M-parameter LM (dim 256, 4 layers) trained on 16 rendered instruments; weights
  in `ppt_fast/assets/tiny-v8.pt` (+ `.json` provenance).
- a `.pt` weights file written by `ppt-fast pretrain --out FILE`.
- `"tiny-random"`: a small random-init MusicGen built in code (`ppt_fast.hosts.audiocraft.build.build_tiny`), for
  tests; `"musicgen-{small,medium,large}-shapes"`: random-init LMs with the real shapes, for benchmarks.
- a directory holding an audiocraft checkpoint (`state_dict.bin`, `compression_state_dict.bin`), or a hub id such as
  `facebook/musicgen-small` found in the local Hugging Face cache (`HF_HUB_OFFLINE=1` makes sure nothing is
  fetched); T5 (`t5-base`) must be cached too.
- an audiocraft `MusicGen` object, used as it is.
- transformers (the `transformers` host): a `MusicgenForConditionalGeneration` or
  `MusicgenMelodyForConditionalGeneration` object; a directory written by its `save_pretrained` (with the tokenizer /
  processor files); `"hf:<hub id or directory>"`, or a bare hub id when audiocraft is not installed, from the local
  Hugging Face cache (nothing is fetched); `"hf-tiny-random"`, `"hf-tiny-random-melody"` and
  `"hf-musicgen-{small,medium,large}-shapes"` (random-init, built in code, for tests and benchmarks).

Every loaded model has an identifier bank attached (`model.lm._ppt_fast_identifier_bank`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .hosts.base import Host


def _is_weights_file(model: str) -> bool:
    """A `.pt` file from `ppt-fast pretrain` (what `load_model` loads with `tiny.model.load_trained`)."""
    return model.endswith(".pt") and os.path.isfile(model)


RANDOM_TINY = ("tiny-random", "hf-tiny-random", "hf-tiny-random-melody")  # the random-init test models of the hosts
HF_PREFIX = "hf:"


def model_kind(model: Any) -> str:
    """What kind of model `model` (a `load_model` argument or a MusicGen) is, for the settings that depend on it
    (`tune()`'s defaults, the evaluation's caveats): "trained" for a model made by `ppt-fast pretrain` (the name
    `tiny`, a weights file it wrote, or a MusicGen loaded from either), "tiny-random" for the random-init unit-test
    model, and "other" (real MusicGens and their shapes). Decided by what the model is, not what it is called: a
    weights file loaded by path, or the `tiny` object passed in, is "trained" too."""
    if isinstance(model, str):
        if model == "tiny" or _is_weights_file(model):
            return "trained"
        return "tiny-random" if model in RANDOM_TINY else "other"
    if getattr(model, "_ppt_fast_trained_default", False):  # set by tiny.model.build_musicgen
        return "trained"
    return "tiny-random" if getattr(model, "name", None) in RANDOM_TINY else "other"


def load_model(model: Any = "tiny", *, device: str | torch.device | None = None, seed: int = 0):
    """Return an audiocraft `MusicGen` with an identifier bank attached.

    Args:
        model: a built-in name (`"tiny"`, `"tiny-random"`, `"musicgen-{small,medium,large}-shapes"`), a `.pt` file
            from `ppt-fast pretrain`, a local audiocraft checkpoint directory, a hub id found in the local HF cache,
            or a `MusicGen` object.
        device: where to put it (default: CUDA when available, else CPU).
        seed: seed of the random-init builders.
    """
    return load_host(model, device=device, seed=seed).model


def load_host(model: Any = "tiny", *, device: str | torch.device | None = None, seed: int = 0) -> Host:
    """The Host (`ppt_fast.hosts.base`) for `model` (what `load_model` takes): a MusicGen object passed in is
    wrapped as it is (tuned in place); a name or path is loaded first."""
    kind = model_kind(model)
    if not isinstance(model, str):
        if hasattr(model, "lm") and hasattr(model, "compression_model"):
            from .hosts.audiocraft import AudiocraftHost

            return AudiocraftHost(model, kind)
        from .hosts.transformers.build import is_musicgen

        if is_musicgen(model):
            from .hosts.transformers import TransformersHost
            from .hosts.transformers.build import tokenizer_for

            return TransformersHost(model, tokenizer_for(model), kind)
        raise TypeError(
            "model must be a name, a path, an audiocraft MusicGen or a transformers MusicgenForConditionalGeneration, "
            f"got {type(model).__name__}"
        )
    if _is_transformers_name(model):
        return _load_transformers(model, device, seed, kind)
    from .hosts.audiocraft import AudiocraftHost

    return AudiocraftHost(_load_named(model, device, seed), kind)


def _is_transformers_name(model: str) -> bool:
    from .hosts.transformers.build import SHAPES, is_pretrained_dir

    if model.startswith(HF_PREFIX) or model in ("hf-tiny-random", "hf-tiny-random-melody") or model in SHAPES:
        return True
    if os.path.isdir(model):
        return is_pretrained_dir(model)
    if "/" in model and not os.path.exists(model):  # a hub id: audiocraft's when it is installed
        import importlib.util

        return importlib.util.find_spec("audiocraft") is None
    return False


def _load_transformers(model: str, device, seed: int, kind: str) -> Host:
    from .hosts.transformers import TransformersHost
    from .hosts.transformers.build import SHAPES, build_shapes, build_tiny_random, load_pretrained

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model in ("hf-tiny-random", "hf-tiny-random-melody"):
        mg, tok = build_tiny_random(seed=seed, device=device, melody=model.endswith("-melody"))
    elif model in SHAPES:
        mg, tok = build_shapes(model, seed=seed, device=device)
    else:
        mg, tok = load_pretrained(model.removeprefix(HF_PREFIX), device=device)
    return TransformersHost(mg, tok, kind)


def _load_named(model: str, device: str | torch.device | None, seed: int) -> Any:
    from .hosts.audiocraft.build import SHAPES, _load_checkpoint, build_shapes, build_tiny

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "tiny":
        from .tiny.model import ASSET, PretrainConfig, load_trained

        return load_trained(ASSET, expected=PretrainConfig(), device=device, name="tiny")
    if model == "tiny-random":
        m = build_tiny(seed=seed, device=device)
        m.name = model
        return m
    if _is_weights_file(model):
        from .tiny.model import load_trained

        return load_trained(model, device=device, name=os.path.basename(model))
    if model in SHAPES:
        return build_shapes(model, seed=seed, device=device)
    return _load_checkpoint(model, device)


__all__ = ["load_host", "load_model", "model_kind"]
