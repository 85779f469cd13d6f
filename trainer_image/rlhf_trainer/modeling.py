"""What the stages compute with a loaded model (:mod:`rlhf_trainer.models` loads them): the transformers model
inside its wrappers, autocast, token sequences laid out for a forward pass, and the log-probabilities of the
response tokens. PPO's rollouts and updates, the evaluate stage's KL and SFT's loss on CPU all go through here.

Only the response positions are computed where it costs: the LM head runs on the R positions that predict
response tokens, not on the prompt, and log-probabilities come from one fused ``log_softmax`` over them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_trainer.padding import left_pad, position_ids, right_pad


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bfloat16 autocast for forward passes when enabled (weights stay float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


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


# --------------------------------------------------------------------------------- token sequences


@dataclass
class Sequences:
    """Prompts and responses, laid out as the forward passes (:func:`response_logits`) read them."""

    queries: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    responses: torch.Tensor  # (B, R) response ids, padding after the stop token
    mask: torch.Tensor  # (B, R) bool, true on response tokens (the stop token included)

    def input_ids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + response as one left-padded sequence.

        Returns:
            input_ids (B, P + R), attention_mask (B, P + R), position_ids (B, P + R).
        """
        ids = torch.cat([self.queries, self.responses], dim=1)
        attention = torch.cat([self.query_mask, self.mask.to(self.query_mask.dtype)], dim=1)
        return ids, attention, position_ids(attention)


def sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
              device: torch.device | str = "cpu") -> Sequences:
    """Token lists as :class:`Sequences` on ``device``: prompts left-padded, responses right-padded."""
    queries, query_mask = left_pad(prompts, pad_token_id)
    ids, mask = right_pad(responses, pad_token_id)
    return Sequences(*(t.to(device) for t in (queries, query_mask, ids, mask.bool())))


# ------------------------------------------------------------------------------ log-probs and entropy


def logit_scale(temperature: float) -> float:
    """What sampling at ``temperature`` divides the logits by: the temperature, or 1 for greedy decoding (0)."""
    return temperature if temperature > 0 else 1.0


def response_logits(policy: Any, batch: Sequences, temperature: float) -> torch.Tensor:
    """Next-token logits at each response position, divided by the sampling temperature.

    Detail: the logits come from the model's own forward pass, so whatever its family does to the LM head's output
    is done here too (Gemma-2's final soft-capping, Granite's logits scaling, Cohere's logit scale): PPO's ratios
    and KL are those of the distribution the model samples from. The log-probabilities PPO uses are those of the
    distribution the tokens were sampled from, so the logits are divided by the same temperature (1 for greedy
    decoding), after any such transform.

    Detail: the LM head runs on the R positions that predict response tokens, not the prompt, picked by an index
    tensor: a contiguous copy of them. On a strided slice (what an integer ``logits_to_keep`` hands the head)
    ``matmul`` cannot fold the batch into one matrix product and, under autograd, broadcasts the (V, H) head to
    (B, H, V) for its gradient: a copy of B times the LM head's size per update (figures: docs/measurements.md,
    "Memory and checkpoint costs").

    Returns:
        (B, R, V) float32.
    """
    ids, attention, positions = batch.input_ids()
    width = batch.responses.shape[1]
    keep = torch.arange(ids.shape[1] - width - 1, ids.shape[1] - 1, device=ids.device)
    logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                    logits_to_keep=keep).logits.float()
    scale = logit_scale(temperature)
    return logits if scale == 1.0 else logits / scale


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


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits)[token] at each position, and optionally the entropy of each position's distribution.

    One ``log_softmax`` serves both: the entropy is read from the same (B, R, V) log-probabilities, without
    gradient (it is a diagnostic, not part of the loss).

    Args:
        logits: (B, R, V), already divided by the sampling temperature.
        tokens: (B, R) token ids.

    Returns:
        logprobs (B, R) float32; entropy (B, R) or None.
    """
    logprobs_all = torch.log_softmax(logits.float(), dim=-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logprobs(logprobs_all)
    return gather_tokens(logprobs_all, tokens), entropy


def gather_tokens(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-probability of each position's token from (B, R, V) log-probabilities.

    Detail: ``log_softmax`` followed by this gather is one fused pass over the (B, R, V) logits forward and one
    backward; ``logit[token] - logsumexp(logits)`` looks cheaper but makes four passes (max, subtract, exp,
    sum), two of them writing a fresh (B, R, V) tensor, and more again in its backward pass.
    """
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, ``-sum(p * log p)``, from its log-probabilities.

    Args:
        logprobs: (B, R, V) log-softmax output.

    Returns:
        (B, R).
    """
    # A batched dot product per position: no (B, R, V) product tensor.
    flat = logprobs.reshape(-1, 1, logprobs.shape[-1])
    return -torch.bmm(flat.exp(), flat.transpose(1, 2)).reshape(logprobs.shape[:-1])
