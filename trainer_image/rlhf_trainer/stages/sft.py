"""Stage 1, SFT: fine-tune the base model on demonstrations (prompt, completion) with TRL's SFTTrainer.

Output: pi_SFT as a plain Hugging Face checkpoint (a LoRA adapter is merged into its base), with the
tokenizer (its pad token included), ``trainer_log.jsonl`` and headline metrics. Several processes train under
DistributedDataParallel, or under DeepSpeed ZeRO with ``distributed.zeroStage`` (the output is gathered from the
shards: :func:`rlhf_trainer.hf_training.plain_trained_model`).
"""

from __future__ import annotations

from typing import Any

from rlhf_api import metric_keys
from rlhf_api.spec import SFTSpec
from rlhf_trainer import hf_training, models
from rlhf_trainer.data import load_dataset_rows, require_fields
from rlhf_trainer.stages.common import conversational, uses_chat_template
from rlhf_trainer.workspace import Workspace


def run(ws: Workspace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    settings: SFTSpec = ws.config.stage_settings()  # type: ignore[assignment]
    assert settings.dataset is not None  # the spec requires it when the stage runs
    rows = load_dataset_rows(settings.dataset, ws)
    require_fields(rows, ("prompt", "completion"), settings.dataset.uri)

    base = ws.fetch_dir("model")
    tokenizer = models.load_tokenizer(base, ws.config.model)
    tokenizer.padding_side = "right"  # training pads on the right; generation stages pad on the left
    bf16 = models.bf16_enabled(settings.bf16, "spec.sft.bf16")
    hf_training.seed_before_loading(settings.seed)
    model = models.load_causal_lm(base, ws.config.model, tokenizer,
                                   trained_in_bf16=bf16)
    chat = uses_chat_template(tokenizer, ws.config.model.tokenizer.use_chat_template)
    train = Dataset.from_list(
        [conversational(chat, prompt=r["prompt"], completion=r["completion"]) for r in rows]
    )

    log = ws.output_dir / "trainer_log.jsonl"
    stopper = hf_training.StopOnSigterm()
    trainer_class = SFTTrainer if torch.cuda.is_available() else completion_logits_trainer(SFTTrainer)
    trainer = trainer_class(
        model=model,
        args=SFTConfig(
            **hf_training.training_args(settings, ws.checkpoints_dir, bf16, settings.distributed.zero_stage),
            completion_only_loss=settings.completion_only_loss,
            packing=False,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=models.lora_config(settings.lora, "CAUSAL_LM") if settings.lora.enabled else None,
        callbacks=hf_training.stage_callbacks(ws, stopper, log),
    )
    result = hf_training.train_with_resume(trainer, ws, stopper)
    trained = hf_training.plain_trained_model(trainer)  # every process: under ZeRO-3 the gathers are collectives

    tokenizer.padding_side = ws.config.model.tokenizer.padding_side
    if trainer.is_world_process_zero():  # the main process writes the output (and the CLI publishes it)
        models.save_plain(trained, tokenizer, ws.output_dir)
    return {
        "train_loss": round(float(result.training_loss), 4),
        metric_keys.FINAL_LOSS: hf_training.last_logged(log, "loss"),
        "mean_token_accuracy": hf_training.last_logged(log, "mean_token_accuracy"),
        "examples": len(rows),
        "steps": result.global_step,
    }


def completion_logits_trainer(sft_trainer: type) -> type:
    """SFTTrainer with the LM head over the scored tokens only, for CPUs.

    TRL's SFTTrainer computes the loss with a fused, chunked LM head that never builds the (batch, length,
    vocabulary) logits. Without Triton (on CPU) that head projects every position, padding and prompt included, in
    float32 even under bf16 autocast, which makes the pass slower. On CPU the model's own forward pass runs with
    ``logits_to_keep`` set to the positions whose next token is scored (the completion, with ``completionOnlyLoss``;
    no padding): about half of a demo sequence, and the LM head is a fifth of SmolLM2-135M's work per position. The
    loss is the model's own (cross-entropy in float32, summed and divided by the batch's scored tokens as
    transformers does), the token accuracy comes from the same logits (figures: docs/measurements.md, "SFT's LM
    head"). Under DistributedDataParallel, whose gradient synchronisation expects its own forward call, or where
    the Trainer computes the loss itself from the logits (label smoothing, a ``compute_loss_func``), the model's
    forward pass computes all the logits instead.
    """
    from transformers import Trainer
    from transformers.loss.loss_utils import fixed_cross_entropy
    from transformers.modeling_outputs import CausalLMOutput

    class CompletionLogitsSFTTrainer(sft_trainer):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            import torch

            targets: list[torch.Tensor] = []

            def scored_positions_only(labels: torch.Tensor, num_items_in_batch: Any = None,
                                      **model_inputs: Any) -> CausalLMOutput:
                labels = labels[:, 1:]
                scored = labels != -100
                keep = torch.cat([scored, torch.zeros_like(scored[:, :1])], dim=1)  # positions whose next token counts
                inputs_of_model = {k: model_inputs[k] for k in ("input_ids", "attention_mask", "position_ids")
                                   if k in model_inputs}
                with self.accelerator.autocast():  # the Trainer's autocast wraps the model's forward only
                    logits = model(**inputs_of_model, use_cache=False, logits_to_keep=keep).logits.float()
                targets.append(labels[scored])
                return CausalLMOutput(loss=fixed_cross_entropy(logits, labels[scored], num_items_in_batch),
                                      logits=logits)

            whole = (isinstance(model, torch.nn.parallel.DistributedDataParallel)
                     or self.label_smoother is not None or self.compute_loss_func is not None)
            loss, outputs = Trainer.compute_loss(self, model if whole else scored_positions_only, inputs,
                                                 return_outputs=True, num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                if whole:
                    labels = inputs["labels"][:, 1:]
                    predicted, expected = outputs.logits[:, :-1].argmax(-1)[labels != -100], labels[labels != -100]
                else:
                    predicted, expected = outputs.logits.argmax(-1), targets[0]
                accuracy = (predicted == expected).sum() / max(expected.numel(), 1)
            mode = "train" if model.training else "eval"
            self._metrics[mode]["mean_token_accuracy"].append(float(accuracy))
            return (loss, outputs) if return_outputs else loss

    return CompletionLogitsSFTTrainer
