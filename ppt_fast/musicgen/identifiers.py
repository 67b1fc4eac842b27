"""Identifier tokens (`<v1>`, `<v2>`, ...): learnable embeddings appended to the text condition.

Mechanism (conditioner-agnostic; works for T5 and for the LUT conditioner of small models):

1. Before the text conditioner tokenizes a prompt, every registered identifier is cut out of the text
   ("a piece of music, <v1>" -> "a piece of music"), and the identifiers found are remembered per sample, in
   the order they appear. An identifier is matched as a whole token (`token_pattern`): never inside a longer word
   ("v1" is not cut out of "v10" or "nav1"), while punctuation around it delimits it ("<v1>," and "(<v1>)" match).
2. After the conditioner ran (T5 -> `output_proj`, or LUT -> `output_proj`), each identifier's embeddings
   (`[n_tokens, output_dim]`, i.e. already in the conditioner's OUTPUT space) are appended to that sample's
   condition tensor, and its mask gets ones there.

Why appending equals placing the tokens at the identifier's position: MusicGen feeds the text condition to the
transformer only through cross-attention (`ConditionFuser` op `cross`), and cross-attention adds no positional
encoding to its source (`ConditionFuser(cross_attention_pos_emb=False)`, the MusicGen default; the keys/values are
`in_proj` of the condition with no rotary or sinusoidal term), so attention over the source is
permutation-invariant. When `cross_attention_pos_emb=True` the order would matter; we then still append (documented
limitation) and log a warning once.

Padding: samples of a batch with fewer identifier tokens get zero vectors with mask 0, which is exactly how
audiocraft pads text conditions (`LUTConditioner`/`T5Conditioner` multiply by the mask; cross-attention attends to
all source positions regardless of the mask).

The bank is attached to the LM as `lm._ppt_fast_identifier_bank` (the attribute `ppt_fast.concept.Concept.apply`
looks for). The hook is installed by swapping the condition provider's class for a subclass (revertible with
`uninstall`), so `LMModel.forward`, `LMModel.generate` and audiocraft's `MusicGenSolver` all go through it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

import torch

from ..concept.registry import BANK_ATTR

logger = logging.getLogger(__name__)

_KEY = "__ppt_fast_identifiers__"
_IDENT_RE = re.compile(r"^\S+$")


class IdentifierBank:
    """Learnable identifier embeddings of one LM: `identifier -> Tensor [n_tokens, dim]` (fp32 master copies).

    Args:
        dim: the text conditioner's output dimension (what cross-attention reads).
        attribute: the text attribute the identifiers live in (MusicGen: "description").
    """

    def __init__(self, dim: int, attribute: str = "description") -> None:
        self.dim = int(dim)
        self.attribute = attribute
        self._tokens: dict[str, torch.Tensor] = {}
        self._warned_pos = False

    # ---- the interface Concept.apply uses -----------------------------------------------------------------------
    def add(self, identifier: str, embeddings: torch.Tensor) -> None:
        """Register (or replace) `identifier` with `embeddings` `[n_tokens, dim]` (any float dtype; stored as given).

        The tensor is stored as is (not copied), so a trainer can pass an `nn.Parameter` and train it in place.
        """
        check_identifier(identifier)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(
                f"IdentifierBank.add({identifier!r}): embeddings must be a [n_tokens, {self.dim}] tensor "
                f"(the text conditioner's output dim), got {shape}"
            )
        if embeddings.shape[0] < 1:
            raise ValueError(f"IdentifierBank.add({identifier!r}): need at least one token embedding")
        self._tokens[identifier] = embeddings

    def remove(self, identifier: str) -> None:
        if identifier not in self._tokens:
            raise KeyError(f"identifier {identifier!r} is not registered; registered: {self.identifiers()}")
        del self._tokens[identifier]

    def has(self, identifier: str) -> bool:
        return identifier in self._tokens

    def identifiers(self) -> list[str]:
        return list(self._tokens)

    def get(self, identifier: str) -> torch.Tensor:
        return self._tokens[identifier]

    def clear(self) -> None:
        self._tokens.clear()

    # ---- prompt handling ----------------------------------------------------------------------------------------
    def split(self, text: str | None) -> tuple[str | None, list[str]]:
        """Cut registered identifiers out of `text`; return (clean text, identifiers in order of appearance)."""
        if text is None or not self._tokens:
            return text, []
        found: list[tuple[int, str]] = []
        # Longest first, each occurrence blanked once found, so "<v10>" is never read as "<v1>" + "0".
        for ident in sorted(self._tokens, key=len, reverse=True):
            rx = token_pattern(ident)
            while (m := rx.search(text)) is not None:
                found.append((m.start(), ident))
                text = text[: m.start()] + " " * len(ident) + text[m.end() :]
        found.sort()
        return clean_prompt(text), [i for _, i in found]

    def append(
        self, cond: torch.Tensor, mask: torch.Tensor, per_sample: list[list[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the identifiers' embeddings to a condition `[B, T, D]` and its mask `[B, T]`."""
        if not any(per_sample):
            return cond, mask
        B = cond.shape[0]
        if len(per_sample) != B:
            raise RuntimeError(f"identifier bookkeeping has {len(per_sample)} samples, the condition {B}")
        rows = []
        for idents in per_sample:
            parts = [self._tokens[i].to(device=cond.device, dtype=cond.dtype) for i in idents]
            rows.append(torch.cat(parts, 0) if parts else cond.new_zeros(0, cond.shape[-1]))
        n = max(r.shape[0] for r in rows)
        extra = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])], 0) for r in rows])
        extra_mask = torch.zeros(B, n, dtype=mask.dtype, device=mask.device)
        for b, r in enumerate(rows):
            extra_mask[b, : r.shape[0]] = 1
        return torch.cat([cond, extra], 1), torch.cat([mask, extra_mask], 1)


