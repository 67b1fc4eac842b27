"""Shared by the concept tests: a minimal identifier bank with the interface `Concept.apply` uses (the MusicGen
integration's IdentifierBank has the same four methods)."""

from __future__ import annotations

import torch


class TinyBank:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.tokens: dict[str, torch.Tensor] = {}

    def add(self, identifier, embeddings):
        self.tokens[identifier] = embeddings

    def remove(self, identifier):
        del self.tokens[identifier]

    def has(self, identifier):
        return identifier in self.tokens

    def identifiers(self):
        return list(self.tokens)
