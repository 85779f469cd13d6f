"""PPO's rollouts: one seeded generator per episode, and a bfloat16 copy of the policy to sample from.

The decoding itself (batched, left-padded, KV cache, no autograd) is
:func:`rlhf_trainer.generation.sample_responses`. Each episode (one prompt of one step) samples from its own
random generator, seeded by the run's seed and the episode's global index. A response therefore depends on the
seed, the weights and the prompt only, not on which process sampled it or what else was in its batch: one
process and several give the same rollouts, and a resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from rlhf_trainer.seeding import generator


def episode_generators(seed: int, episodes: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One random generator per episode, seeded from (seed, global episode index)."""
    return [generator(seed, "episode", int(e), device=device) for e in episodes]


class BF16Sampler:
    """A bfloat16 copy of a fully trained policy to sample from under bf16, refreshed before each rollout.

    Detail: decoding one token reads every weight; under autocast it also casts them and pays autocast's
    per-operation dispatch, so sampling from float32 master weights is slower than from a bfloat16 copy. The
    copy costs half the policy's memory and one cast per step, less than it saves (figures: docs/measurements.md,
    "Sampling from a bfloat16 copy"). The
    log-probabilities it records are those of the bf16-rounded weights, which is what the update's autocast
    forward pass computes with as well.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.source = policy
        self.model = copy.deepcopy(policy).to(torch.bfloat16).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("sdpa")  # the trained copy may use eager attention (backward speed)

    @torch.no_grad()
    def refreshed(self) -> nn.Module:
        """The copy, holding the policy's current weights."""
        for mine, theirs in zip(self.model.parameters(), self.source.parameters(), strict=True):
            mine.copy_(theirs)
        return self.model