def check_identifier(identifier: str) -> None:
    if not isinstance(identifier, str) or not identifier.strip() or not _IDENT_RE.match(identifier):
        raise ValueError(
            f"identifier {identifier!r} must be one non-empty word without spaces, e.g. '<v1>' (angle brackets "
            "keep it from colliding with ordinary words)"
        )


def clean_prompt(text: str) -> str:
    """Tidy the text left after cutting identifiers: collapse spaces, drop dangling commas."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;])(\s*[,;])+", r"\1", text)
    return text.strip(" ,;")


@functools.lru_cache(maxsize=256)
def token_pattern(identifier: str) -> re.Pattern[str]:
    """`identifier` as a whole token of a prompt: where it begins (ends) with a word character, no word character may
    stand right before (after) it. So "v1" is found in "v1 synth" and "v1," but not in "v10" or "nav1"; "<v1>", whose
    ends are punctuation, is found in "<v1>,", "(<v1>)" and "jazz<v1>"."""
    left = r"(?<!\w)" if re.match(r"\w", identifier[:1]) else ""
    right = r"(?!\w)" if re.match(r"\w", identifier[-1:]) else ""
    return re.compile(left + re.escape(identifier) + right)


def mentions(identifier: str, text: str) -> bool:
    """Whether `text` names `identifier` the way the bank reads prompts (as a whole token, `token_pattern`)."""
    return token_pattern(identifier).search(text) is not None


def find_collisions(identifier: str, texts: Iterable[str]) -> list[tuple[str, str]]:
    """`(text, word)` for each text whose ordinary words include `identifier` itself or its bare form (brackets
    stripped, any case): "music" in "a piece of music, {}", "v1" in "v1 synth lead" for "<v1>". `texts` are
    templates (each "{}" is where the identifier goes and is left out) or prompts that must not name the identifier.
    The bank would cut the identifier out of every prompt that uses it as a word; a bare form in the text competes
    with the concept for what the word means."""
    bare = identifier.strip("<>[]{}*").lower()
    out = []
    for text in texts:
        ordinary = text.replace("{}", " ")
        if mentions(identifier, ordinary):
            out.append((text, identifier))
        elif bare and bare in re.findall(r"[\w'-]+", ordinary.lower()):
            out.append((text, bare))
    return out


def _provider_class(base: type) -> type:
    """A subclass of the provider's class whose tokenize/forward route identifiers through the bank."""
    cache = _provider_class.__dict__.setdefault("_cache", {})
    if base in cache:
        return cache[base]

    def tokenize(self, inputs):  # noqa: ANN001 - audiocraft's signature
        bank: IdentifierBank | None = getattr(self, BANK_ATTR, None)
        if bank is None or not bank.identifiers():
            return base.tokenize(self, inputs)
        per_sample: list[list[str]] = []
        stripped = []
        for attr in inputs:
            text = attr.text.get(bank.attribute)
            clean, idents = bank.split(text)
            per_sample.append(idents)
            if idents:
                # Copy: never mutate the caller's ConditioningAttributes.
                attr = type(attr)(text=dict(attr.text), wav=dict(attr.wav), joint_embed=dict(attr.joint_embed))
                attr.text[bank.attribute] = clean
            stripped.append(attr)
        out = base.tokenize(self, stripped)
        out[_KEY] = per_sample
        return out

    def forward(self, tokenized):  # noqa: ANN001
        per_sample = tokenized.get(_KEY) if isinstance(tokenized, dict) else None
        if per_sample is not None:
            tokenized = {k: v for k, v in tokenized.items() if k != _KEY}
        out = base.forward(self, tokenized)
        bank: IdentifierBank | None = getattr(self, BANK_ATTR, None)
        if per_sample is not None and bank is not None and bank.attribute in out:
            cond, mask = out[bank.attribute]
            out[bank.attribute] = bank.append(cond, mask, per_sample)
        return out

    cls = type(f"PptFast{base.__name__}", (base,), {"tokenize": tokenize, "forward": forward, "_ppt_fast_base": base})
    cache[base] = cls
    return cls


