"""Token lists to padded batches: left padding for prompts a causal LM continues, right padding for text
read at its last real token (responses, reward-model inputs); batches of similar lengths, which carry little
padding."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to the longest one.

    Returns:
        ids (B, P) and attention mask (B, P), 1 on real tokens.
    """
    return _pad(sequences, pad_token_id, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest one.

    Returns:
        ids (B, S) and attention mask (B, S), 1 on real tokens.
    """
    return _pad(sequences, pad_token_id, left=False)


def _pad(sequences: Sequence[Sequence[int]], pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        columns = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, columns] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def index_batches(count: int, batch_size: int, key: Callable[[int], Any] | None = None) -> list[list[int]]:
    """Row indices ``0 .. count-1`` in batches of ``batch_size``: in input order, or sorted by ``key(row)`` (a
    length: each batch then holds texts of similar lengths). The sort is stable: equal keys keep input order."""
    order = sorted(range(count), key=key) if key is not None else list(range(count))
    return [order[start:start + batch_size] for start in range(0, count, batch_size)]


def group_rows(keys: Sequence[Hashable]) -> list[list[int]]:
    """Row indices grouped by their key (e.g. each row's prompt): groups in the order their first row comes,
    rows in input order within a group."""
    rows_of: dict[Hashable, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)
    return list(rows_of.values())


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding shifts nothing)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
