"""DeepSpeed for every trained stage: imported set up for this machine, and configured for the Trainer stages.

PPO drives its own DeepSpeed engines (:mod:`rlhf_trainer.ppo.zero`, :mod:`rlhf_trainer.ppo.learner`); SFT and
reward hand the Trainer a config (:func:`trainer_config`) and let its DeepSpeed integration run the engine. Both
import DeepSpeed through :func:`import_deepspeed`, and the Trainer stages gather the trained weights with
:func:`gathered_weights`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlhf_trainer.models import set_deepspeed_accelerator


def import_deepspeed() -> Any:
    """DeepSpeed, set up for this machine: the CPU accelerator without a GPU, collectives through torch."""
    set_deepspeed_accelerator()
    import deepspeed
    import deepspeed.ops

    # DeepSpeed would compile its shared-memory collective kernels at start-up (minutes, and a compiler in the
    # image); the process group's own gloo/nccl collectives are what we use.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def trainer_config(zero_stage: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a Trainer stage (TrainingArguments' ``deepspeed``) for ZeRO ``zero_stage`` (1-3).

    Batch sizes, accumulation and clipping are "auto": the Trainer fills them from its own arguments, so they
    cannot disagree. Under ``bf16`` DeepSpeed's bf16 mode trains (bfloat16 weights in the model, float32 master
    weights in the optimizer). ``stage3_gather_16bit_weights_on_model_save``: the Trainer's checkpoints hold the
    whole model, gathered from the ZeRO-3 shards, as an ordinary Hugging Face checkpoint (the stage's own output
    is gathered by :func:`rlhf_trainer.hf_training.plain_trained_model`).
    """
    import_deepspeed()  # before the Trainer's arguments import DeepSpeed themselves
    lone_process_rendezvous()
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
            # A weight is released as soon as the module that gathered it is done. With any reuse distance, ZeRO-3
            # scans the rest of the step's module trace each time it releases a module's weights: a cost that
            # grows with the square of the number of modules (LoRA triples them) and dominated each step on CPUs
            # (figures: docs/measurements.md, "ZeRO-3 in the Trainer stages").
            "stage3_max_reuse_distance": 0,
        },
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own needs compiled kernels
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lone_process_rendezvous() -> None:
    """DeepSpeed needs a process group even for one process, and without a launcher's variables it looks for MPI:
    give a process started alone (``nodes x procsPerNode`` = 1) what a launcher would set, on a free loopback
    port."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


@contextmanager
def gathered_weights(model: Any) -> Iterator[None]:
    """Every parameter of ``model`` whole on every process for the duration, when ZeRO-3 has partitioned them
    (each process holds an empty placeholder of shape [0] and its shard); otherwise nothing to do. Every process
    must enter it: the gather is a collective."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield
