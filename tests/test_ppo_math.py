"""The PPO math against values computed by hand (and plain torch where a formula has a textbook twin)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_api.spec import PPOGuardrails
from rlhf_trainer.generation import sample_tokens
from rlhf_trainer.modeling import logprobs_and_entropy
from rlhf_trainer.ppo.experience import Rollout
from rlhf_trainer.ppo.functional import (
    apply_missing_eos_penalty,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    truncate_at_stop,
    value_loss,
)
from rlhf_trainer.ppo.guardrails import Guardrails
from rlhf_trainer.ppo.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # picks 1, 2, 4


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


def test_masked_mean_and_unbiased_variance():
    close(masked_mean(VALUES, MASK), 7 / 3)
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 14/3, over n - 1 = 2
    close(masked_var(VALUES, MASK), 7 / 3)
    close(masked_mean(VALUES, torch.zeros_like(MASK)), 0.0)


def test_masked_whiten_by_hand():
    std = math.sqrt(7 / 3 + 1e-8)
    close(masked_whiten(VALUES, MASK), [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0], [(4 - 7 / 3) / std, 0, 0]])
    # reward whitening keeps the mean: only the scale changes
    close(masked_whiten(VALUES, MASK, shift_mean=False),
          [[(1 - 7 / 3) / std + 7 / 3, (2 - 7 / 3) / std + 7 / 3, 0], [(4 - 7 / 3) / std + 7 / 3, 0, 0]])


def test_whitening_statistics_cover_every_process():
    """Summing the statistics over two processes holding the same rows equals whitening both copies at once."""
    twice = masked_whiten(VALUES, MASK, reduce=lambda t: 2 * t)
    both = masked_whiten(torch.cat([VALUES, VALUES]), torch.cat([MASK, MASK]))
    close(twice, both[:2])
    close(masked_var(VALUES, MASK, reduce=lambda t: 2 * t), 28 / 15)  # 2 * 14/3 over 6 - 1


def test_logprobs_and_entropy_by_hand():
    """Logits log(1..4) are the distribution (0.1, 0.2, 0.3, 0.4); shifting logits changes neither quantity."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.stack([probs.log(), probs.log() + 50.0]).unsqueeze(0)  # (1, 2, 4): the same row, shifted
    tokens = torch.tensor([[2, 0]])
    logprobs, entropy = logprobs_and_entropy(logits, tokens, with_entropy=True)
    close(logprobs, [[math.log(0.3), math.log(0.1)]], 1e-5)
    by_hand = -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4))  # 1.2799 nats
    close(entropy, [[by_hand, by_hand]], 1e-5)
    assert logprobs_and_entropy(logits, tokens)[1] is None


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    close(kl_per_token(logprobs, ref, "k1"), [[0.5, 0.0]])
    # k3 = (r - 1) - log r with r = pi_ref / pi = exp(-0.5)
    close(kl_per_token(logprobs, ref, "k3"), [[math.exp(-0.5) - 1 + 0.5, 0.0]])
    assert (kl_per_token(torch.randn(50), torch.randn(50), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logprobs, ref, "k2")


def test_truncation_at_the_stop_token_and_the_missing_eos_penalty():
    responses = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 1, 1, 1]])
    truncated, lengths, has_stop = truncate_at_stop(responses, stop_token_ids=9, pad_token_id=0)
    assert truncated.tolist() == [[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1] and has_stop.tolist() == [True, False, True]
    assert response_mask(lengths, 4).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    scores = torch.tensor([1.0, 1.0, -0.5])
    close(apply_missing_eos_penalty(scores, has_stop, 1.0), [1.0, 0.0, -0.5])
    close(apply_missing_eos_penalty(scores, has_stop, None), scores)


def test_score_goes_on_the_last_response_token_and_kl_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.7, 0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = token_rewards(torch.tensor([2.0, 3.0]), kl, mask, torch.tensor([3, 1]), kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, -0.15 + 2.0], [-0.25 + 3.0, 0.0, 0.0]])


def test_gae_by_hand():
    # gamma 1, lambda 0.5: deltas 0.1, 0.1, 0.3 (no value after the last token)
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                              torch.ones(1, 3), gamma=1.0, lam=0.5)
    close(advantages, [[0.225, 0.25, 0.3]])
    close(returns, [[0.725, 0.85, 1.0]])
    # gamma 0.9, lambda 0.95, one padding position with garbage value and reward
    advantages, returns = gae(torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[0.5, 0.4, 9.0]]),
                              torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.95)
    close(advantages, [[1 + 0.9 * 0.4 - 0.5 + 0.9 * 0.95 * 1.6, 1.6, 0.0]])
    close(returns, [[2.228 + 0.5, 2.0, 0.0]])


def test_gae_with_lambda_one_is_the_discounted_return_to_go():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.3, -0.2, 0.9]])
    _, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(returns, [[1 + 0.25 * 2, 0.5 * 2, 2.0]])


