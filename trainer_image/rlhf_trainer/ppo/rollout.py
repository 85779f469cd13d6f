"""Rollouts: prompts in, sampled responses out (batched, left-padded, KV cache, no autograd).

Detail: sampling runs under ``torch.no_grad``, not ``torch.inference_mode``: under bfloat16 autocast only the
former lets autocast cast each float32 weight once per rollout instead of once per token (measured on CPU:
78 ms per token instead of 129 for the demo model, batch 8).

Each episode (one prompt of one step) samples from its own random generator, seeded by the run's seed and
the episode's global index. A response therefore depends on the seed, the weights and the prompt only, not on
which process sampled it or what else was in its batch: one process and several give the same rollouts, and a
resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rlhf_operator.spec import GenerationSpec
from rlhf_trainer.generation import eval_mode, format_prompt, logit_scale
from rlhf_trainer.padding import position_ids
from rlhf_trainer.ppo.seeding import generator


def encode_prompts(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids the policy is conditioned on: the chat template's user turn and assistant header."""
    texts = [format_prompt(tokenizer, p, use_chat_template) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def episode_generators(seed: int, episodes: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One random generator per episode, seeded from (seed, global episode index)."""
    return [generator(seed, "episode", int(e), device=device) for e in episodes]


class BF16Sampler:
    """A bfloat16 copy of a fully trained policy to sample from under bf16, refreshed before each rollout.

    Detail: decoding one token reads every weight; under autocast it also casts them and pays autocast's
    per-operation dispatch, so sampling from float32 master weights is slower than from a bfloat16 copy
    (measured on CPU, demo model, 16 rollouts: 82 ms per token from the copy with SDPA attention, 120-145 ms
    under autocast). The copy costs half the policy's memory and one cast per step (about 60 ms). The
    log-probabilities it records are those of the bf16-rounded weights, which is what the update's autocast
    forward pass computes with as well.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.source = policy
        self.model = copy.deepcopy(policy).to(torch.bfloat16).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("sdpa")  # the trained copy may use eager attention (backward speed)

    @torch.no_grad()
    def refreshed(self) -> nn.Module:
        """The copy, holding the policy's current weights."""
        for mine, theirs in zip(self.model.parameters(), self.source.parameters(), strict=True):
            mine.copy_(theirs)
        return self.model


def _warpers(gen: GenerationSpec) -> list[Any]:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if gen.top_k:
        warpers.append(TopKLogitsWarper(top_k=gen.top_k))
    if gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=gen.top_p))
    return warpers


def sample_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits), by inverse-CDF sampling with one uniform draw from the row's generator.

    Args:
        logits: (B, V).
        generators: B generators.

    Returns:
        (B,) token ids.
    """
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(cdf.dtype)
    tokens = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return tokens.clamp(max=cdf.shape[1] - 1)  # a draw of exactly the total (float rounding)


@torch.no_grad()
def sample_responses(
    model: Any,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    gen: GenerationSpec,
    *,
    stop_token_id: int,
    pad_token_id: int,
    generators: Sequence[torch.Generator],
    interrupted: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per query with the KV cache, keeping each sampled token's log-probability.

    The log-probabilities are those of the temperature-scaled distribution (before top-k / top-p filtering),
    the quantity the update's forward pass computes; taking them from the sampling pass itself saves a
    forward pass of the policy per rollout (as TRL does). They equal the forward pass's up to float rounding
    (cached decoding sums in another order).

    Args:
        model: a causal LM (or a peft model around one); it decodes in evaluation mode
            (:func:`rlhf_trainer.generation.eval_mode`).
        queries: (B, P) left-padded prompt ids.
        query_mask: (B, P) attention mask of the prompts.
        gen: max_new_tokens, temperature (0 = greedy), top_k, top_p.
        stop_token_id: a row stops after sampling it.
        pad_token_id: fills a row after it stopped.
        generators: one per row (:func:`episode_generators`).
        interrupted: checked before each token; when it returns true, sampling stops early (the caller discards
            the partial responses: SIGTERM should not wait for a whole generation).

    Returns:
        responses (B, R) with ``R <= max_new_tokens`` (as long as the longest response; padding after each
        row's stop token) and their log-probabilities (B, R), 0 on padding.
    """
    with eval_mode(model):
        return _sample(model, queries, query_mask, gen, stop_token_id, pad_token_id, generators, interrupted)


def _sample(model: Any, queries: torch.Tensor, query_mask: torch.Tensor, gen: GenerationSpec, stop_token_id: int,
            pad_token_id: int, generators: Sequence[torch.Generator],
            interrupted: Callable[[], bool]) -> tuple[torch.Tensor, torch.Tensor]:
    warpers = _warpers(gen)
    scale = logit_scale(gen.temperature)
    mask = query_mask.clone()
    positions = position_ids(mask)
    out = model(input_ids=queries, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    done = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    for _ in range(gen.max_new_tokens):
        if interrupted():
            break
        logits = out.logits[:, -1].float() / scale
        if gen.temperature == 0:
            next_tokens = logits.argmax(-1)
        else:
            filtered = logits
            for warp in warpers:
                filtered = warp(None, filtered)
            next_tokens = sample_tokens(filtered, generators)
        logprob = logits.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        tokens.append(torch.where(done, pad_token_id, next_tokens))
        logprobs.append(torch.where(done, 0.0, logprob))
        done |= tokens[-1] == stop_token_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[-1].unsqueeze(1), attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    if not tokens:  # interrupted before the first token
        return queries.new_zeros((queries.shape[0], 0)), torch.zeros((queries.shape[0], 0), device=queries.device)
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
