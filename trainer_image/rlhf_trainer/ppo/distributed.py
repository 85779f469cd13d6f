"""Processes: one, several under ``torchrun``/``deepspeed``, or Indexed-Job pods with plain variables.

Every launcher ends up setting the same four variables: ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and
``RANK`` (``LOCAL_RANK`` too when several processes share a node). With ``WORLD_SIZE`` above 1,
:func:`init` joins the process group: gloo on CPU, nccl on CUDA. Each process rolls out its own share of
every batch; statistics that must describe the whole batch (whitening, loss normalisation, logged metrics)
are summed over processes with :meth:`World.all_sum`.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rlhf_trainer.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (a new tensor; the input is unchanged)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one (so all of them stop together)."""
        if not self.distributed:
            return flag
        return bool(self.all_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init(*, always_group: bool = False, timeout_s: int = 1800) -> World:
    """Join the process group described by the environment (or run alone) and return this process's place.

    Args:
        always_group: form a process group even for a single process (DeepSpeed needs one; it would otherwise
            look for MPI).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for name, value in (("RANK", rank), ("WORLD_SIZE", size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))  # DeepSpeed reads them; plain MASTER_*/RANK launches may lack some
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():  # NCCL would fail later with "Duplicate GPU detected"
            raise ConfigError(
                f"LOCAL_RANK={local_rank}, but this node has {torch.cuda.device_count()} GPU(s): NCCL needs a GPU "
                "of its own for each process. Start at most one process per GPU on a node (torchrun "
                "--nproc-per-node; on a cluster each PPO pod is one process: give it a GPU with "
                "spec.ppo.resources.limits nvidia.com/gpu: 1)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if (size > 1 or always_group) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if size == 1:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=timeout_s),
            # NCCL binds the group to this process's GPU (else each barrier() warns that it guesses the device)
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown() -> None:
    """Leave the process group (call once at exit, on every path).

    The trainer's DeepSpeed engines are reference cycles that may still hold gloo work objects; collected while the
    interpreter is whole, not during its finalization (where destroying their tensors can abort the process after
    it has finished its work: "terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
