"""What the SFT and reward stages share around a transformers/TRL Trainer.

* ``training_args``: the spec's TrainingArgs as TRL config keyword arguments.
* ``CheckpointsToStore``: mirrors every Trainer checkpoint to the store and points ``checkpoints/latest.json`` at
  it (:mod:`rlhf_trainer.checkpoints`), so a new attempt (another pod, a rerun) resumes from it.
* ``StopOnSigterm``: on SIGTERM (preemption, pod deletion) the Trainer saves a checkpoint at the end of the
  current step and stops; the CLI then exits with a retryable code.
* ``NoCheckpointAfterLastStep``: no checkpoint of the finished run (the stage publishes its output next).
* ``JsonlLog``: the Trainer's log history as ``trainer_log.jsonl`` in the output, for curves.
* ``seed_before_loading``: the stage's seed set before its model is created.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rlhf_api.spec import TrainingArgs
from rlhf_trainer import progress
from rlhf_trainer.checkpoints import StageCheckpoints
from rlhf_trainer.errors import Preempted
from rlhf_trainer.workspace import Workspace


def seed_before_loading(seed: int) -> None:
    """Seed Python, NumPy and torch before a stage creates its model, so that the weights it initialises at
    random (embedding rows for an added pad token) are the same in every run of the same spec. The Trainer seeds
    again before training (data order, dropout, LoRA adapters)."""
    from transformers import set_seed

    set_seed(seed)


def training_args(settings: TrainingArgs, checkpoints_dir: Path, bf16: bool) -> dict[str, Any]:
    """Keyword arguments of TRL's SFTConfig and RewardConfig; the Trainer saves its checkpoints in ``checkpoints_dir``
    and trains under bfloat16 autocast when ``bf16`` (the stage's :func:`rlhf_trainer.models.bf16_enabled`).

    Detail: TRL's configs default to gradient checkpointing (one more forward pass per step); the spec's
    ``gradientCheckpointing`` (default off) decides, under transformers 5's name for it.
    """
    return dict(
        output_dir=str(checkpoints_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        max_length=settings.max_length,
        activation_checkpointing=settings.gradient_checkpointing,
        seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        report_to=[],
        disable_tqdm=False,
        dataloader_num_workers=0,
        use_cpu=not _cuda(),
        bf16=bf16,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class CheckpointsToStore(TrainerCallback):
    """Publish each checkpoint the Trainer saves to the store (with its own manifest), then point latest.json at
    it."""

    def __init__(self, ws: Workspace) -> None:
        self.checkpoints = StageCheckpoints(ws)

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"  # the Trainer's own folder name
        if not state.is_world_process_zero or not local.is_dir():
            return
        self.checkpoints.publish(local, state.global_step)
        self.checkpoints.point_to(state.global_step)


def restore_checkpoint(ws: Workspace) -> str | None:
    """Download the latest stored checkpoint of this stage (made with this config) and return its local path."""
    checkpoints = StageCheckpoints(ws)
    pointer = checkpoints.latest()
    local = ws.checkpoints_dir / pointer.checkpoint if pointer else None
    if pointer is None or not checkpoints.fetch(pointer, local):
        return None  # none, or made with other settings: start over
    print(f"resuming {ws.config.stage.value} from {checkpoints.describe(pointer)}", flush=True)
    return str(local)


class NoCheckpointAfterLastStep(TrainerCallback):
    """Skip the checkpoint the Trainer writes after its last step (``save_strategy="steps"`` saves at the end).

    The stage publishes its output seconds later and then deletes its checkpoints, so that one would be written
    and stored for nothing: model, optimizer and RNG states, seconds of work even for the demo model (figures:
    docs/measurements.md, "Memory and checkpoint costs"). A SIGTERM
    during the last step still checkpoints (:class:`StopOnSigterm` runs after this callback).
    """

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = False


class StopOnSigterm(TrainerCallback):
    """Turn SIGTERM into 'save a checkpoint at the end of this step, then stop'."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        print("SIGTERM: saving a checkpoint at the end of this step, then stopping", flush=True)
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


#: Trainer log keys published as live progress (TRL's reward trainer logs accuracy and margin per batch)
PROGRESS_KEYS = ("loss", "learning_rate", "accuracy", "margin", "mean_token_accuracy", "epoch")


class JsonlLog(TrainerCallback):
    """Append every Trainer log entry to a JSON Lines file, and publish it as the stage's live progress."""

    def __init__(self, path: Path, ws: Workspace | None = None) -> None:
        self.path = path
        self.ws = ws

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **_: Any) -> None:
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")
            if self.ws is not None:
                numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k in PROGRESS_KEYS}
                if set(numbers) - {"epoch"}:  # not the closing summary line, which would hide the last loss
                    progress.publish(self.ws, state.global_step, state.max_steps, numbers)


def stage_callbacks(ws: Workspace, stopper: StopOnSigterm, log: Path) -> list[TrainerCallback]:
    """A stage's Trainer callbacks in the order they must run: each sees the controls the ones before it set."""
    return [CheckpointsToStore(ws), NoCheckpointAfterLastStep(), stopper, JsonlLog(log, ws)]


def train_with_resume(trainer: Any, ws: Workspace, stopper: StopOnSigterm) -> Any:
    """Run ``trainer.train``, resuming from a stored checkpoint when there is one; raise Preempted on SIGTERM."""
    result = trainer.train(resume_from_checkpoint=restore_checkpoint(ws))
    if stopper.requested:
        raise Preempted("stopped on SIGTERM after checkpointing")
    return result


def last_logged(log_path: Path, key: str) -> float | None:
    """The last value of ``key`` in a trainer_log.jsonl."""
    value = None
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            entry = json.loads(line)
            if key in entry:
                value = float(entry[key])
    return value
