"""Stage 4, PPO: align pi_SFT to the reward model R_phi with a KL penalty to pi_SFT.

Inputs: ``policy`` (pi_SFT: the policy and the reference) and ``reward_model`` (R_phi: the reward and the value
model). The engine is :mod:`rlhf_trainer.ppo`; this module wires it to the workspace: processes, inputs,
checkpoints in the store, SIGTERM, and the output.

Output: the aligned policy as a plain Hugging Face checkpoint with its tokenizer (a LoRA adapter merged in,
unless ``mergeLora: false``), ``metrics.jsonl`` (one line per step, read by the evaluate stage's plots), and
headline metrics ``rm_score`` and ``kl`` (mean per-token KL to the reference) of the last step. Only the main
process writes the output.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch

from rlhf_api import metric_keys
from rlhf_api.spec import ModelSpec, PPOSpec
from rlhf_trainer import progress
from rlhf_trainer.data import load_dataset_rows, require_fields
from rlhf_trainer.errors import ConfigError, Preempted
from rlhf_trainer.judges import make_judge
from rlhf_trainer.models import save_plain
from rlhf_trainer.ppo import distributed
from rlhf_trainer.ppo.checkpoint import PPOCheckpoints
from rlhf_trainer.ppo.metrics_log import MetricsLog
from rlhf_trainer.ppo.models import load_models, merged_policy
from rlhf_trainer.ppo.trainer import METRICS, PPOTrainer, Stopped
from rlhf_trainer.ppo.zero import held_parameters
from rlhf_trainer.workspace import Workspace

HEADLINE = {"objective/rm_score": metric_keys.RM_SCORE, "objective/kl": metric_keys.KL, "objective/kl_coef": "kl_coef",
            "objective/gold_score": "gold_score", "response/length": "response_length",
            "response/eos_rate": "eos_rate", "time/step": "seconds_per_step"}


def run(ws: Workspace) -> dict[str, Any]:
    settings: PPOSpec = ws.config.stage_settings()  # type: ignore[assignment]
    if settings.prompts is None:
        raise ConfigError("spec.ppo.prompts is required: a JSON Lines or Parquet file with a 'prompt' field")
    ws.input_ref("reward_model")  # a ConfigError naming the missing input, before anything is loaded
    world = distributed.init(always_group=settings.distributed.zero_stage > 0)
    try:
        return train(ws, settings, world)
    finally:
        distributed.shutdown()


def train(ws: Workspace, settings: PPOSpec, world: distributed.World) -> dict[str, Any]:
    rows = load_dataset_rows(settings.prompts, ws)  # type: ignore[arg-type]
    require_fields(rows, ("prompt",), settings.prompts.uri)  # type: ignore[union-attr]
    torch.manual_seed(settings.seed)  # LoRA initialisation, and embeddings grown for an added pad token
    models = load_models(ws.fetch_dir("policy"), ws.fetch_dir("reward_model"), ws.config.model, settings,
                         world.device)
    log = ProgressLog(ws, settings, ws.output_dir / METRICS, ws.output_dir / "tensorboard") if world.is_main else None
    trainer = PPOTrainer(settings, models, [r["prompt"] for r in rows], world,
                         use_chat_template=ws.config.model.tokenizer.use_chat_template,
                         judge=make_judge(settings.judge.type) if settings.judge else None, log=log)
    if settings.distributed.zero_stage == 3:
        print(sharding(trainer), flush=True)
    checkpoints = PPOCheckpoints(ws, world)
    checkpoints.restore(trainer)

    def on_sigterm(signum: int, frame: Any) -> None:
        print("SIGTERM: checkpointing at the next safe point, then stopping", flush=True)
        trainer.stop_requested = True

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        history = trainer.train(checkpoint=checkpoints.save)
    except Stopped as stop:
        raise Preempted(f"{stop}; checkpoint stored") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    save_policy(trainer, ws.output_dir, merge=not settings.lora.enabled or settings.merge_lora,
                base_uri=ws.input_ref("policy").uri, base_dir=ws.fetch_dir("policy"), spec=ws.config.model)
    last = history[-1]
    metrics: dict[str, Any] = {short: round(last[key], 4) for key, short in HEADLINE.items() if key in last}
    metrics.update(steps=trainer.step, episodes=trainer.step * settings.batch_size)
    metrics.update({metric_keys.guardrail(name): int(name in trainer.guardrails.fired)
                    for name in metric_keys.GUARDRAILS})
    return metrics


def sharding(trainer: PPOTrainer) -> str:
    """What this process holds of each model under ZeRO-3, e.g. ``policy 67.6M of 135M``."""
    models = trainer.models
    held = {"policy": trainer.policy.module, "value": trainer.value.module, "reference": models.reference,
            "reward": models.reward}
    parts = [f"{role} {h / 1e6:.1f}M of {t / 1e6:.1f}M" for role, net in held.items() if net is not None
             for h, t in [held_parameters(net)]]
    return f"ppo: ZeRO-3, process {trainer.world.rank} of {trainer.world.size} holds " + ", ".join(parts)


class ProgressLog(MetricsLog):
    """The metrics log that also publishes each step's headline metrics as the stage's live progress."""

    def __init__(self, ws: Workspace, settings: PPOSpec, *args: Any) -> None:
        super().__init__(*args)
        self.ws = ws
        self.total_steps = settings.total_episodes // settings.batch_size

    def write(self, entry: dict[str, float]) -> None:
        super().write(entry)
        headline = {short: entry[key] for key, short in HEADLINE.items() if key in entry}
        progress.publish(self.ws, int(entry["step"]), self.total_steps, headline)


def save_policy(trainer: PPOTrainer, out: Path, *, merge: bool, base_uri: str, base_dir: Path,
                spec: ModelSpec) -> None:
    """Write the aligned policy to ``out``: a plain checkpoint (a LoRA adapter merged into pi_SFT's weights as
    stored in ``base_dir``), or the adapter alone (``merge`` false) with ``base_uri`` recorded as its base."""
    with trainer.policy.gathered():  # every process takes part in gathering ZeRO-3 shards; the main one writes
        if not trainer.world.is_main:
            return
        policy, tokenizer = trainer.policy.module, trainer.models.tokenizer
        if merge:
            if hasattr(policy, "peft_config"):
                policy = merged_policy(policy, base_dir, spec, tokenizer)
            save_plain(policy, tokenizer, out)
            return
        policy.peft_config["default"].base_model_name_or_path = base_uri
        policy.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
