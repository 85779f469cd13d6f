"""Stage 2, preference data: sample k responses per prompt from pi_SFT and label pairs with a judge.

For each prompt, ``numSamplesPerPrompt`` responses are sampled (batched, left-padded, KV cache), the judge
scores each one, and pairs are formed: ``best_worst`` keeps the best and the worst response of the prompt,
``all`` keeps every pair; either way only pairs whose scores differ by at least ``minScoreMargin``.

Output: ``pairs.jsonl`` (prompt, chosen, rejected, chosen_score, rejected_score) for the reward stage, and
``samples.jsonl`` with every response and its score, to read what the labeller saw.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from typing import Any

from rlhf_api import metric_keys
from rlhf_api.spec import PreferencesSpec
from rlhf_trainer import models
from rlhf_trainer.data import load_prompts, write_jsonl
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.generation import sample
from rlhf_trainer.judges import make_judge
from rlhf_trainer.workspace import Workspace


def make_pairs(
    scored: dict[str, list[tuple[str, float]]], strategy: str, min_margin: float
) -> list[dict[str, Any]]:
    """Preference pairs from each prompt's (response, score) list.

    Args:
        scored: prompt -> [(response, judge score), ...].
        strategy: "best_worst" (one pair per prompt) or "all" (every pair).
        min_margin: drop pairs whose scores differ by less than this.
    """
    pairs = []
    for prompt, responses in scored.items():
        distinct = list({text: score for text, score in responses}.items())  # identical responses teach nothing
        ranked = sorted(distinct, key=lambda item: item[1], reverse=True)
        if strategy == "best_worst":
            candidates = [(ranked[0], ranked[-1])] if len(ranked) >= 2 else []
        else:
            candidates = list(itertools.combinations(ranked, 2))
        for (chosen, chosen_score), (rejected, rejected_score) in candidates:
            if chosen_score - rejected_score >= min_margin and chosen_score > rejected_score:
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                              "chosen_score": chosen_score, "rejected_score": rejected_score})
    return pairs


def run(ws: Workspace) -> dict[str, Any]:
    settings: PreferencesSpec = ws.config.stage_settings()  # type: ignore[assignment]
    prompts = load_prompts(settings.prompts, ws)

    policy_dir = ws.fetch_dir("policy")
    tokenizer = models.load_tokenizer(policy_dir, ws.config.model)
    spec = models.frozen_spec(ws.config.model, models.bf16_enabled(settings.bf16, "spec.preferences.bf16"))
    policy = models.freeze(models.load_causal_lm(policy_dir, spec, tokenizer).to(models.device()))
    repeated = [p for p in prompts for _ in range(settings.num_samples_per_prompt)]
    samples = sample(policy, tokenizer, repeated, settings.generation, batch_size=settings.batch_size,
                     seed=settings.seed, use_chat_template=ws.config.model.tokenizer.use_chat_template,
                     desc="sampling responses")

    judge = make_judge(settings.judge.type)
    scores = judge.score([s.prompt for s in samples], [s.text for s in samples])
    scored: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for s, score in zip(samples, scores):
        if s.text:
            scored[s.prompt].append((s.text, score))
    pairs = make_pairs(scored, settings.pairs, settings.min_score_margin)
    if not pairs:
        raise ConfigError(
            "preferences: no pair passed spec.preferences.minScoreMargin "
            f"({settings.min_score_margin}); lower it or raise numSamplesPerPrompt / generation.temperature"
        )

    write_jsonl(ws.output_dir / "samples.jsonl",
                ({"prompt": s.prompt, "response": s.text, "score": sc, "eos": s.has_eos}
                 for s, sc in zip(samples, scores)))
    write_jsonl(ws.output_dir / "pairs.jsonl", pairs)
    return {
        "prompts": len(prompts),
        "samples": len(samples),
        metric_keys.PAIRS: len(pairs),
        metric_keys.JUDGE_MEAN: round(statistics.fmean(scores), 4),
        "mean_margin": round(statistics.fmean(p["chosen_score"] - p["rejected_score"] for p in pairs), 4),
        "eos_rate": round(sum(s.has_eos for s in samples) / len(samples), 4),
    }
