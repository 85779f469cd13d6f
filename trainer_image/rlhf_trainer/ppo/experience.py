"""The experience of one PPO step: what the rollout produced and what the update consumes.

Shapes: ``B`` rollouts (this process's share of the batch), ``P`` prompt width (left-padded), ``R``
response width (the longest response; padding after each stop token). Position ``t`` of every (B, R)
tensor refers to the ``t``-th response token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from rlhf_trainer.padding import left_pad, position_ids, right_pad


@dataclass
class Sequences:
    """Prompts and responses, laid out as the forward passes (:mod:`rlhf_trainer.ppo.forward`) read them."""

    queries: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    responses: torch.Tensor  # (B, R) response ids, padding after the stop token
    mask: torch.Tensor  # (B, R) bool, true on response tokens (the stop token included)

    def input_ids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + response as one left-padded sequence.

        Returns:
            input_ids (B, P + R), attention_mask (B, P + R), position_ids (B, P + R).
        """
        ids = torch.cat([self.queries, self.responses], dim=1)
        attention = torch.cat([self.query_mask, self.mask.to(self.query_mask.dtype)], dim=1)
        return ids, attention, position_ids(attention)


def sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
              device: torch.device | str = "cpu") -> Sequences:
    """Token lists as :class:`Sequences` on ``device``: prompts left-padded, responses right-padded."""
    queries, query_mask = left_pad(prompts, pad_token_id)
    ids, mask = right_pad(responses, pad_token_id)
    return Sequences(*(t.to(device) for t in (queries, query_mask, ids, mask.bool())))


@dataclass
class Rollout(Sequences):
    """Sampled responses and everything the four models said about them (no gradients anywhere)."""

    episodes: torch.Tensor  # (B,) global episode index of each rollout
    lengths: torch.Tensor  # (B,) response lengths in tokens
    has_stop: torch.Tensor  # (B,) bool, the response ended with the stop token
    logprobs: torch.Tensor  # (B, R) log pi_old(token), temperature-scaled; 0 on padding
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(token), temperature-scaled; 0 on padding
    values: torch.Tensor  # (B, R) V_old of the state before each token; 0 on padding
    rm_scores: torch.Tensor  # (B,) reward-model scores
    scores: torch.Tensor  # (B,) rm_scores after the missing-EOS penalty

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollouts at ``rows``, with the columns that are padding in all of them trimmed away."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self)}
        first_prompt_column = int(picked["query_mask"].any(dim=0).int().argmax())
        width = int(picked["lengths"].max())
        for name, value in picked.items():
            if name in ("queries", "query_mask"):
                picked[name] = value[:, first_prompt_column:]
            elif value.dim() == 2:
                picked[name] = value[:, :width]
        return type(self)(**picked)


@dataclass
class Experience(Rollout):
    """A rollout with its per-token rewards, advantages and value targets (step 3 and 4 of the loop)."""

    rewards: torch.Tensor  # (B, R) -beta * KL per token, plus the score on the last token
    advantages: torch.Tensor  # (B, R) GAE advantages, whitened over the whole batch
    returns: torch.Tensor  # (B, R) value targets: GAE advantages (before whitening) + values