def test_clipped_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    loss, clipped, approx_kl = policy_loss(ratios.log(), torch.zeros(1, 4), advantages, torch.ones(1, 4), 0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 0.8 (clipped), 3.0
    close(loss, [[-1.2, -0.5, 0.8, 3.0]])
    assert clipped.tolist() == [[True, False, True, False]]
    close(approx_kl, 0.5 * ratios.log() ** 2)
    masked, masked_clipped, _ = policy_loss(ratios.log(), torch.zeros(1, 4), advantages,
                                            torch.tensor([[1, 0, 0, 1]]), 0.2)
    close(masked, [[-1.2, 0.0, 0.0, 3.0]])
    assert masked_clipped.tolist() == [[True, False, False, False]]


def test_clipped_value_loss_by_hand():
    loss, clipped = value_loss(torch.tensor([[1.5, 0.9]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]),
                               torch.ones(1, 2), 0.2)
    # 1.5 clips to 1.2: max(0.5^2, 0.8^2) / 2 = 0.32; 0.9 is inside the range: 0.81 / 2
    close(loss, [[0.32, 0.405]])
    assert clipped.tolist() == [[True, False]]


def test_kl_controllers():
    fixed = make_kl_controller(0.1, None, 10000)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    adaptive = make_kl_controller(0.1, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    adaptive.update(9.0, 256)  # error 0.5 clipped to 0.2: beta * (1 + 0.2 * 256 / 10000)
    assert adaptive.value == pytest.approx(0.1 * 1.00512)
    adaptive.update(3.0, 256)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    restored = make_kl_controller(0.1, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_guardrail_flags():
    now = [0.0]
    guard = Guardrails(PPOGuardrails(max_kl=0.2, hacking_window=4, min_length_ratio=0.5, no_progress_seconds=60),
                       clock=lambda: now[0])

    def step(rm, gold, kl=0.1, length=20.0, at=0.0):
        now[0] = at
        return guard.check({"objective/rm_score": rm, "objective/gold_score": gold, "objective/kl": kl,
                            "response/length": length})

    assert not any(step(0.0, 0.5).values())
    assert step(0.1, 0.4, kl=0.3)["guardrail/kl_above_threshold"] == 1.0
    step(0.2, 0.3)
    flags = step(0.3, 0.1, length=9.0, at=30.0)  # window full: rm rising, gold falling; length under half
    assert flags["guardrail/reward_hacking_suspected"] == 1.0 and flags["guardrail/length_collapse"] == 1.0
    assert step(0.25, 0.6, at=100.0)["guardrail/no_progress"] == 1.0  # best rm (0.3) 70 s ago
    assert guard.fired == {"kl_above_threshold", "reward_hacking_suspected", "length_collapse", "no_progress"}


def test_reward_hacking_needs_changes_beyond_the_step_means_noise():
    def flagged(rm: list[float], gold: list[float]) -> list[bool]:
        guard = Guardrails(PPOGuardrails(hacking_window=10))
        return [guard.check({"objective/rm_score": r, "objective/gold_score": g, "objective/kl": 0.05,
                             "response/length": 20.0})["guardrail/reward_hacking_suspected"] == 1.0
                for r, g in zip(rm, gold)]

    # A healthy demo run's steps 2-11: the reward model's score rose (+0.47, 2.1 standard errors), the gold
    # judge's means moved by 0.004 in noise of about 0.1 (a comparison of means alone flagged this step).
    demo_rm = [1.939, 1.868, 0.888, 1.939, 1.895, 2.404, 2.044, 2.186, 1.953, 2.271]
    demo_gold = [0.571, 0.499, 0.5, 0.625, 0.709, 0.606, 0.602, 0.69, 0.571, 0.416]
    assert flagged(demo_rm, demo_gold) == [False] * 10
    # Hacking: the score climbs while the gold judge sinks, with the same noise on both.
    noise = [0.08, -0.1, 0.05, -0.02, 0.1, -0.07, 0.0, 0.09, -0.05, 0.03]
    rm = [1.0 + 0.2 * i + e for i, e in enumerate(noise)]
    gold = [0.6 - 0.05 * i - e for i, e in enumerate(noise)]
    assert flagged(rm, gold) == [False] * 9 + [True]
    assert flagged(rm, [0.6 + e for e in noise]) == [False] * 10  # gold judge flat: no flag


def test_select_trims_padding_columns():
    def rollout(**overrides):
        base = dict(episodes=torch.tensor([0, 1]), queries=torch.tensor([[0, 0, 3], [0, 4, 5]]),
                    query_mask=torch.tensor([[0, 0, 1], [0, 1, 1]]), responses=torch.tensor([[7, 8, 0], [9, 0, 0]]),
                    mask=torch.tensor([[True, True, False], [True, False, False]]), lengths=torch.tensor([2, 1]),
                    has_stop=torch.tensor([True, True]), logprobs=torch.ones(2, 3), ref_logprobs=torch.ones(2, 3),
                    values=torch.ones(2, 3), rm_scores=torch.zeros(2), scores=torch.zeros(2))
        return Rollout(**{**base, **overrides})

    picked = rollout().select(torch.tensor([1]))
    assert picked.queries.tolist() == [[4, 5]] and picked.responses.tolist() == [[9]]
    assert picked.logprobs.shape == (1, 1)
    ids, attention, positions = rollout().select(torch.tensor([0, 1])).input_ids()
    assert ids.tolist() == [[0, 3, 7, 8], [4, 5, 9, 0]]
    assert attention.tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    assert positions.tolist() == [[0, 0, 1, 2], [0, 1, 2, 2]]


def test_sampling_follows_the_distribution_and_never_picks_impossible_tokens():
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    logits = probs.log().expand(4000, 4)  # log 0 = -inf: impossible
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    counts = torch.bincount(sample_tokens(logits, generators), minlength=4).float() / 4000
    assert counts[1] == 0
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)
