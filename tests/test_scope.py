"""Scope rules, presets on audiocraft LMModel names, and the dense rows of a recipe."""

from __future__ import annotations

import pytest
import torch

import ppt_fast
from ppt_fast.pivots import PivotSet
from ppt_fast.scope import Scope, ScopeError


def named(**shapes) -> list[tuple[str, torch.Tensor]]:
    return [(n.replace("__", "."), torch.nn.Parameter(torch.randn(*s))) for n, s in shapes.items()]


D = 8
LM_LIKE = named(
    emb__0__weight=(17, D),
    transformer__layers__0__self_attn__in_proj_weight=(3 * D, D),
    transformer__layers__0__self_attn__out_proj__weight=(D, D),
    transformer__layers__0__cross_attention__in_proj_weight=(3 * D, D),
    transformer__layers__0__linear1__weight=(4 * D, D),
    transformer__layers__0__norm1__weight=(D,),
    linears__0__weight=(16, D),
)


def rows_of(scope, model) -> dict[str, tuple[int, int]]:
    return {e.name: e.rows for e in Scope.of(scope).resolve(model)}


def test_row_bounds_with_d():
    got = rows_of(["*.self_attn.in_proj_weight[2d:3d]", "*cross_attention.in_proj_weight[d:]"], LM_LIKE)
    assert got == {
        "transformer.layers.0.self_attn.in_proj_weight": (2 * D, 3 * D),
        "transformer.layers.0.cross_attention.in_proj_weight": (D, 3 * D),
    }
    assert rows_of(["*linear1.weight[:d]"], LM_LIKE) == {"transformer.layers.0.linear1.weight": (0, D)}
    assert rows_of(["*linear1.weight[3:7]"], LM_LIKE) == {"transformer.layers.0.linear1.weight": (3, 7)}
    assert rows_of(["*norm1.weight"], LM_LIKE) == {"transformer.layers.0.norm1.weight": (0, D)}
    # d of a 1-D tensor is its length: '[d:]' of a [D] norm is empty, so it drops out
    assert rows_of(["*norm1.weight[d:]"], LM_LIKE) == {}


def test_entry_flat_range_and_view():
    (e,) = Scope.of("*.self_attn.in_proj_weight[2d:3d]").resolve(LM_LIKE)
    assert e.flat_range == (2 * D * D, 3 * D * D) and e.numel == D * D
    assert e.slice_shape == torch.Size([D, D])
    assert torch.equal(e.view(e.param), e.param[2 * D :])
    assert torch.equal(e.param.reshape(-1)[e.flat_range[0] : e.flat_range[1]], e.view(e.param).reshape(-1))


def test_callable_rules_and_first_match_wins():
    def rule(name, p):
        if name.endswith("in_proj_weight"):
            return slice(0, p.shape[1])
        if name.startswith("linears"):
            return (2, 5)
        if name.endswith("out_proj.weight"):
            return True
        return None

    got = rows_of(rule, LM_LIKE)
    assert got == {
        "transformer.layers.0.self_attn.in_proj_weight": (0, D),
        "transformer.layers.0.cross_attention.in_proj_weight": (0, D),
        "transformer.layers.0.self_attn.out_proj.weight": (0, D),
        "linears.0.weight": (2, 5),
    }
    got = rows_of(["*in_proj_weight[0:1]", "*.self_attn.in_proj_weight[2d:3d]"], LM_LIKE)
    assert got["transformer.layers.0.self_attn.in_proj_weight"] == (0, 1)


def test_scope_errors_name_the_fix():
    with pytest.raises(ScopeError, match="row bound"):
        Scope.of(["*.weight[x:3d]"])
    with pytest.raises(ScopeError, match="not '<name glob>'"):
        Scope.of(["*.weight[1:2:3]"])
    with pytest.raises(ScopeError, match="0 <= start <= end <= 24"):
        Scope.of("*self_attn.in_proj_weight[2d:4d]").resolve(LM_LIKE)
    with pytest.raises(ScopeError, match="unknown scope preset"):
        Scope.of("pptx")
    with pytest.raises(ScopeError, match="slice, \\(start, end\\), True or None"):
        Scope.of(lambda n, p: 3).resolve(LM_LIKE)


