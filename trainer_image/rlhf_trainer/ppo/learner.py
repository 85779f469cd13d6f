"""A trained model with its optimizer: plain PyTorch, or a DeepSpeed ZeRO engine (``zeroStage`` 1-3).

Both backends take the same calls, once per micro-batch ``backward(loss)`` and once per mini-batch
``step()``, where ``loss`` is this process's share of the mini-batch loss already divided by the number of
response tokens in the whole mini-batch (all micro-batches, all processes). Summing the gradients over
micro-batches and processes therefore gives exactly the gradient of the whole mini-batch's token mean, the
same as one process computing it alone.

Details: AdamW with epsilon 1e-5 (as CleanRL and OpenAI's lm-human-preferences); the learning rate annealed
over all optimizer steps of the run; gradients clipped to ``maxGradNorm`` after they are summed over processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_api.spec import PPOSpec
from rlhf_trainer.ppo.distributed import World
from rlhf_trainer.ppo.zero import engine_config, import_deepspeed

ADAM_EPS = 1e-5


def _scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_ratio: float, total_updates: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=int(warmup_ratio * total_updates),
                         num_training_steps=total_updates)


def adamw(params: list[torch.nn.Parameter], lr: float, eager_state: bool = False) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over parameters, gradients and moments; CPU and CUDA).

    ``eager_state``: allocate the moments now, as the first ``step()`` would (zeros, step 0), instead of in the
    middle of the first update. The run's peak memory is then reached in its first step, not its second (where
    the moments would first live beside the activations and gradients), and a process that cannot hold them fails
    before its first rollout (figures: docs/measurements.md, "Memory and checkpoint costs").
    """
    optimizer = torch.optim.AdamW(params, lr=lr, eps=ADAM_EPS, fused=True)
    if eager_state:
        for p in params:
            optimizer.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                      exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                      exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
    return optimizer


class TorchLearner:
    """Plain PyTorch: gradients summed over processes with one all-reduce per optimizer step.

    (What DistributedDataParallel does, minus its forward hooks: the reference and reward passes run through
    the same modules with adapters disabled, which DDP's bookkeeping does not expect.)
    """

    def __init__(self, module: nn.Module, *, lr: float, scheduler: str, warmup_ratio: float, total_updates: int,
                 max_grad_norm: float, world: World) -> None:
        self.module = module
        self.model = module  # what to call for a forward pass
        self.world = world
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        if world.distributed:  # identical starting weights everywhere (a LoRA adapter's init is random)
            for p in self.params:
                dist.broadcast(p.data, src=0)
        self.optimizer = adamw(self.params, lr, eager_state=True)
        self.scheduler = _scheduler(self.optimizer, scheduler, warmup_ratio, total_updates)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Sum gradients over processes, clip, update, anneal the LR. Returns the gradient norm before clipping."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.world.distributed:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g)
                offset += g.numel()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def gathered(self) -> AbstractContextManager:
        """Full parameters available locally (always the case without ZeRO-3)."""
        return nullcontext()

    def save(self, directory: Path, name: str) -> None:
        """Trained weights (the adapter alone under LoRA), optimizer and scheduler. Main process only."""
        if not self.world.is_main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in zip(self.names, self.params)},
                  str(directory / f"{name}.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / f"{name}.optimizer.pt")

    def load(self, directory: Path, name: str) -> None:
        weights = load_file(str(directory / f"{name}.safetensors"))
        if sorted(weights) != sorted(self.names):
            raise ValueError(f"checkpoint {directory} holds other {name} weights than this model trains")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(weights[n])
        state = torch.load(directory / f"{name}.optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedLearner:
    """A DeepSpeed ZeRO engine. Every process saves and loads its own shard of weights and optimizer state.

    Under bf16 DeepSpeed's own mixed precision (its ``bf16`` section): bfloat16 weights, gathers and gradient
    reductions, float32 master weights in the optimizer's partitions."""

    def __init__(self, module: nn.Module, *, lr: float, scheduler: str, warmup_ratio: float, total_updates: int,
                 max_grad_norm: float, world: World, zero_stage: int, micro_batch: int,
                 accumulation_steps: int, bf16: bool) -> None:
        deepspeed = import_deepspeed()
        self.world = world
        self.zero_stage = zero_stage
        self.accumulation_steps = accumulation_steps
        params = [p for p in module.parameters() if p.requires_grad]
        # the config the module was loaded with under ZeRO-3 (ppo.models), plus this engine's batch and clipping
        config = engine_config(zero_stage=zero_stage, hidden=model_hidden_size(module), bf16=bf16,
                               micro_batch=micro_batch, accumulation_steps=accumulation_steps,
                               max_grad_norm=max_grad_norm)
        self.model, _, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=adamw(params, lr),
            lr_scheduler=lambda opt: _scheduler(opt, scheduler, warmup_ratio, total_updates),
            config=config,
        )
        self.module = self.model.module

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by the accumulation steps and averages over processes; the loss is already a share
        # of the global token mean, so undo both.
        self.model.backward(loss * self.accumulation_steps * self.world.size)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # counts the micro-step; the optimizer steps only at the boundary (in step())

    def step(self) -> float:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Under ZeRO-3: every parameter gathered once for the duration (generation, saving), with the engine's
        per-module hooks off, so that the forward passes inside (one per decoded token) neither gather a weight
        again nor release it after each module: no collective runs inside, whatever each process decodes."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        offload = self.model.optimizer.parameter_offload
        # the root module's start-of-forward hook too: it checks that every process runs the same forward step
        start_of_forward = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            for hook in (offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks):
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:  # registered again in DeepSpeed's order: the start-of-forward hook first
                offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward)
                offload._register_deepspeed_module(offload.module)

    def save(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_checkpoint(str(directory), tag=name, save_latest=False)

    def load(self, directory: Path, name: str) -> None:
        path, _ = self.model.load_checkpoint(str(directory), tag=name)
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint {name} in {directory}")


Learner = TorchLearner | DeepSpeedLearner


def model_hidden_size(module: nn.Module) -> int:
    """The hidden size in the config of the (first) transformers model inside ``module``."""
    for inner in module.modules():
        size = getattr(getattr(inner, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    raise ValueError(f"{type(module).__name__} holds no transformers model with a hidden_size in its config")


def make_learner(module: nn.Module, *, lr: float, settings: PPOSpec, total_updates: int, micro_batch: int,
                 world: World, bf16: bool) -> Learner:
    """The learner ``settings.distributed.zeroStage`` asks for: plain PyTorch for 0, DeepSpeed for 1-3."""
    common: dict[str, Any] = dict(lr=lr, scheduler=settings.lr_scheduler_type, warmup_ratio=settings.warmup_ratio,
                                  total_updates=total_updates, max_grad_norm=settings.max_grad_norm, world=world)
    if settings.distributed.zero_stage == 0:
        return TorchLearner(module, **common)
    return DeepSpeedLearner(module, **common, zero_stage=settings.distributed.zero_stage, micro_batch=micro_batch,
                            accumulation_steps=settings.gradient_accumulation_steps, bf16=bf16)
