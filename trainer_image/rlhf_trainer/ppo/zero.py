"""DeepSpeed ZeRO for PPO's models: one config for loading and for the engines, sharded loading, frozen models as
ZeRO-3 inference engines.

Under ZeRO-3 no process holds a whole model outside a rollout (which gathers the policy once): the trained models
(policy, value) are created under ``deepspeed.zero.Init`` (transformers does so while an ``HfDeepSpeedConfig`` is
alive) and loaded layer by layer, each process keeping its 1/N of every weight; the frozen reference and reward
models are loaded the same way and run as DeepSpeed engines without an optimizer, gathering each layer's weights for
its forward pass and releasing them after, as DeepSpeed-Chat and OpenRLHF run theirs. Under LoRA the frozen models
are the trained ones with their adapters disabled, so one sharded base serves both.

The sizes are those transformers' Trainer fills in for ``"auto"`` from the model's hidden size: gradients reduced
in buckets of hidden^2 elements, the next layers' weights fetched ahead in 0.9 hidden^2, and tensors under
10 hidden elements (norms, biases) kept whole on every process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from rlhf_trainer.deepspeed_setup import import_deepspeed


def hidden_size(checkpoint: Path) -> int:
    """The model's hidden size, from its config (what the ZeRO bucket sizes scale with)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    config = getattr(config, "text_config", None) or config
    for name in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"{checkpoint}: its config names no hidden size (hidden_size, d_model or n_embd)")


def engine_config(*, zero_stage: int, hidden: int, bf16: bool, micro_batch: int = 1, accumulation_steps: int = 1,
                  max_grad_norm: float = 0.0) -> dict[str, Any]:
    """The DeepSpeed config of one model: the same when it is loaded (zero.Init) and when its engine starts.

    ``bf16``: weights, gathers and gradient reductions in bfloat16; a trained model's optimizer keeps float32 master
    weights (DeepSpeed's ``bf16`` section).
    """
    zero: dict[str, Any] = {"stage": zero_stage, "reduce_bucket_size": hidden * hidden}
    if zero_stage == 3:
        # a weight released as soon as its module is done: any reuse distance makes ZeRO-3 scan the rest of the
        # step's module trace at each release (see rlhf_trainer.deepspeed_setup)
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden, stage3_max_reuse_distance=0)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own needs compiled kernels
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextmanager
def sharded_loading(config: dict[str, Any] | None) -> Iterator[None]:
    """Models created inside are partitioned as they are created (``deepspeed.zero.Init``), their checkpoint
    weights loaded into each process's shard; ``config`` None: loaded whole, as without ZeRO-3."""
    if config is None or config["zero_optimization"]["stage"] != 3:
        yield
        return
    import_deepspeed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    active = HfDeepSpeedConfig(config)  # transformers reads it through a weak reference: keep it alive
    try:
        yield
    finally:
        del active
        unset_hf_deepspeed_config()


def inference_engine(module: nn.Module, config: dict[str, Any]) -> Any:
    """A frozen model as a DeepSpeed engine without an optimizer: under ZeRO-3 its weights stay partitioned and
    each forward pass gathers a layer's weights just for that layer. Call ``engine.module`` (the hooks are on it)."""
    deepspeed = import_deepspeed()
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (this process holds a shard; the full shape is ``ds_shape``)."""
    return hasattr(param, "ds_id")


def held_parameters(module: nn.Module) -> tuple[int, int]:
    """(elements of ``module``'s parameters this process holds, elements of the whole model): under ZeRO-3 a
    partitioned parameter holds its shard (``ds_tensor``), any other parameter all of itself."""
    held = total = 0
    for param in module.parameters():
        if is_partitioned(param):
            held, total = held + param.ds_tensor.numel(), total + param.ds_numel
        else:
            held, total = held + param.numel(), total + param.numel()
    return held, total
