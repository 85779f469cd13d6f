"""The weights a model decodes with: LoRA adapters folded in, and on x86 CPUs pre-packed for oneDNN.

Decoding runs every linear layer once per token over a handful of rows (a PPO step's rollouts, the answers an
evaluation is still writing): each product reads its whole weight for little arithmetic, so how the weight is
laid out and how many operations surround it set the time. Inside :func:`decoding_weights` each linear layer
computes from a copy of its weight made once for the decoding that follows:

- **Packed for oneDNN** (x86 CPUs, float32 and bfloat16): the copy is reordered into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``), which its small-batch kernels read faster than a plain
  row-major weight: decoding is bound by reading weights, so the layout sets its speed (figures:
  docs/measurements.md, "Decoding from packed weights").
- **LoRA adapters folded in**: peft computes a LoRA layer as ``base(x) + B(A(dropout(x))) * scaling``: three
  matrix products and a few more operations instead of one. In training that is the point (only A and B get
  gradients); in decoding the extra operations are small but many (five per layer and token) and slow sampling
  down. Folding ``W + scaling * B @ A`` once per rollout into the copy takes that out: the adapted model then
  decodes about as fast as the model without adapters (figures: docs/measurements.md, "LoRA folded or stacked
  for decoding").

  Under bfloat16 autocast over a bfloat16 frozen base (``spec.ppo.bf16``) a folded weight would not compute what
  the update's forward pass computes (peft's sum, in bfloat16): rounding ``W + scaling * B @ A`` to bfloat16
  moves each weight to a neighbour on the bfloat16 grid or leaves it where it was, so the sampled
  log-probabilities would drift from those the update's probability ratio starts from. There the copy stacks A
  under W instead: one product gives ``x W^T`` and ``x A^T`` together and a second applies B, in the dtype
  autocast computes in, so the result is peft's with two products instead of three and none of its casts
  (same tokens, faster; figures: docs/measurements.md, "LoRA folded or stacked for decoding").

The copies cost the linear layers' weights once more while decoding (freed after; under ZeRO-3 they are made from
the gathered weights, a whole copy in every process). Their products sum in another order than the model's own,
so outputs agree to float rounding, as cached decoding already does with a full forward pass. The model's own
weights are never touched: merging adapters into them and unmerging after would not restore the frozen base
exactly in floating point, and the frozen base is also the reference model. Where gradients flow, every layer
takes its own path.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_trainer.accelerations.onednn_linear import onednn_product

Product = Callable[[torch.Tensor], torch.Tensor]


@cache
def onednn_packs_here() -> bool:
    """Whether this PyTorch build packs weights for oneDNN: an x86 build with oneDNN (PyPI's wheels are)."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def _packs(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """A 2-D CPU weight of the dtype its products compute in, float32 or bfloat16 (where oneDNN computes it)."""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype == dtype and onednn_packs_here()
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


def product(weight: torch.Tensor, bias: torch.Tensor | None, *, rows: int,
            autocast_dtype: torch.dtype | None) -> Product:
    """``x -> x W^T + b`` for decoding: from a copy packed for oneDNN where it packs, else ``F.linear``.

    Args:
        weight: (out, in); a snapshot when packed, so it must not be trained while the product is in use.
        bias: (out,) or None.
        rows: how many rows a call will multiply (the decoding batch): oneDNN picks its layout for it.
        autocast_dtype: the dtype autocast computes in around the calls, or None without autocast; a packed
            product computes in it as autocast would (inputs cast, output in that dtype). Without autocast the
            inputs must have the weight's dtype, as for ``F.linear``.
    """
    dtype = autocast_dtype or weight.dtype
    if not _packs(weight, dtype):
        return lambda x: F.linear(x, weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    bias = None if bias is None else bias.detach().to(dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x if autocast_dtype is None else x.to(dtype)
        return onednn_product(x, packed, bias)

    return forward


def _lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer (it wraps its ``base_layer``)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _plain_lora(module: nn.Module) -> bool:
    """A peft LoRA layer over an ``nn.Linear`` with plain adapters (no DoRA or other variant, no bias on B),
    adapters on."""
    return (_lora_layer(module) and isinstance(module.base_layer, nn.Linear) and hasattr(module, "get_delta_weight")
            and not getattr(module, "fan_in_fan_out", False) and not getattr(module, "lora_variant", None)
            and not module.disable_adapters and not module.merged
            and all(module.lora_B[name].bias is None for name in _adapters(module)))


def _adapters(module: Any) -> list[str]:
    return [name for name in module.active_adapters if name in module.lora_A.keys()]


def _plain_forward(module: nn.Linear, rows: int, autocast_dtype: torch.dtype | None) -> Product:
    """``x W^T + b`` from the layer's own weight."""
    return product(module.weight, module.bias, rows=rows, autocast_dtype=autocast_dtype)


def _folded_forward(module: Any, rows: int, autocast_dtype: torch.dtype | None) -> Product:
    """``x W'^T + b`` with ``W' = W + sum of scaling * B @ A``, in the base weight's float32."""
    weight = module.base_layer.weight.detach().clone()
    for name in _adapters(module):
        weight += module.get_delta_weight(name)
    return product(weight, module.base_layer.bias, rows=rows, autocast_dtype=autocast_dtype)


def _stacked_forward(module: Any, rows: int, autocast_dtype: torch.dtype | None) -> Product:
    """``x W^T + b + sum of scaling * (x A^T) B^T`` with the A matrices stacked under W: two products."""
    base = module.base_layer.weight
    names = _adapters(module)
    stacked = product(torch.cat([base.detach()] + [module.lora_A[n].weight.detach().to(base.dtype) for n in names]),
                      None, rows=rows, autocast_dtype=autocast_dtype)
    ups = [(module.lora_B[n].weight.detach().to(base.dtype), module.scaling[n]) for n in names]
    splits = [base.shape[0]] + [module.lora_A[n].weight.shape[0] for n in names]
    bias = module.base_layer.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        out, *downs = stacked(x).split(splits, dim=-1)
        out = out if bias is None else out + bias
        for down, (up, scaling) in zip(downs, ups):
            out = out + F.linear(down, up) * scaling
        return out

    return forward


def _without_autograd(own: Any, decoding: Product) -> Any:
    """``decoding`` for sampling; the layer's own forward where gradients flow (or for calls with more arguments)."""
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or torch.is_grad_enabled():
            return own(x, *args, **kwargs)
        return decoding(x)

    return forward


def _decoding(module: nn.Module, autocast_dtype: torch.dtype | None) -> Any:
    """How ``module`` computes inside :func:`decoding_weights`: a forward-maker, or None to leave it as it is."""
    if isinstance(module, nn.Linear):
        return _plain_forward if _packs(module.weight, autocast_dtype or module.weight.dtype) else None
    if not _plain_lora(module):
        return None
    dtype = module.base_layer.weight.dtype
    if autocast_dtype is None and dtype == torch.float32:
        return _folded_forward
    if autocast_dtype == dtype:  # a half-precision base under autocast to its dtype
        return _stacked_forward
    return None  # e.g. a float32 base under autocast: folding would cast the copy at every token


@contextmanager
def decoding_weights(model: nn.Module, *, rows: int) -> Iterator[None]:
    """Inside the context, each linear layer of ``model`` computes from a copy of its weights made for decoding.

    A LoRA layer folds its adapters in (a float32 base) or stacks A under W (a bfloat16 or float16 base under
    autocast to its dtype); on an x86 CPU the copy is packed for oneDNN, and so is each plain ``nn.Linear``'s
    (the LM head, the layers of a model without adapters). ``rows``: the decoding batch. For sampling only: the
    copies are a snapshot (nothing may train the model or switch adapters on or off inside the context), and
    with autograd on every layer takes its own path. A LoRA layer with adapters off, or with a float32 base
    under autocast, takes peft's path (its base layer unpacked).
    """
    autocast_dtype = next((torch.get_autocast_dtype(device) for device in ("cpu", "cuda")
                           if torch.is_autocast_enabled(device)), None)
    inside_lora = {id(sub) for m in model.modules() if _lora_layer(m) for sub in m.modules() if sub is not m}
    layers = [(m, make) for m in model.modules()
              if id(m) not in inside_lora and (make := _decoding(m, autocast_dtype)) is not None]
    try:
        with torch.no_grad():
            for layer, make in layers:
                # shadows the method; the class's own stays reachable for the autograd path
                layer.forward = _without_autograd(layer.forward, make(layer, rows, autocast_dtype))
        yield
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("forward", None)