def test_all_linear_skips_embeddings_and_1d():
    got = rows_of("all-linear", LM_LIKE)
    assert set(got) == {
        "transformer.layers.0.self_attn.in_proj_weight",
        "transformer.layers.0.self_attn.out_proj.weight",
        "transformer.layers.0.cross_attention.in_proj_weight",
        "transformer.layers.0.linear1.weight",
        "linears.0.weight",
    }


def test_dense_pivots_union_with_selected():
    scope = Scope.preset("dreamstyler")
    assert scope.sparse == ("*.self_attn*.in_proj_weight[2d:3d]",)
    assert scope.dense == ("*.cross_attention*.in_proj_weight[d:3d]",) and Scope.preset("ppt").dense == ()
    sparse = scope.resolve(LM_LIKE)
    assert [e.name for e in sparse] == ["transformer.layers.0.self_attn.in_proj_weight"]
    layout = [(n, p.shape) for n, p in LM_LIKE]
    dense = scope.dense_pivots(LM_LIKE, layout=layout)
    masks = dense.to_masks()
    cross = masks["transformer.layers.0.cross_attention.in_proj_weight"]
    assert cross[D:].all() and not cross[:D].any() and dense.count == 2 * D * D
    selected = PivotSet.from_masks({n: torch.rand(p.shape) < 0.3 for n, p in LM_LIKE})
    both = selected | dense
    sel = selected.to_masks()
    assert both.count == sum(int((sel[n] | masks[n]).sum()) for n, _ in LM_LIKE)
    for n, _ in LM_LIKE:
        assert torch.equal(both.to_masks()[n], selected.to_masks()[n] | masks[n])


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("audiocraft")
    from audiocraft.models.lm import LMModel
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
    from audiocraft.modules.conditioners import ConditionFuser, ConditioningProvider, LUTConditioner

    cond = LUTConditioner(n_bins=32, dim=16, output_dim=32, tokenizer="noop")
    provider = ConditioningProvider({"description": cond})
    fuser = ConditionFuser({"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []})
    return LMModel(
        DelayedPatternProvider(n_q=2), provider, fuser, n_q=2, card=16, dim=32, num_heads=2, num_layers=2,
        hidden_scale=2, cross_attention=True, causal=True, norm_first=True, bias_proj=False, bias_ff=False,
        bias_attn=False, memory_efficient=True,  # musicgen_lm.yaml's attention (the custom StreamingMultiheadAttention)
    )  # fmt: skip


def test_presets_on_audiocraft_lm(tiny_lm):
    d, layers = 32, 2
    ppt = Scope.preset("ppt").resolve(tiny_lm)
    assert [(e.name, e.rows) for e in ppt] == [
        (f"transformer.layers.{i}.{kind}.in_proj_weight", rows)
        for i in range(layers)
        for kind, rows in (("self_attn", (2 * d, 3 * d)), ("cross_attention", (d, 3 * d)))
    ]
    assert Scope.preset("ppt").numel(tiny_lm) == layers * 3 * d * d
    ds = Scope.preset("dreamstyler")
    assert [e.name for e in ds.resolve(tiny_lm)] == [f"transformer.layers.{i}.self_attn.in_proj_weight" for i in (0, 1)]
    assert [(e.name, e.rows) for e in ds.resolve_dense(tiny_lm)] == [
        (f"transformer.layers.{i}.cross_attention.in_proj_weight", (d, 3 * d)) for i in (0, 1)
    ]
    lin = {e.name for e in Scope.preset("all-linear").resolve(tiny_lm)}
    assert "transformer.layers.0.linear1.weight" in lin and "linears.1.weight" in lin
    assert "condition_provider.conditioners.description.output_proj.weight" in lin
    assert not any(n.startswith("emb.") or "embed" in n or "norm" in n for n in lin)
    # every 2-D weight of an nn.Linear (and the packed in_proj) is in, nothing else
    linear_weights = {f"{m}.weight" for m, mod in tiny_lm.named_modules() if isinstance(mod, torch.nn.Linear)}
    packed = {n for n, _ in tiny_lm.named_parameters() if n.endswith("in_proj_weight")}
    assert lin == linear_weights | packed


def test_presets_match_nested_mha_names():
    nested = named(
        transformer__layers__0__self_attn__mha__in_proj_weight=(3 * D, D),
        transformer__layers__0__cross_attention__mha__in_proj_weight=(3 * D, D),
    )
    assert list(rows_of("ppt", nested).values()) == [(2 * D, 3 * D), (D, 3 * D)]


def test_public_name():
    assert ppt_fast.Scope is Scope
