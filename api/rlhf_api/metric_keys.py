"""The names of the metrics a stage publishes that the executors read: the trainer writes them (``metrics.json``
and the manifest's metrics, PPO's ``progress.json`` after every step), the local runner's summary and the
operator's status (the Reward and KL columns, the RewardHackingSuspected condition) read them.
"""

from __future__ import annotations

from rlhf_api.spec import Stage

FINAL_LOSS = "final_loss"  # SFT: the last logged training loss
PAIRS = "pairs"  # preferences: pairs written
JUDGE_MEAN = "judge_mean"  # preferences and evaluate: the judge's mean score of the sampled answers
EVAL_ACCURACY = "eval_accuracy"  # reward: held-out pair accuracy

RM_SCORE = "rm_score"  # PPO: mean reward-model score of the step's rollouts (of the last step in the manifest)
KL = "kl"  # PPO: mean per-token KL to the reference

GUARDRAIL_PREFIX = "guardrail/"  # PPO: guardrail/<name> is 1 when the guardrail fired
GUARDRAILS = ("kl_above_threshold", "reward_hacking_suspected", "length_collapse", "no_progress")
REWARD_HACKING = f"{GUARDRAIL_PREFIX}reward_hacking_suspected"

SFT = "sft/"  # evaluate: metrics of pi_SFT's answers
POLICY = "policy/"  # evaluate: metrics of the aligned policy's answers
RM_MEAN = "rm_mean"  # evaluate: mean reward-model score
WIN_RATE = "win_rate_vs_sft"  # evaluate: the policy's win rate against pi_SFT under the gold judge
KL_PER_TOKEN = "kl_per_token"  # evaluate: the policy's mean per-token KL to pi_SFT


def guardrail(name: str) -> str:
    return f"{GUARDRAIL_PREFIX}{name}"


#: A stage's headline metrics, (key, label) for summaries.
HEADLINES: dict[Stage, list[tuple[str, str]]] = {
    Stage.SFT: [(FINAL_LOSS, "loss")],
    Stage.PREFERENCES: [(PAIRS, "pairs"), (JUDGE_MEAN, "judge mean")],
    Stage.REWARD: [(EVAL_ACCURACY, "held-out pair accuracy")],
    Stage.PPO: [(RM_SCORE, "reward"), (KL, "KL")],
    Stage.EVALUATE: [(SFT + JUDGE_MEAN, "judge pi_SFT"), (POLICY + JUDGE_MEAN, "judge policy"),
                     (POLICY + WIN_RATE, "win rate"), (POLICY + KL_PER_TOKEN, "KL/token")],
}
#: Where the status's Reward and KL columns come from: the first of these a stage has published.
REWARD_COLUMN = ((Stage.PPO, RM_SCORE), (Stage.EVALUATE, POLICY + RM_MEAN))
KL_COLUMN = ((Stage.PPO, KL), (Stage.EVALUATE, POLICY + KL_PER_TOKEN))