def install(lm: torch.nn.Module, dim: int | None = None, attribute: str = "description") -> IdentifierBank:
    """Attach an IdentifierBank to an audiocraft LMModel (idempotent); returns the bank."""
    bank = getattr(lm, BANK_ATTR, None)
    if bank is not None:
        return bank
    provider = lm.condition_provider
    if attribute not in provider.conditioners:
        raise ValueError(
            f"the LM has no text conditioner named {attribute!r} (it has {list(provider.conditioners)}); "
            "identifier tokens need a text condition"
        )
    if dim is None:
        dim = provider.conditioners[attribute].output_dim
    fuser = getattr(lm, "fuser", None)
    if fuser is not None and getattr(fuser, "cross_attention_pos_emb", False):
        logger.warning(
            "this LM adds positional embeddings to the cross-attention source: identifier tokens are appended after "
            "the text, not placed at the identifier's position"
        )
    bank = IdentifierBank(dim, attribute)
    # Plain attribute (not a submodule): the bank's tensors stay out of lm.state_dict()/parameters(), so the base
    # model's fingerprint and audiocraft's optimizer groups are unchanged.
    object.__setattr__(lm, BANK_ATTR, bank)
    object.__setattr__(provider, BANK_ATTR, bank)
    if not hasattr(type(provider), "_ppt_fast_base"):
        provider.__class__ = _provider_class(type(provider))
    return bank


def uninstall(lm: torch.nn.Module) -> None:
    """Remove the bank and restore the provider's original class."""
    provider = lm.condition_provider
    base = getattr(type(provider), "_ppt_fast_base", None)
    if base is not None:
        provider.__class__ = base
    for obj in (lm, provider):
        if BANK_ATTR in obj.__dict__:
            object.__delattr__(obj, BANK_ATTR)


def get_bank(lm: torch.nn.Module) -> IdentifierBank:
    bank = getattr(lm, BANK_ATTR, None)
    if bank is None:
        raise RuntimeError("this LM has no identifier bank; load it with ppt_fast.load_model() or call install(lm)")
    return bank
