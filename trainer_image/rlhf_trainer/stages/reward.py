"""Stage 3, reward model: a sequence classifier (num_labels=1) trained on preference pairs with TRL's
RewardTrainer (Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)), in batches that score each distinct
response once (:mod:`rlhf_trainer.preference_batches`).

The backbone is pi_SFT (or the base model, ``initFrom: base``), all of it or its first ``numLayers`` layers.
``evalFraction`` of the pairs is held out and the stage reports the held-out pair accuracy: the fraction of
pairs whose chosen response outscores the rejected one. With ``normalizeScores`` the score head is then divided by
the standard deviation of the scores of those pairs' distinct responses (of the training pairs' when none are
held out), so PPO's KL coefficient means the same against any reward model the stage trains. Output: R_phi as a
plain checkpoint with its tokenizer, ``trainer_log.jsonl``, metrics.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from rlhf_api import metric_keys
from rlhf_api.spec import DatasetRef, ModelSpec, RewardSpec
from rlhf_trainer import hf_training, models, reward_scoring
from rlhf_trainer.data import load_dataset_rows, read_rows, require_fields
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.stages.common import conversational, uses_chat_template
from rlhf_trainer.workspace import Workspace


def load_pairs(ws: Workspace) -> list[dict[str, Any]]:
    ref = ws.input_ref("preferences")
    if ref.produced_by is not None:
        rows = read_rows(ws.fetch_dir("preferences") / "pairs.jsonl", source=ref.uri)
    else:
        rows = load_dataset_rows(DatasetRef(uri=ref.uri), ws)
    require_fields(rows, ("prompt", "chosen", "rejected"), ref.uri)
    return rows


def fits(tokenizer: Any, row: dict[str, Any], max_length: int, chat: bool) -> bool:
    """Both sides of the pair fit in max_length tokens (TRL would silently drop the pair otherwise)."""
    return all(len(reward_scoring.reward_input_ids(tokenizer, row["prompt"], row[side], chat)) <= max_length
               for side in ("chosen", "rejected"))


def margin(row: dict[str, Any], scale: float) -> float:
    """The margin-loss target of a pair: ``scale`` times its judge-score difference."""
    try:
        return scale * (float(row["chosen_score"]) - float(row["rejected_score"]))
    except KeyError as missing:
        raise ConfigError(f"spec.reward.scoreMargin needs judge scores in every pair, and one has no {missing}: "
                          "use pairs from the preferences stage, or unset scoreMargin") from None


def split(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the prompts with all their pairs, so no held-out prompt was trained on."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: int(round(len(prompts) * fraction))])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


def distinct_responses(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every distinct (prompt, response) of the pairs, chosen and rejected sides alike, in a stable order."""
    return sorted({(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")})


def score_std(scores: list[float]) -> float:
    """The standard deviation ``normalizeScores`` divides the score head by: of the distinct responses' scores."""
    std = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    if not std > 1e-6:
        raise ConfigError(
            f"spec.reward.normalizeScores: the trained reward model gives the {len(scores)} distinct responses "
            "of its preference data one score, so there is no scale to normalize: check that the pairs' "
            "responses differ, or unset normalizeScores")
    return std


def backbone_layers(backbone: Path, num_layers: int | None, model: ModelSpec) -> int | None:
    """``spec.reward.numLayers``, checked against the backbone: the reward model cannot keep layers it lacks."""
    if num_layers is None:
        return None
    from transformers import AutoConfig

    available = AutoConfig.from_pretrained(backbone, trust_remote_code=model.trust_remote_code).num_hidden_layers
    if num_layers > available:
        raise ConfigError(f"spec.reward.numLayers is {num_layers} but the backbone has {available} transformer "
                          f"layers: set it to at most {available}, or unset it to keep them all")
    return num_layers


def run(ws: Workspace) -> dict[str, Any]:
    settings: RewardSpec = ws.config.stage_settings()  # type: ignore[assignment]
    backbone = ws.fetch_dir("model")
    tokenizer = models.load_tokenizer(backbone, ws.config.model)
    tokenizer.padding_side = "right"
    chat = uses_chat_template(tokenizer, ws.config.model.tokenizer.use_chat_template)

    loaded = load_pairs(ws)
    pairs = [r for r in loaded if fits(tokenizer, r, settings.max_length, chat)]
    train_rows, eval_rows = split(pairs, settings.eval_fraction, settings.seed)
    if not train_rows:
        raise ConfigError(
            f"reward: of {len(loaded)} pairs, {len(pairs)} fit in spec.reward.maxLength ({settings.max_length} "
            f"tokens) and evalFraction {settings.eval_fraction} leaves none to train on: raise maxLength, "
            "provide more pairs or lower evalFraction")
    trained, result, main = train(ws, settings, backbone, tokenizer, chat, train_rows)
    metrics: dict[str, Any] = {
        "train_loss": round(float(result.training_loss), 4),
        "train_pairs": len(train_rows),
        "dropped_too_long": len(loaded) - len(pairs),
        "eval_pairs": len(eval_rows),
        "steps": result.global_step,
    }
    if not main:  # the main process scores the held-out pairs and writes the output (the CLI publishes it)
        return metrics
    metrics.update(score_held_out(trained, tokenizer, chat, settings, train_rows, eval_rows))
    tokenizer.padding_side = ws.config.model.tokenizer.padding_side
    models.save_plain(trained, tokenizer, ws.output_dir)
    return metrics


def train(ws: Workspace, settings: RewardSpec, backbone: Path, tokenizer: Any, chat: bool,
          rows: list[dict[str, Any]]) -> tuple[Any, Any, bool]:
    """Train the reward model on ``rows`` (resuming from a stored checkpoint); returns it merged, whole (gathered
    from ZeRO shards) and in eval mode, the Trainer's result, and whether this is the main process."""
    from datasets import Dataset
    from trl import RewardConfig

    from rlhf_trainer.preference_batches import DistinctResponseRewardTrainer

    bf16 = models.bf16_enabled(settings.bf16, "spec.reward.bf16")
    hf_training.seed_before_loading(settings.seed)  # new weights (a pad token's embedding row): the same every run
    layers = backbone_layers(backbone, settings.num_layers, ws.config.model)
    model = models.load_sequence_classifier(backbone, ws.config.model, tokenizer, zero_new_head=True,
                                            trained_in_bf16=bf16, num_layers=layers)
    dataset = Dataset.from_list([
        conversational(chat, prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
        | ({"margin": margin(r, settings.score_margin)} if settings.score_margin is not None else {})
        for r in rows
    ])
    stopper = hf_training.StopOnSigterm()
    trainer = DistinctResponseRewardTrainer(
        model=model,
        args=RewardConfig(
            **hf_training.training_args(settings, ws.checkpoints_dir, bf16, settings.distributed.zero_stage),
            center_rewards_coefficient=settings.center_rewards_coefficient,
            eval_strategy="no",
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=models.lora_config(settings.lora, "SEQ_CLS") if settings.lora.enabled else None,
        callbacks=hf_training.stage_callbacks(ws, stopper, ws.output_dir / "trainer_log.jsonl"),
    )
    result = hf_training.train_with_resume(trainer, ws, stopper)
    trained = hf_training.plain_trained_model(trainer)  # every process: under ZeRO-3 the gathers are collectives
    trained = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
    return trained.eval(), result, trainer.is_world_process_zero()


def score_held_out(trained: Any, tokenizer: Any, chat: bool, settings: RewardSpec, train_rows: list[dict[str, Any]],
                   eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out pair accuracy and margin; with ``normalizeScores``, the score head rescaled to unit spread over the
    held-out pairs' distinct responses (the training pairs' when none are held out)."""
    metrics: dict[str, Any] = {}
    scored_rows = eval_rows or (train_rows if settings.normalize_scores else [])
    texts = distinct_responses(scored_rows)
    score_of = dict(zip(texts, reward_scoring.score(trained, tokenizer, [p for p, _ in texts],
                                                    [t for _, t in texts], chat=chat))) if texts else {}
    if settings.normalize_scores:
        std = score_std(list(score_of.values()))
        models.scale_score_head(trained, 1.0 / std)
        score_of = {text: value / std for text, value in score_of.items()}
        metrics["raw_score_std"] = round(std, 4)
        metrics["normalized_score_mean"] = round(statistics.fmean(score_of.values()), 4)
    if eval_rows:
        chosen = [score_of[r["prompt"], r["chosen"]] for r in eval_rows]
        rejected = [score_of[r["prompt"], r["rejected"]] for r in eval_rows]
        metrics[metric_keys.EVAL_ACCURACY] = round(sum(c > r for c, r in zip(chosen, rejected)) / len(eval_rows), 4)
        metrics["eval_margin"] = round(sum(c - r for c, r in zip(chosen, rejected)) / len(eval_rows), 4)
    return metrics
