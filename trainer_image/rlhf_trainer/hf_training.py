"""What the SFT and reward stages share around a transformers/TRL Trainer.

* ``training_args``: the spec's TrainingArgs as TRL config keyword arguments; with ``zeroStage`` 1-3, the Trainer's
  DeepSpeed integration trains (:func:`rlhf_trainer.deepspeed_setup.trainer_config`).
* ``CheckpointsToStore``: mirrors every Trainer checkpoint to the store and points ``checkpoints/latest.json`` at
  it (:mod:`rlhf_trainer.checkpoints`), so a new attempt (another pod, a rerun) resumes from it. Several
  processes store a part each (``rank-<r>/``: what that process wrote), and the pointer names the checkpoint once
  every part is stored.
* ``StopOnSigterm``: on SIGTERM (preemption, pod deletion) the Trainer saves a checkpoint at the end of the
  current step and stops, every process at the same step; the CLI then exits with a retryable code.
* ``plain_trained_model``: after training under DeepSpeed, the model as a plain module holding all its weights.
* ``NoCheckpointAfterLastStep``: no checkpoint of the finished run (the stage publishes its output next).
* ``JsonlLog``: the Trainer's log history as ``trainer_log.jsonl`` in the output, for curves.
* ``seed_before_loading``: the stage's seed set before its model is created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rlhf_api.spec import TrainingArgs
from rlhf_trainer import deepspeed_setup, progress
from rlhf_trainer.checkpoints import StageCheckpoints
from rlhf_trainer.errors import Preempted
from rlhf_trainer.workspace import Workspace


def seed_before_loading(seed: int) -> None:
    """Seed Python, NumPy and torch before a stage creates its model, so that the weights it initialises at
    random (embedding rows for an added pad token) are the same in every run of the same spec. The Trainer seeds
    again before training (data order, dropout, LoRA adapters)."""
    from transformers import set_seed

    set_seed(seed)


def training_args(settings: TrainingArgs, checkpoints_dir: Path, bf16: bool, zero_stage: int = 0) -> dict[str, Any]:
    """Keyword arguments of TRL's SFTConfig and RewardConfig; the Trainer saves its checkpoints in ``checkpoints_dir``
    and trains under bfloat16 autocast when ``bf16`` (the stage's :func:`rlhf_trainer.models.bf16_enabled`), under
    DeepSpeed ZeRO when ``zero_stage`` is 1-3 (``spec.<stage>.distributed.zeroStage``).

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
        deepspeed=deepspeed_setup.trainer_config(zero_stage, bf16) if zero_stage else None,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


#: A file of a Trainer checkpoint that one process writes for itself: DeepSpeed's ZeRO shards of weights and
#: optimizer state (``[bf16_]zero_pp_rank_<r>_mp_rank_00_*.pt``) and the Trainer's RNG states (``rng_state_<r>.pth``).
#: Every other file (trainer state, DeepSpeed's ``latest``, gathered weights, scheduler) is the main process's.
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_)(\d+)[_.]")


def owner(name: str) -> int:
    """The process whose part of a multi-process checkpoint the file ``name`` belongs to."""
    match = RANK_FILE.search(name)
    return int(match.group(1)) if match else 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointsToStore(TrainerCallback):
    """Publish each checkpoint the Trainer saves to the store (with its own manifest), then point latest.json at
    it.

    With several processes each one publishes its part, ``rank-<r>/``: the files it wrote itself (:data:`RANK_FILE`;
    the main process, every other file too). Processes that share a disk (the local runner) see one folder
    holding every part; pods of an Indexed Job each see only what they wrote. Once every part is stored (a
    barrier), the main process moves the pointer.
    """

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.checkpoints = StageCheckpoints(ws)

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"  # the Trainer's own folder name
        if args.world_size == 1:
            if local.is_dir():
                self.checkpoints.publish(local, state.global_step)
                self.checkpoints.point_to(state.global_step)
            return
        rank, part = args.process_index, f"rank-{args.process_index}"
        staged = self.ws.checkpoints_dir / "parts" / part
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for path in sorted(local.rglob("*")) if local.is_dir() else []:
            if path.is_file() and owner(path.name) == rank:
                target = staged / path.relative_to(local)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)  # the same disk: a second name, not a copy
        self.checkpoints.publish(staged, state.global_step, part)
        shutil.rmtree(staged, ignore_errors=True)
        barrier()  # every part is in the store before the pointer names the checkpoint
        if rank == 0:
            self.checkpoints.point_to(state.global_step, processes=args.world_size)


def restore_checkpoint(ws: Workspace, processes: int = 1, rank: int = 0) -> str | None:
    """Download the latest stored checkpoint of this stage (made with this config, by as many processes) and
    return its local path: the main process's part and, with several processes, this process's own."""
    checkpoints = StageCheckpoints(ws)
    pointer = checkpoints.latest(processes)
    if pointer is None:
        return None
    if processes == 1:
        local = ws.checkpoints_dir / pointer.checkpoint
        found = checkpoints.fetch(pointer, local)
    else:  # a folder of its own: processes on one disk would otherwise resume from each other's downloads
        local = ws.checkpoints_dir / "restored" / f"rank-{rank}" / pointer.checkpoint
        found = all([checkpoints.fetch(pointer, local, f"rank-{part}") for part in sorted({0, rank})])
    if not found:
        return None  # a part without its manifest: start over
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
    """Turn SIGTERM into 'save a checkpoint at the end of this step, then stop'.

    With several processes the signal reaches each at its own time (pods of a Job, or only one process), and
    saving is a collective under ZeRO, so the processes agree at each step's end (one all-reduce of a flag):
    all of them save and stop at the first step that ends after any one of them was signalled.
    """

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        print("SIGTERM: saving a checkpoint at the end of this step, then stopping", flush=True)
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if args.world_size > 1:
            self.requested = any_process(self.requested)
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    total = torch.tensor([float(flag)])
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return bool(total.item() > 0)


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
    checkpoint = restore_checkpoint(ws, trainer.args.world_size, trainer.args.process_index)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.requested:
        raise Preempted("stopped on SIGTERM after checkpointing")
    return result


def plain_trained_model(trainer: Any) -> Any:
    """The trained model as a plain module on every process, after ``trainer.train``: without DeepSpeed, the
    Trainer's model as it is. Under DeepSpeed, each parameter gets its whole float32 value (the optimizer's master
    weights where it trains the parameter; the gathered weights otherwise) and the engine's ZeRO-3 hooks are
    removed, so that what follows (merging LoRA, scoring, rescaling a head, saving) sees ordinary tensors, not the
    empty placeholders of shape [0] that ZeRO-3 leaves in the module. Every process must call it (the gathers are
    collectives)."""
    engine = getattr(trainer, "deepspeed", None)
    model = trainer.model
    if engine is None:
        return model
    from deepspeed.utils import safe_get_full_fp32_param

    named = list(model.named_parameters())
    with deepspeed_setup.gathered_weights(model):
        whole = {name: param.detach().clone() for name, param in named}
    for name, param in named:
        master = safe_get_full_fp32_param(param) if param.requires_grad else None  # a collective under ZeRO-3
        if master is not None:
            whole[name] = master.detach().clone()
    engine.destroy()  # ZeRO-3's hooks, which would gather and release weights around each module's forward
    for name, param in named:
        param.data = whole[name].float() if engine.bfloat16_enabled() else whole[name]
    return model


def last_logged(log_path: Path, key: str) -> float | None:
    """The last value of ``key`` in a trainer_log.jsonl."""
    value = None
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            entry = json.loads(line)
            if key in entry:
                value = float(entry[key])
    return value
