"""Sequences that start alike, run through a model with their common start read once.

The answers to one prompt share their first tokens: the prompt in its chat template, and often the answer's first
words. :func:`shared_prefixes` splits such sequences into one prefix per group and each sequence's remainder;
:func:`shared_prefix_scores` runs a sequence classifier (a reward model) over them, the prefixes once, as decoding
continues a prompt. The reward stage trains on such batches (:mod:`rlhf_trainer.preference_batches`), and
:mod:`rlhf_trainer.reward_scoring` scores several answers to a prompt this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_trainer.modeling import transformers_model
from rlhf_trainer.padding import left_pad, position_ids, right_pad

PREFIX_KEYS = ("prefix_ids", "prefix_mask", "suffix_ids", "suffix_mask", "prefix_rows")  # what shared_prefixes returns


def shared_prefixes(sequences: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int]],
                    pad_token_id: int) -> dict[str, torch.Tensor]:
    """The sequences as prefixes shared within groups, and what follows each one's prefix.

    The two sides of a pair answer the same prompt, so the pairs link the sequences into one group per prompt.
    A group's prefix is the longest one all its sequences start with (the prompt, and any first words its answers
    share), short of the whole of any of them: every sequence keeps at least one token of its own, where the
    reward model reads its score.

    Returns:
        ``prefix_ids``, ``prefix_mask`` (G, L): one prefix per group, left-padded (they all end at column L);
        ``suffix_ids``, ``suffix_mask`` (U, S): the rest of each sequence, right-padded; ``prefix_rows`` (U,): the
        group of each sequence. Empty when a sequence is a single token (nothing to share).
    """
    if min(len(s) for s in sequences) < 2:
        return {}
    group = list(range(len(sequences)))  # union-find: each sequence's parent, a root its group's first row

    def root(row: int) -> int:
        while group[row] != row:
            group[row] = row = group[group[row]]
        return row

    for a, b in pairs:
        first, second = sorted((root(a), root(b)))
        group[second] = first
    roots = [root(row) for row in range(len(sequences))]
    shared: dict[int, int] = {}
    for row, first in enumerate(roots):
        common = next((i for i, (x, y) in enumerate(zip(sequences[first], sequences[row])) if x != y),
                      min(len(sequences[first]), len(sequences[row])))
        shared[first] = min(shared.get(first, common), common, len(sequences[row]) - 1)
    index = {first: g for g, first in enumerate(shared)}
    prefix_ids, prefix_mask = left_pad([sequences[first][:length] for first, length in shared.items()], pad_token_id)
    suffix_ids, suffix_mask = right_pad([s[shared[first]:] for s, first in zip(sequences, roots)], pad_token_id)
    return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "suffix_ids": suffix_ids,
            "suffix_mask": suffix_mask, "prefix_rows": torch.tensor([index[first] for first in roots])}


def shared_prefix_scores(classifier: Any, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                         suffix_ids: torch.Tensor, suffix_mask: torch.Tensor,
                         prefix_rows: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's score of each sequence :func:`shared_prefixes` split, reading each prefix once.

    The prefixes run through the backbone first and leave their keys and values in a cache; the cache is copied
    to one row per sequence (its group's) and the remainders run on top of it, as decoding continues a prompt.
    Causal attention makes every position the same function of the tokens before it as in one pass over the
    whole sequence, and autograd carries each remainder's gradient back through the shared prefix. (Under
    dropout, LoRA's, the sequences of a group share their prefix's dropout mask.)

    Returns:
        (U, 1) scores, as the classifier's own forward pass gives them for the whole sequences.
    """
    inner = transformers_model(classifier)
    backbone = getattr(inner, inner.base_model_prefix)
    cache = backbone(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                     use_cache=True).past_key_values
    cache.reorder_cache(prefix_rows)
    attention = torch.cat([prefix_mask[prefix_rows], suffix_mask], dim=1)
    hidden = backbone(input_ids=suffix_ids, attention_mask=attention,
                      position_ids=position_ids(attention)[:, prefix_ids.shape[1]:], past_key_values=cache,
                      use_cache=True).last_hidden_state
    last = suffix_mask.sum(dim=1) - 1
    return inner.score(hidden[torch.arange(len(last), device=hidden.device), last])
