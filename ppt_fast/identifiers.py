"""Identifier tokens (`<v1>`, `<v2>`, ...): the rules for identifiers in prompts, and the bank of their embeddings.

Host-agnostic: a host (`ppt_fast.hosts`) installs an `IdentifierBank` on its text conditioning, so that before the
text encoder reads a prompt every registered identifier is cut out of the text (`IdentifierBank.split`), and after it
ran each identifier's embeddings (`[n_tokens, output_dim]`, in the encoder's OUTPUT space) are appended to that
sample's condition tensor with mask ones (`IdentifierBank.append`).

An identifier is matched as a whole token (`token_pattern`): never inside a longer word ("v1" is not cut out of "v10"
or "nav1"), while punctuation around it delimits it ("<v1>," and "(<v1>)" match).

Why appending equals placing the tokens at the identifier's position: MusicGen feeds the text condition to the
decoder only through cross-attention, which adds no positional encoding to its source, so attention over the source
is permutation-invariant. Padding: samples of a batch with fewer identifier tokens get zero vectors with mask 0,
which is how MusicGen pads text conditions.

The bank lives on the LM as the plain attribute `BANK_ATTR` (`lm._ppt_fast_identifier_bank`, what
`ppt_fast.concept.Concept.apply` looks for), so its tensors stay out of the LM's `state_dict()` and parameters.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

import torch

from .concept.registry import BANK_ATTR

logger = logging.getLogger(__name__)

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


def get_bank(lm: torch.nn.Module) -> IdentifierBank:
    bank = getattr(lm, BANK_ATTR, None)
    if bank is None:
        raise RuntimeError("this LM has no identifier bank; load it with ppt_fast.load_model()")
    return bank
