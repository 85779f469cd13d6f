"""Forward passes over a batch of rollouts: log-probabilities of the responses, and values.

Only the response positions are computed where it costs: the LM head runs on the R positions that predict
response tokens, not on the prompt, and log-probabilities come from one fused ``log_softmax`` over them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from rlhf_trainer.generation import logit_scale
from rlhf_trainer.ppo.experience import Sequences
from rlhf_trainer.ppo.functional import logprobs_and_entropy


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bfloat16 autocast for forward passes when enabled (weights stay float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def causal_lm_parts(policy: Any) -> tuple[Any, Any]:
    """The transformer body and the LM head of a causal LM, inside a DeepSpeed engine or a peft model.

    Calling the parts keeps what wraps them in effect: LoRA layers live inside the body (and
    ``disable_adapter`` switches them), ZeRO-3 gathers parameters through hooks on every submodule.
    """
    inner = transformers_model(policy)
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def transformers_model(net: Any) -> Any:
    """The transformers model inside a DeepSpeed engine or a peft model (or ``net`` itself)."""
    inner = net.module if hasattr(net, "module") and hasattr(net, "backward") else net  # DeepSpeed
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft


@contextmanager
def attention_kernel(net: Any, implementation: str) -> Iterator[None]:
    """Run ``net`` with another attention implementation for the duration (e.g. "sdpa" to decode with).

    Detail: on CPU under bf16 the trained models use eager attention, whose backward pass is the faster one there
    (:func:`rlhf_trainer.models.load_causal_lm`); decoding is faster with SDPA, which neither repeats the
    grouped key/value cache for every head nor writes out the attention weights at each new token.
    """
    inner = transformers_model(net)
    before = getattr(inner.config, "_attn_implementation", None)
    if before in (None, implementation) or not hasattr(inner, "set_attn_implementation"):
        yield
        return
    inner.set_attn_implementation(implementation)
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


def response_logits(policy: Any, batch: Sequences, temperature: float) -> torch.Tensor:
    """Next-token logits at each response position, divided by the sampling temperature.

    Detail: the log-probabilities PPO uses are those of the distribution the tokens were sampled from, so the
    logits are scaled by the same temperature (1 for greedy decoding). The hidden states are divided before
    the (bias-free) LM head instead: the same logits, scaled in a tensor V/H times smaller.

    Detail: the LM head runs on the R positions that predict response tokens, not the prompt, and on a
    contiguous copy of them: on a strided slice (what ``logits_to_keep`` hands it) ``matmul`` cannot fold the
    batch into one matrix product and, under autograd, broadcasts the (V, H) head to (B, H, V) for its
    gradient (a 1.8 GB copy per update in the demo's configuration).

    Returns:
        (B, R, V) float32.
    """
    ids, attention, positions = batch.input_ids()
    width = batch.responses.shape[1]
    body, head = causal_lm_parts(policy)
    hidden = body(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).last_hidden_state
    hidden = hidden[:, -width - 1:-1]
    scale = logit_scale(temperature)
    if scale == 1.0:
        return head(hidden.contiguous()).float()
    if getattr(getattr(head, "base_layer", head), "bias", None) is None:  # peft wraps
        return head(hidden / scale).float()
    return head(hidden.contiguous()).float() / scale


def response_logprobs(policy: Any, batch: Sequences, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) for each response token (0 on padding), and optionally the entropy at each position.

    Returns:
        logprobs (B, R); entropy (B, R) without gradient, or None.
    """
    logprobs, entropy = logprobs_and_entropy(response_logits(policy, batch, temperature), batch.responses,
                                             with_entropy)
    logprobs = logprobs * batch.mask
    return logprobs, entropy


def response_values(value_model: Any, batch: Sequences) -> torch.Tensor:
    """V of the state before each response token (0 on padding).

    Returns:
        (B, R) float32.
    """
    ids, attention, positions = batch.input_ids()
    return value_model(ids, attention, positions, batch.responses.shape[1]) * batch.mask
