"""The tuning recipes: what `tune(preset=...)` trains, as one typed table that the tune loop, the CLI and the
evaluation read (instead of testing a bare string in several places).

A recipe names a `Scope` preset (`ppt_fast.scope`: where pivots may be, and which rows are trained in full) or
none, whether every weight is trained densely, and whether any weight is trained at all; every recipe trains the
identifier tokens.
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


__all__ = ["DEFAULT", "RECIPES", "Recipe", "get"]
