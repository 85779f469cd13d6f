"""Stage 1, SFT: fine-tune the base model on demonstrations (prompt, completion) with TRL's SFTTrainer.

Output: pi_SFT as a plain Hugging Face checkpoint (a LoRA adapter is merged into its base), with the
tokenizer (its pad token included), ``trainer_log.jsonl`` and headline metrics.
"""

from __future__ import annotations

from typing import Any

from rlhf_operator.spec import SFTSpec
from rlhf_trainer import hf_training, models
from rlhf_trainer.data import load_dataset_rows, require_fields
from rlhf_trainer.stages.common import conversational, uses_chat_template
from rlhf_trainer.workspace import Workspace


def run(ws: Workspace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    settings: SFTSpec = ws.config.stage_settings()  # type: ignore[assignment]
    assert settings.dataset is not None  # the spec requires it when the stage runs
    rows = load_dataset_rows(settings.dataset, ws)
    require_fields(rows, ("prompt", "completion"), settings.dataset.uri)

    base = ws.fetch_dir("model")
    tokenizer = models.load_tokenizer(base, ws.config.model)
    tokenizer.padding_side = "right"  # training pads on the right; generation stages pad on the left
    model = models.load_causal_lm(base, ws.config.model, tokenizer, trained=True)
    chat = uses_chat_template(tokenizer, ws.config.model.tokenizer.use_chat_template)
    train = Dataset.from_list(
        [conversational(chat, prompt=r["prompt"], completion=r["completion"]) for r in rows]
    )

    log = ws.output_dir / "trainer_log.jsonl"
    stopper = hf_training.StopOnSigterm()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **hf_training.training_args(settings, ws),
            completion_only_loss=settings.completion_only_loss,
            packing=False,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=models.lora_config(settings.lora, "CAUSAL_LM") if settings.lora.enabled else None,
        callbacks=[hf_training.StoreCheckpoints(ws), stopper, hf_training.JsonlLog(log, ws)],
    )
    result = hf_training.train_with_resume(trainer, ws, stopper)

    tokenizer.padding_side = ws.config.model.tokenizer.padding_side
    models.save_plain(trainer.model, tokenizer, ws.output_dir)
    return {
        "train_loss": round(float(result.training_loss), 4),
        "final_loss": hf_training.last_logged(log, "loss"),
        "mean_token_accuracy": hf_training.last_logged(log, "mean_token_accuracy"),
        "examples": len(rows),
        "steps": result.global_step,
    }
