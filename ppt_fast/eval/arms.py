"""The arms of every comparison: ours (the recipes), and what a user would pick instead (PEFT's LoRA and SHiRA).

One table, read by the evaluation protocol (`ppt-fast eval --protocol --methods ...`) and by the benchmarks
(`benchmarks/tune_probe.py`), so that a row called `lora` is the same recipe in the quality table and in the
speed / memory / file-size table.

Every arm trains the identifier tokens the same way (`tune()`'s token embeddings, token_lr, clipping), so the
comparison is about what happens to the weights:

==================  =====================================================================================
arm                 weights
==================  =====================================================================================
``base``            none, and no tokens (the floor)
``tokens``          none (textual inversion)
``ppt-<ρ>``         pivots: global top-k at density ρ over self-attn V and cross-attn K/V (SparseAdamW)
``dreamstyler``     sparse self-attn V, cross-attn K/V rows in full
``full``            every LM weight, dense AdamW (the overfitting baseline)
``dense-masked``    ppt's update computed densely (full gradients, masked dense AdamW): the same numbers as
                    ``ppt``, so it is a benchmark arm only
``lora``            PEFT LoRA, the musicgen-dreamboothing recipe: r 16, alpha 16, dropout 0.05, lr 2e-4 on
                    every attention projection (q, k, v, out) and both feed-forward layers of every decoder layer
``lora-matched``    PEFT LoRA on the tensors ppt's scope reads only, rank chosen so the trainable count is
                    nearest ppt's pivot count at the arm's ``match`` density
``shira``           SHiRA (a fixed sparse mask per linear layer) whose mask is ppt's own sensitivity scores:
                    each layer keeps its top entries, a per-layer budget (SHiRA's structure) with the same
                    total count as ppt at ``match``
==================  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One row of the comparison.

    `preset`: our recipe (`ppt_fast.recipes`), None for the base model and for the peers; `ratio`: ppt's density;
    `peer`: `lora` | `lora-matched` | `shira` (`ppt_fast.eval.peers` trains it); `match`: the ppt density whose
    pivot count a matched peer takes; `rank`, `alpha`, `dropout`, `lr`: the peer's recipe (None: `tune()`'s lr for
    the model); `pair`: two concepts tuned together; `protocol`: whether `ppt-fast eval --protocol` runs it."""

    name: str
    summary: str
    preset: str | None = None
    ratio: float | None = None
    n_tokens: int = 3
    pair: bool = False
    peer: str | None = None
    match: float | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    lr: float | None = None
    protocol: bool = True

    @property
    def tuned(self) -> bool:
        """Whether the arm tunes anything (the base model does not)."""
        return self.preset is not None or self.peer is not None


#: musicgen-dreamboothing's LoRA (its `dreambooth_musicgen.py`, `--use_lora`): r = alpha = 16, dropout 0.05,
#: learning rate 2e-4 (its example configs). It also adapts the heads and the codebook embeddings; the arm keeps to
#: the decoder layers' projections and feed-forward layers, where the concept's weights are.
LORA_RECIPE: dict = {"rank": 16, "alpha": 16.0, "dropout": 0.05, "lr": 2e-4}
MATCH = 0.01  # the matched peers take ppt-1%'s pivot count

ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("base", "no tuning: the floor (the identifier means nothing to the base model)"),
        Arm("tokens", "identifier embeddings only", preset="tokens"),
        Arm("ppt-0.1%", "pivots at density 0.1 % + tokens", preset="ppt", ratio=0.001),
        Arm("ppt-1%", "pivots at density 1 % + tokens", preset="ppt", ratio=0.01),
        Arm("ppt-5%", "pivots at density 5 % + tokens", preset="ppt", ratio=0.05),
        Arm("dreamstyler", "sparse self-attn V, cross-attn K/V rows in full, tokens", preset="dreamstyler", ratio=0.01),
        Arm("full", "every LM weight dense + tokens", preset="full"),
        Arm(
            "dense-masked",
            "ppt-1%'s update computed densely (benchmark arm: the same numbers as ppt-1%)",
            preset="ppt",
            ratio=0.01,
            protocol=False,
        ),
        Arm(
            "lora",
            "PEFT LoRA, the musicgen-dreamboothing recipe (r 16 on q/k/v/out, fc1, fc2) + tokens",
            peer="lora",
            **LORA_RECIPE,
        ),
        Arm(
            "lora-matched",
            "PEFT LoRA on ppt's tensors, rank matched to ppt-1%'s count + tokens",
            peer="lora-matched",
            match=MATCH,
            alpha=None,
            dropout=LORA_RECIPE["dropout"],
            lr=LORA_RECIPE["lr"],
        ),
        Arm(
            "shira",
            "SHiRA with ppt-1%'s scores as its mask (per-layer budget, same count) + tokens",
            peer="shira",
            match=MATCH,
        ),
        Arm(
            "pair-1tok", "two concepts together, ppt 1 %, 1 token each", preset="ppt", ratio=0.01, n_tokens=1, pair=True
        ),
        Arm(
            "pair-3tok",
            "two concepts together, ppt 1 %, 3 tokens each",
            preset="ppt",
            ratio=0.01,
            n_tokens=3,
            pair=True,
        ),
    )
}
PEERS = tuple(a.name for a in ARMS.values() if a.peer)


def get(name: str) -> Arm:
    """The arm called `name`; ValueError naming the choices otherwise."""
    arm = ARMS.get(name) if isinstance(name, str) else None
    if arm is None:
        raise ValueError(f"arm {name!r} is not one of {', '.join(ARMS)}")
    return arm


__all__ = ["ARMS", "LORA_RECIPE", "MATCH", "PEERS", "Arm", "get"]
