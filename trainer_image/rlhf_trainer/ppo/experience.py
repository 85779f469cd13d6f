"""The experience of one PPO step: what the rollout produced and what the update consumes.

Shapes: ``B`` rollouts (this process's share of the batch), ``P`` prompt width (left-padded), ``R``
response width (the longest response; padding after each stop token). Position ``t`` of every (B, R)
tensor refers to the ``t``-th response token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf_trainer.modeling import Sequences


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
        """The rollouts at ``rows``, with the columns that are padding in all of them trimmed away (fields that are
        not per-rollout tensors are shared)."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        picked.update({name: value[rows] for name, value in picked.items() if isinstance(value, torch.Tensor)})
        first_prompt_column = int(picked["query_mask"].any(dim=0).int().argmax())
        width = int(picked["lengths"].max())
        for name, value in picked.items():
            if name in ("queries", "query_mask"):
                picked[name] = value[:, first_prompt_column:]
            elif isinstance(value, torch.Tensor) and value.dim() == 2:
                picked[name] = value[:, :width]
        return type(self)(**picked)


@dataclass
class Experience(Rollout):
    """A rollout with its per-token rewards, advantages and value targets (steps 3 and 4 of the loop)."""

    kl: torch.Tensor  # (B, R) the per-token KL estimate to the reference; 0 on padding
    rewards: torch.Tensor  # (B, R) -beta * KL per token, plus the score on the last token
    advantages: torch.Tensor  # (B, R) GAE advantages, whitened over the whole batch
    returns: torch.Tensor  # (B, R) value targets: GAE advantages (before whitening) + values
    gold_scores: torch.Tensor | None = None  # (B,) the gold judge's scores, when the spec names a judge
    # The loss sums of the first epoch's value update when the value pass already ran it (its gradients are in
    # place): see PPOTrainer.value_pass_trains. None otherwise.
    value_loss_sums: dict[str, torch.Tensor] | None = None
