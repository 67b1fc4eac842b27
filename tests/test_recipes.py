"""The recipe table: every recipe the tune loop, the CLI and the scope presets agree on."""

import pytest

from ppt_fast import recipes
from ppt_fast.cli import build_parser
from ppt_fast.scope import Scope


def test_table_is_what_tune_and_the_cli_offer():
    import inspect

    from ppt_fast.tuning import TuneConfig, tune

    assert tuple(recipes.RECIPES) == ("ppt", "dreamstyler", "full", "tokens")
    assert TuneConfig().preset == inspect.signature(tune).parameters["preset"].default == recipes.DEFAULT
    assert recipes.DEFAULT in recipes.RECIPES
    args = build_parser().parse_args(["tune", "ref.wav", "--out", "c.ppt"])
    assert args.preset == recipes.DEFAULT
    for name in recipes.RECIPES:
        assert build_parser().parse_args(["tune", "r.wav", "--out", "c.ppt", "--preset", name]).preset == name


def test_each_recipe_is_consistent():
    for r in recipes.RECIPES.values():
        if r.selects_pivots:
            assert Scope.preset(r.scope).name == r.scope  # resolves to a real scope preset
            assert not r.dense_all and r.trains_weights
        assert not (r.dense_all and not r.trains_weights)
    assert recipes.get("full").dense_all and not recipes.get("tokens").trains_weights


@pytest.mark.parametrize("bad", ["PPT", "lora", "", None, 3])
def test_unknown_recipe_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"not one of ppt, dreamstyler, full, tokens"):
        recipes.get(bad)
