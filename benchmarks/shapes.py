"""MusicGen LM parameter shapes (small / medium / large), without building a model or importing audiocraft.

The names and shapes are those of audiocraft 1.3.0's `LMModel` as MusicGen configures it (`musicgen_lm.yaml`:
`bias_proj=False, bias_ff=False, bias_attn=False, norm=layer_norm, norm_first=True, hidden_scale=4,
cross_attention=True`, 4 codebooks of card 2048) plus the text conditioner's `output_proj` (T5's 768-d output
projected to d), which lives inside the LM and is trained with it. T5 itself is frozen and not listed.

Per transformer layer (12 tensors):
    transformer.layers.{i}.self_attn.in_proj_weight         [3d, d]   (Q, K, V rows: [0:d], [d:2d], [2d:3d])
    transformer.layers.{i}.self_attn.out_proj.weight        [d, d]
    transformer.layers.{i}.cross_attention.in_proj_weight   [3d, d]
    transformer.layers.{i}.cross_attention.out_proj.weight  [d, d]
    transformer.layers.{i}.linear1.weight                   [4d, d]
    transformer.layers.{i}.linear2.weight                   [d, 4d]
    transformer.layers.{i}.norm1.{weight,bias}, norm_cross.{weight,bias}, norm2.{weight,bias}   [d]
Model level: emb.{0..3}.weight [card + 1, d] (the extra row is the special token), linears.{0..3}.weight [card, d],
out_norm.{weight,bias} [d], condition_provider.conditioners.description.output_proj.{weight [d, 768], bias [d]}.

musicgen-small: 24 * 12 + 4 + 4 + 2 + 2 = 300 tensors, 420.4 M entries (DESIGN.md §5 measured the same count).
`tests/test_benchmarks_smoke.py` checks these names/shapes against a real one-layer audiocraft `LMModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

N_Q = 4
CARD = 2048
T5_DIM = 768


@dataclass(frozen=True)
class ModelShape:
    name: str
    dim: int
    num_layers: int
    num_heads: int


MODELS: dict[str, ModelShape] = {
    "small": ModelShape("musicgen-small", 1024, 24, 16),
    "medium": ModelShape("musicgen-medium", 1536, 48, 24),
    "large": ModelShape("musicgen-large", 2048, 48, 32),
    # A tiny stand-in with the same layout, for the smoke test (runs in milliseconds).
    "tiny": ModelShape("tiny-layout", 64, 2, 4),
}

LAYER_TENSORS = (
    "self_attn.in_proj_weight",
    "self_attn.out_proj.weight",
    "cross_attention.in_proj_weight",
    "cross_attention.out_proj.weight",
    "linear1.weight",
    "linear2.weight",
    "norm1.weight",
    "norm1.bias",
    "norm_cross.weight",
    "norm_cross.bias",
    "norm2.weight",
    "norm2.bias",
)


def layer_shapes(d: int, i: int) -> list[tuple[str, tuple[int, ...]]]:
    """The 12 parameters of transformer layer i at model dimension d."""
    p = f"transformer.layers.{i}."
    return [
        (p + "self_attn.in_proj_weight", (3 * d, d)),
        (p + "self_attn.out_proj.weight", (d, d)),
        (p + "cross_attention.in_proj_weight", (3 * d, d)),
        (p + "cross_attention.out_proj.weight", (d, d)),
        (p + "linear1.weight", (4 * d, d)),
        (p + "linear2.weight", (d, 4 * d)),
        (p + "norm1.weight", (d,)),
        (p + "norm1.bias", (d,)),
        (p + "norm_cross.weight", (d,)),
        (p + "norm_cross.bias", (d,)),
        (p + "norm2.weight", (d,)),
        (p + "norm2.bias", (d,)),
    ]


def head_shapes(d: int, n_q: int = N_Q, card: int = CARD) -> list[tuple[str, tuple[int, ...]]]:
    """Embeddings, output heads, the final norm and the text conditioner's output projection."""
    out = [(f"emb.{k}.weight", (card + 1, d)) for k in range(n_q)]
    out += [(f"linears.{k}.weight", (card, d)) for k in range(n_q)]
    out += [("out_norm.weight", (d,)), ("out_norm.bias", (d,))]
    out += [
        ("condition_provider.conditioners.description.output_proj.weight", (d, T5_DIM)),
        ("condition_provider.conditioners.description.output_proj.bias", (d,)),
    ]
    return out


def model_shapes(size: str, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trainable LM tensor of `size`; `layers` keeps only the first that many transformer
    layers (a slice for machines where the whole model does not fit the time or memory budget). The heads are
    always included."""
    m = MODELS[size]
    n = m.num_layers if layers is None else min(layers, m.num_layers)
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(n):
        out += layer_shapes(m.dim, i)
    return out + head_shapes(m.dim, card=CARD if size != "tiny" else 64)


def numel(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for _, s in shapes:
        n = 1
        for x in s:
            n *= x
        total += n
    return total


def describe(size: str, layers: int | None) -> str:
    """'musicgen-small, 24/24 layers, 300 tensors, 420.4 M entries'."""
    m = MODELS[size]
    shapes = model_shapes(size, layers)
    n = m.num_layers if layers is None else min(layers, m.num_layers)
    return f"{m.name}, {n}/{m.num_layers} layers, {len(shapes)} tensors, {numel(shapes) / 1e6:.1f} M entries"
