"""The held-in cost: how much a concept worsens what the model already knew, on prompts without its identifier.

`held_in_set` renders new compositions of the default model's training instruments (seeds no corpus clip used)
with their instrument words; `base_samples_set` takes the base model's own samples for the prompts, for any other
model; `teacher_forced_loss` is MusicGen's training loss of codes under prompts (no sampling), so the cost of a
concept is its loss rise on the same codes and prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HELD_IN_INDEX = 400_000  # clip indices from here on are used by no corpus clip


def held_in_set(model, names: Sequence[str], *, clips: int = 2, seconds: float = 4.0, seed: int = 0):
    """Codes of new compositions of `names` (seeds no corpus clip uses), their instrument words, and a wrong word for
    each (the instrument 5 places on): what the held-in loss and the prompt information are measured on."""
    from ..tiny import pretrain as P

    audio, right, wrong = [], [], []
    for k, n in enumerate(names):
        for i in range(clips):
            audio.append(P.render_clip(n, P.clip_seed(n, seed, HELD_IN_INDEX + i), seconds, model.sample_rate))
            right.append(P.INSTRUMENT_WORDS[n][0])
            wrong.append(P.INSTRUMENT_WORDS[names[(k + 5) % len(names)]][0])
    with torch.no_grad():
        codes = model.compression_model.encode(torch.stack(audio).unsqueeze(1))[0].long()
    return codes, right, wrong


def teacher_forced_loss(model, codes: torch.Tensor, prompts: Sequence[str], batch: int = 8) -> float:
    """MusicGen's training loss (nats per code) of `codes` under `prompts`, no sampling: mean over the clips."""
    from ..models import load_host

    host = load_host(model)
    total = 0.0
    with torch.no_grad():
        for i in range(0, codes.shape[0], batch):
            chunk = list(prompts[i : i + batch])
            total += float(host.loss(codes[i : i + batch], chunk)) * len(chunk)
    return total / codes.shape[0]


def base_samples_set(model, prompts: Sequence[str], *, clips: int = 2, seconds: float = 4.0, seed: int = 0):
    """Codes the base `model` samples for each of `prompts` (`clips` each, a fixed seed) and their prompts: the
    held-in set of a model whose training data is not at hand."""
    from ..models import load_host

    host = load_host(model)
    texts = [p for p in prompts for _ in range(clips)]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        codes = host.sample_codes(texts, seconds)
    return codes.cpu(), texts


__all__ = ["HELD_IN_INDEX", "base_samples_set", "held_in_set", "teacher_forced_loss"]
