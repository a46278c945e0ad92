"""The contract between the engine and a model.

The engine only ever needs four things from a model: extend a KV state with tokens and
get the next-token logits back, shorten a state, copy a piece of it, and know its size.
Keeping the contract this small is what lets the engine reason about sessions, entries
and ready positions without knowing which library runs the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a loaded model to budget and label work."""

    name: str
    architecture: str
    vocab_size: int
    context_length: int
    device: str
    dtype: str
    eos_token_ids: tuple[int, ...]
    kv_bytes_per_token: int


class KVSuffix(Protocol):
    """A detached copy of the KV rows of a state from some position on.

    Ready positions are stored this way: the session's own KV stays at its real prefix and
    a speculation costs only the rows it added.
    """

    length: int

    def nbytes(self) -> int: ...


class KVState(Protocol):
    """One sequence's key/value cache."""

    def __len__(self) -> int: ...

    def nbytes(self) -> int: ...


class Backend(Protocol):
    """A causal language model that runs token ids over a KV state."""

    info: ModelInfo

    def new_state(self) -> KVState:
        """An empty state."""

    def forward(self, state: KVState, token_ids: list[int], keep: int = 1) -> torch.Tensor:
        """Append ``token_ids`` to ``state`` and return the logits of the last ``keep``
        positions, shape ``(keep, vocab)``. Never materialises logits for every position."""

    def crop(self, state: KVState, length: int) -> None:
        """Shorten ``state`` to its first ``length`` positions."""

    def suffix(self, state: KVState, start: int) -> KVSuffix:
        """A detached copy of the rows from ``start`` to the end."""

    def extend(self, state: KVState, suffix: KVSuffix) -> None:
        """Append rows taken earlier with :meth:`suffix` (their prefix must be in place)."""

    def save_state(self, state: KVState, path: str, metadata: dict[str, str]) -> None:
        """Write ``state`` to disk (spilling an evicted session)."""

    def load_state(self, path: str) -> tuple[KVState, dict[str, str]]:
        """Read back what :meth:`save_state` wrote."""
