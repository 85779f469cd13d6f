"""Float32 linear layers through oneDNN, on CPUs where MKL leaves AVX-512 unused.

PyTorch's x86 wheels multiply float32 matrices with Intel MKL, which takes its AVX-512 kernels on Intel CPUs
only: on an AMD CPU it runs its AVX2 ones. oneDNN, which PyTorch ships too (its bfloat16 products run there),
chooses by instruction set: on an AMD CPU with AVX-512 its float32 products, and with them a whole PPO step, are
faster than MKL's (figures: docs/measurements.md, "oneDNN linear layers").

:func:`onednn_linear` sends ``torch.nn.functional.linear`` (every ``nn.Linear``: the transformer's projections,
the LM and score heads, peft's LoRA layers) through oneDNN for the duration: the forward product and both
products of the backward pass, for float32 CPU tensors outside autocast. Anything else (bfloat16, autocast,
CUDA, tensor subclasses, 1-D inputs) takes PyTorch's own path. The results agree with MKL's to float32
rounding (a few parts in a million: the products sum in another order) and are deterministic run to run.

:func:`onednn_preferred` says where to use it: a CPU with AVX-512 that is not Intel's (where MKL does take
AVX-512), unless ``RLHF_ONEDNN_LINEAR=0`` (or ``1``) says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rlhf_trainer.accelerations.cpu import cpu_flags, cpu_vendor
from rlhf_trainer.errors import ConfigError

ONEDNN_ENV = "RLHF_ONEDNN_LINEAR"  # "0" or "1": overrides what the CPU says


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in oneDNN (strided operands are read in place; ``weight`` may be plain or packed by
    ``torch.ops.mkldnn._reorder_linear_weight``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``linear`` whose forward and backward products all run in oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_product(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_product(grad, weight.t())  # dL/dx = g W
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_product(rows.t(), x.reshape(-1, x.shape[-1]).t())  # dL/dW = g^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (x.dim() >= 2 and weight.dim() == 2 and x.numel() > 0
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and (bias is None or bias.dim() == 1)
            and not torch.overrides.has_torch_function(tensors)
            and not torch.is_autocast_enabled("cpu"))


@contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[None]:
    """``torch.nn.functional.linear`` through oneDNN for float32 CPU tensors while the context is open."""
    if not enabled:
        yield
        return
    original = F.linear

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not _applies(input, weight, bias):
            return original(input, weight, bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
            return _OneDNNLinear.apply(input, weight, bias)
        return onednn_product(input, weight, bias)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original


@cache
def onednn_preferred() -> bool:
    """Whether float32 linear layers should run through oneDNN here (see the module's docstring)."""
    override = os.environ.get(ONEDNN_ENV, "").strip()
    if override:
        if override not in ("0", "1"):
            raise ConfigError(f"{ONEDNN_ENV}={override!r}: set it to 0 (PyTorch's MKL products) or 1 (oneDNN's), "
                              "or unset it")
        return override == "1"
    return (torch.backends.mkldnn.is_available() and "avx512f" in cpu_flags()
            and cpu_vendor() not in ("", "GenuineIntel"))
