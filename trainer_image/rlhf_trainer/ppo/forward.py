"""Forward passes over a batch of rollouts: log-probabilities of the responses, and values.

Only the response positions are computed where it costs: the LM head runs on the last R + 1 positions
(``logits_to_keep``), not on the prompt, and log-probabilities are gathered as ``logit - logsumexp``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from rlhf_trainer.ppo.experience import Rollout
from rlhf_trainer.ppo.functional import entropy_from_logits, logprobs_from_logits


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bfloat16 autocast for forward passes when enabled (weights stay float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def response_logits(policy: Any, batch: Rollout, temperature: float) -> torch.Tensor:
    """Next-token logits at each response position, divided by the sampling temperature.

    Detail: the log-probabilities PPO uses are those of the distribution the tokens were sampled from, so the
    logits are scaled by the same temperature (1 for greedy decoding).

    Returns:
        (B, R, V) float32.
    """
    ids, attention, positions = batch.input_ids()
    width = batch.responses.shape[1]
    logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                    logits_to_keep=width + 1).logits[:, :-1]
    return logits.float() / (temperature if temperature > 0 else 1.0)


def response_logprobs(policy: Any, batch: Rollout, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) for each response token (0 on padding), and optionally the entropy at each position.

    Returns:
        logprobs (B, R); entropy (B, R) without gradient, or None.
    """
    logits = response_logits(policy, batch, temperature)
    logprobs = logprobs_from_logits(logits, batch.responses) * batch.mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    return logprobs, entropy


def response_values(value_model: Any, batch: Rollout) -> torch.Tensor:
    """V of the state before each response token (0 on padding).

    Returns:
        (B, R) float32.
    """
    ids, attention, positions = batch.input_ids()
    return value_model(ids, attention, positions, batch.responses.shape[1]) * batch.mask
