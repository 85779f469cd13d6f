"""The judge and what the stages compute from scores, against hand-computed values: preference pairs, reward margins
and score normalization, and evaluate's metrics."""

from __future__ import annotations

import pytest
import torch

from rlhf_trainer.errors import ConfigError
from rlhf_trainer.judges import make_judge
from rlhf_trainer.stages.evaluate import mean_kl_per_token, rm_pair_accuracy, win_rate
from rlhf_trainer.stages.preferences import make_pairs
from rlhf_trainer.stages.reward import margin, score_std


def test_vader_judge_orders_sentiment():
    judge = make_judge("vader")
    good, bad = judge.score(["p", "p"], ["A wonderful, moving film.", "A dull, awful mess."])
    assert good > 0.5 and bad < -0.5


def test_best_worst_pairs_keep_one_pair_per_prompt_above_the_margin():
    scored = {
        "p1": [("good", 0.9), ("meh", 0.1), ("bad", -0.8)],
        "p2": [("a", 0.30), ("b", 0.25)],  # margin 0.05 < 0.1: dropped
        "p3": [("same", 0.5), ("same", 0.5)],  # identical responses teach nothing
    }
    pairs = make_pairs(scored, "best_worst", 0.1)
    assert pairs == [{"prompt": "p1", "chosen": "good", "rejected": "bad", "chosen_score": 0.9,
                      "rejected_score": -0.8}]


def test_all_pairs():
    pairs = make_pairs({"p": [("x", 1.0), ("y", 0.0), ("z", 0.5)]}, "all", 0.3)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x", "z"), ("x", "y"), ("z", "y")]


def test_score_margin_scales_the_judge_score_difference_and_needs_scores():
    pair = {"prompt": "p", "chosen": "good", "rejected": "bad", "chosen_score": 0.75, "rejected_score": -0.25}
    assert margin(pair, 0.5) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="scoreMargin.*chosen_score"):
        margin({"prompt": "p", "chosen": "good", "rejected": "bad"}, 1.0)


def test_score_normalization_divides_by_the_population_std_and_refuses_one_score_for_all():
    assert score_std([1.0, 3.0, 1.0, 3.0]) == pytest.approx(1.0)
    assert score_std([0.0, 4.0]) == pytest.approx(2.0)
    for scores in ([0.7, 0.7, 0.7], [0.7]):
        with pytest.raises(ConfigError, match="normalizeScores.*one score"):
            score_std(scores)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 0.9, -1.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_rm_pair_accuracy_compares_answers_to_the_same_prompt_only():
    prompts = ["p", "p", "p", "q", "q", "r"]
    judge = [0.9, 0.1, 0.1, 0.5, -0.5, 0.7]
    rm = [2.0, 1.0, 3.0, 0.0, 0.0, -9.0]
    # p: (0.9 vs 0.1) rm 2 > 1 agrees; (0.9 vs 0.1) rm 2 < 3 disagrees; (0.1 vs 0.1) judge tie: not a pair.
    # q: rm tie counts half. r: one answer, no pair; the rm scores across prompts are never compared.
    assert rm_pair_accuracy(prompts, judge, rm) == pytest.approx((1 + 0 + 0.5) / 3)
    assert rm_pair_accuracy(["p", "p", "q"], [0.2, 0.2, 0.4], [1.0, 2.0, 3.0]) is None


def test_mean_kl_per_token_weights_tokens_not_sequences():
    policy = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5])]
    ref = [torch.tensor([-1.5, -2.0, -2.0]), torch.tensor([-1.5])]
    # differences: 0.5, 0, -1, 1 -> mean over 4 tokens
    assert mean_kl_per_token(policy, ref) == pytest.approx(0.5 / 4 + 0 - 1 / 4 + 1 / 4)
