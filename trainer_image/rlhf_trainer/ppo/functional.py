"""The PPO-for-RLHF math as small pure tensor functions, each named after the detail it implements.

Shapes: ``B`` rollouts, ``R`` response positions (the longest response of the batch), ``V`` vocabulary.
A response position ``t`` holds the ``t``-th generated token; ``mask[b, t]`` is true on real response
tokens (up to and including the stop token) and false on the padding after them. Every function is
deterministic and side-effect free; ``tests/test_ppo_math.py`` checks each against hand-computed values.

The numbered details follow Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"
(arXiv 2403.17031) and Ziegler et al. 2019 (arXiv 1909.08593).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


# ----------------------------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (every token weighs the same).

    Args:
        values: any shape.
        mask: bool or 0/1, same shape as ``values``.
        reduce: sums over processes, so the mean is over the whole batch, not one process's share.

    Returns:
        A scalar tensor; 0 when the mask is empty.
    """
    total = reduce(torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)]))
    return total[0] / total[1].clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """Unbiased variance (Bessel's correction) of ``values`` where ``mask`` is true.

    Returns:
        A scalar tensor; 0 when fewer than two positions are masked in.
    """
    mean = masked_mean(values, mask, reduce)
    total = reduce(torch.stack([((values - mean) ** 2 * mask).sum(), mask.sum().to(values.dtype)]))
    count = total[1]
    return torch.where(count > 1, total[0] / (count - 1).clamp(min=1), torch.zeros_like(count))


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, reduce: Reduce = _local
) -> torch.Tensor:
    """Whitening: ``(x - mean) / sqrt(var + 1e-8)`` with masked statistics (detail: advantage whitening).

    Args:
        values: (B, R).
        mask: (B, R).
        shift_mean: False adds the mean back, so only the scale changes (used for reward whitening,
            where shifting would change which responses are rewarded).
        reduce: sums over processes, so every process whitens with the whole batch's statistics.

    Returns:
        (B, R); masked-out positions are set to 0.
    """
    mean = masked_mean(values, mask, reduce)
    var = masked_var(values, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ------------------------------------------------------------------------------- responses and rewards


def truncate_at_stop(
    responses: torch.Tensor, stop_token_ids: int | Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detail: truncate each response after its first stop token and pad the rest.

    Args:
        responses: (B, R) generated token ids.
        stop_token_ids: the tokens that end a response (EOS, or several: Llama 3's instruct models end a turn on
            either of two), kept in the response.
        pad_token_id: what replaces everything after it.

    Returns:
        truncated (B, R); lengths (B,) tokens up to and including the stop token, or R when there is none;
        has_stop (B,) bool.
    """
    width = responses.shape[1]
    is_stop = torch.isin(responses, torch.as_tensor(stop_token_ids, device=responses.device))
    has_stop = is_stop.any(dim=1)
    first_stop = is_stop.int().argmax(dim=1)  # 0 for rows without a stop token; has_stop tells them apart
    lengths = torch.where(has_stop, first_stop + 1, width)
    keep = torch.arange(width, device=responses.device).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.where(keep, responses, torch.full_like(responses, pad_token_id)), lengths, has_stop


def response_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: true on the first ``lengths[b]`` positions of row ``b``."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def apply_missing_eos_penalty(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Detail: a response cut off by the length limit (no stop token) gets ``penalty`` less score.

    Args:
        scores: (B,) reward-model scores.
        has_stop: (B,) bool.
        penalty: subtracted where ``has_stop`` is false; None or 0 leaves scores as they are.

    Returns:
        (B,) scores.
    """
    if not penalty:
        return scores
    return scores - penalty * (~has_stop).to(scores.dtype)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With ``log_ratio = logprobs - ref_logprobs``:

    * k1 = log_ratio: unbiased, can be negative per token;
    * k3 = (r - 1) - log r with r = pi_ref / pi = exp(-log_ratio): unbiased, always >= 0, lower variance
      (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).

    Args:
        logprobs, ref_logprobs: (B, R) log-probabilities of the sampled tokens under pi and pi_ref.
        estimator: "k1" or "k3".

    Returns:
        (B, R).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1 or k3")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every token, plus the score on the last response token.

    ``r_t = -kl_coef * KL_t`` for each response token, and ``r_T += score`` at ``T = length - 1`` (detail:
    the reward model's scalar is placed at the last real token, where the episode ends).

    Args:
        scores: (B,) sequence scores (after the missing-EOS penalty).
        kl: (B, R) per-token KL estimates.
        mask: (B, R) response mask.
        lengths: (B,) response lengths (>= 1).
        kl_coef: the KL controller's current coefficient (beta).

    Returns:
        (B, R) rewards, 0 on padding.
    """
    rewards = -kl_coef * kl * mask
    last = (lengths - 1).clamp(min=0).unsqueeze(1)
    return rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))


# ------------------------------------------------------------------------------------------ advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv 1506.02438).

    For each response position ``t`` (right to left), with ``V_{T+1} = 0`` after the last token (the
    episode ends at the stop token or the length limit: nothing to bootstrap)::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the value target, "returns")

    Args:
        rewards: (B, R) per-token rewards, 0 on padding.
        values: (B, R) value estimates V_t of the state before token t.
        mask: (B, R) response mask; values and rewards outside it are treated as 0.
        gamma: discount.
        lam: GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD).

    Returns:
        advantages (B, R) and returns (B, R), both 0 on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate objective of PPO (Schulman et al. 2017, arXiv 1707.06347), per token.

    ``ratio = exp(logprobs - old_logprobs)``; the loss is ``max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))``
    (pessimistic: the update gains nothing by moving the ratio outside the clip range).

    Args:
        logprobs: (B, R) under the policy being trained (with gradient).
        old_logprobs: (B, R) under the policy that sampled the rollouts.
        advantages: (B, R), whitened.
        mask: (B, R) response mask.
        cliprange: epsilon.

    Returns:
        per-token loss (B, R) (0 on padding; the caller normalises), clipped (B, R) bool: where the
        clipped term was the larger one, and approx_kl (B, R): ``0.5 * (logprobs - old_logprobs)^2``,
        a low-variance estimate of KL(old || new) (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(unclipped, clipped) * mask
    return loss, (clipped > unclipped) & mask.bool(), 0.5 * log_ratio.detach() ** 2


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss: ``0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)`` per token.

    Args:
        values: (B, R) predictions of the value model being trained (with gradient).
        old_values: (B, R) its predictions at rollout time.
        returns: (B, R) targets from GAE.
        mask: (B, R) response mask.
        cliprange_value: epsilon for the value.

    Returns:
        per-token loss (B, R) (0 on padding; the caller normalises) and clipped (B, R) bool.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_loss, clipped_loss) * mask
    return loss, (clipped_loss > unclipped_loss) & mask.bool()
