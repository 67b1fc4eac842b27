"""The tuning recipes: what `tune(preset=...)` trains, as one typed table that the tune loop, the CLI and the
evaluation read (instead of testing a bare string in several places).

A recipe names a `Scope` preset (`ppt_fast.scope`: where pivots may be, and which rows are trained in full) or
none, whether every weight is trained densely, and whether any weight is trained at all; every recipe trains the
identifier tokens. `MODEL_DEFAULTS` holds the numbers `tune()` takes per kind of model when an argument is left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One way of tuning a concept into a model."""

    name: str
    summary: str  # one line, for help texts
    scope: str | None = None  # the Scope preset the pivots (and dense rows) come from; None: no pivots
    dense_all: bool = False  # every weight of the LM trained densely (torch AdamW)
    trains_weights: bool = True  # False: only the identifier tokens change

    @property
    def selects_pivots(self) -> bool:
        """Whether the recipe runs the sensitivity pass and a top-k (ratio / count mean something)."""
        return self.scope is not None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("ppt", "pivots over self-attention V and cross-attention K/V rows, plus tokens", scope="ppt"),
        Recipe("dreamstyler", "pivots over self-attention V; cross-attention K/V rows in full; tokens",
               scope="dreamstyler"),  # fmt: skip
        Recipe("full", "every LM weight trained densely, plus tokens (the overfitting baseline)", dense_all=True),
        Recipe("tokens", "the identifier embeddings only (textual inversion)", trains_weights=False),
    )
}
DEFAULT = "ppt"


def get(name: str) -> Recipe:
    """The recipe called `name`; ValueError naming the choices otherwise."""
    recipe = RECIPES.get(name) if isinstance(name, str) else None
    if recipe is None:
        raise ValueError(f"preset={name!r} is not one of {', '.join(RECIPES)}")
    return recipe


@dataclass(frozen=True)
class ModelDefaults:
    """What `tune()` uses for an argument left at None, per kind of model (`ppt_fast.models.model_kind`)."""

    steps: int
    ratio: float  # pivots as a fraction of the entries in scope
    lr: float  # pivots (and dense tensors)
    token_lr: float  # identifier tokens
    batch_size: int
    segment_seconds: float
    prior: float = 0.0  # prior preservation off unless asked (docs/tuning.md: it keeps "<v1>" clips near the base)


#: Per kind of model: "trained" (the default `tiny`, and models `ppt-fast pretrain` makes), "tiny-random" (the
#: random-init test model) and "other" (real MusicGens: the paper's scale). How each number was chosen: docs/tuning.md.
MODEL_DEFAULTS: dict[str, ModelDefaults] = {
    "trained": ModelDefaults(steps=150, ratio=0.001, lr=1e-4, token_lr=5e-3, batch_size=4, segment_seconds=2.0),
    "tiny-random": ModelDefaults(steps=150, ratio=0.01, lr=3e-3, token_lr=2e-2, batch_size=4, segment_seconds=2.0),
    "other": ModelDefaults(steps=500, ratio=0.01, lr=1e-4, token_lr=5e-3, batch_size=4, segment_seconds=10.0),
}


__all__ = ["DEFAULT", "MODEL_DEFAULTS", "RECIPES", "ModelDefaults", "Recipe", "get"]
