"""Shared by the concept tests: a minimal identifier bank with the interface `Concept.apply` uses (the MusicGen
integration's IdentifierBank has the same four methods)."""

from __future__ import annotations

import pytest
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny ops; on a loaded shared machine torch's thread pool makes each ~100x slower. Autouse in every
    module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
