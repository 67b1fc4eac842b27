"""Every change ppt_fast makes to a transformers MusicGen, with its revert: identifier tokens in the text condition.

The T5 tokenizer has no `<v1>`, so the host cuts identifiers out of each prompt (`IdentifierBank.split`), tokenizes
the clean text and appends one placeholder column per identifier token (`identifier_batch`). Two patches then turn
the placeholders into the identifiers' embeddings, for training and for `generate()` alike:

1. The text encoder's `forward` (an instance attribute, removed by `uninstall_identifiers`) encodes only the text
   columns, with the text's own attention mask, and returns zero rows for the placeholders, so the text's encoding is
   exactly what it would be without them.
2. A forward hook on `enc_to_dec_proj` (or, when the model has none in use, on the text encoder's output) writes
   each sample's identifier embeddings into its placeholder rows, in the space cross-attention reads (the decoder's
   hidden size, after the projection, as audiocraft appends after its conditioner's `output_proj`).

The attention mask the host passes has ones at the used placeholders, so MusicGen's own `hidden * mask` keeps them
and the decoder's cross-attention attends to them. Classifier-free guidance (`guidance_scale > 1`) concatenates a
zero condition with a zero mask for the unconditional half: the hook writes only the first `len(per_sample)` rows,
and the mask zeroes anything else, so the unconditional half gets no identifier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...concept.registry import BANK_ATTR
from ...identifiers import IdentifierBank

_STATE = "_ppt_fast_identifier_state"


def uses_projection(model: Any) -> bool:
    """Whether MusicGen's forward projects the text encoding (`enc_to_dec_proj`) before cross-attention."""
    return (model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
            and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None)  # fmt: skip


class _State:
    def __init__(self, bank: IdentifierBank) -> None:
        self.bank = bank
        self.pending: tuple[list[list[str]], int] | None = None  # (identifiers per sample, text columns)
        self.handles: list[Any] = []


def _write_tokens(state: _State, hidden: torch.Tensor) -> torch.Tensor:
    if state.pending is None:
        return hidden
    per_sample, text_cols = state.pending
    n = hidden.shape[1] - text_cols
    if n <= 0 or not any(per_sample):
        return hidden
    hidden = hidden.clone()
    for b, idents in enumerate(per_sample[: hidden.shape[0]]):
        if idents:
            rows = torch.cat([state.bank.get(i) for i in idents], 0).to(device=hidden.device, dtype=hidden.dtype)
            hidden[b, text_cols : text_cols + rows.shape[0]] = rows
    return hidden


def install_identifiers(model: Any) -> IdentifierBank:
    """Attach an IdentifierBank (the decoder's hidden size) to a transformers MusicGen (idempotent)."""
    state: _State | None = getattr(model, _STATE, None)
    if state is not None:
        return state.bank
    bank = IdentifierBank(model.decoder.config.hidden_size, attribute="text")
    state = _State(bank)
    encoder = model.text_encoder
    original = type(encoder).forward
    project = uses_projection(model)

    def forward(*args, **kwargs):  # the encoder's signature
        if state.pending is None:
            return original(encoder, *args, **kwargs)
        _, text_cols = state.pending
        input_ids = kwargs.pop("input_ids") if "input_ids" in kwargs else args[0]
        mask = kwargs.pop("attention_mask") if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        out = original(encoder, input_ids=input_ids[:, :text_cols],
                       attention_mask=None if mask is None else mask[:, :text_cols], **kwargs)  # fmt: skip
        h = out.last_hidden_state
        pad = h.new_zeros(h.shape[0], input_ids.shape[1] - text_cols, h.shape[2])
        h = torch.cat([h, pad], 1)
        out.last_hidden_state = h if project else _write_tokens(state, h)
        return out

    encoder.forward = forward  # instance attribute: shadows the class's forward (removed by uninstall)
    if project:

        def hook(module, inputs, output):  # noqa: ANN001 - torch's hook signature
            return _write_tokens(state, output)

        state.handles.append(model.enc_to_dec_proj.register_forward_hook(hook))
    object.__setattr__(model, _STATE, state)
    object.__setattr__(model, BANK_ATTR, bank)  # plain attribute: out of state_dict() and parameters()
    return bank


def uninstall_identifiers(model: Any) -> None:
    """Remove the bank and both patches."""
    state: _State | None = getattr(model, _STATE, None)
    if state is None:
        return
    for h in state.handles:
        h.remove()
    model.text_encoder.__dict__.pop("forward", None)
    for attr in (_STATE, BANK_ATTR):
        if attr in model.__dict__:
            object.__delattr__(model, attr)


@contextlib.contextmanager
def identifier_batch(model: Any, tokenizer: Any, prompts: Sequence[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(input_ids, attention_mask)` for `prompts` with identifiers cut out and placeholder columns appended, and the
    patches primed to write the identifiers' embeddings while the block runs (a forward or a `generate()`)."""
    state: _State = getattr(model, _STATE)
    clean, per_sample = [], []
    for p in prompts:
        text, idents = state.bank.split(p)
        clean.append(text)
        per_sample.append(idents)
    enc = tokenizer(clean, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    counts = [sum(state.bank.get(i).shape[0] for i in idents) for idents in per_sample]
    n = max(counts) if counts else 0
    text_cols = ids.shape[1]
    if n:
        pad_id = getattr(tokenizer, "pad_token_id", 0) or 0
        ids = torch.cat([ids, torch.full((ids.shape[0], n), pad_id, dtype=ids.dtype)], 1)
        extra = torch.zeros(mask.shape[0], n, dtype=mask.dtype)
        for b, c in enumerate(counts):
            extra[b, :c] = 1
        mask = torch.cat([mask, extra], 1)
    state.pending = (per_sample, text_cols) if n else None
    try:
        yield ids, mask
    finally:
        state.pending = None
