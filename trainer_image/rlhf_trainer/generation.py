"""Batched sampling from a causal LM: the decoding loop of PPO's rollouts and of the preferences and evaluate
stages.

Prompts are wrapped in the chat template (when there is one and the spec wants it), left-padded, and decoded
with the KV cache, one token per step for every row still writing, without autograd. A response ends at the
stop token (kept in its token ids, so a later stage can tell which responses stopped on their own), and its row
leaves the batch: the passes after it compute only the answers still being written (most answers end well before
``maxNewTokens``). A prompt the batch holds several times (several answers
per prompt) runs through the model once; its KV cache is copied to the repeats.

Each response draws from its own random generator (one uniform number per token, inverse-CDF sampling over the
softmax), so what a prompt gets depends on the seed and its index only, not on the batch it was decoded in.
(transformers' ``generate`` samples with ``torch.multinomial``, which on CPU draws one exponential variate per
vocabulary entry and token: a large share of decoding time with a vocabulary of tens of thousands; figures:
docs/measurements.md, "Sampling loop".)

Detail: decoding runs under ``torch.no_grad``, not ``torch.inference_mode``: under bfloat16 autocast only the
former lets autocast cast each float32 weight once per rollout instead of once per token (figures:
docs/measurements.md, "Sampling loop").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_api.spec import GenerationSpec
from rlhf_trainer.accelerations.decoding_weights import decoding_weights
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.modeling import logit_scale, transformers_model
from rlhf_trainer.padding import left_pad, position_ids
from rlhf_trainer.seeding import generator


@dataclass(frozen=True)
class Sample:
    prompt: str  # the user's prompt, as in the dataset
    prompt_ids: list[int]  # the prompt as the model saw it (chat template applied), no padding
    response_ids: list[int]  # generated tokens up to and including the first EOS
    text: str  # the response decoded without special tokens
    has_eos: bool
    # each response token's log-probability as sampled (temperature-scaled); float rounding differs with the
    # batch an answer was decoded in, so two samples are equal when their tokens and texts are
    logprobs: tuple[float, ...] = field(default=(), compare=False)


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """The text the model is conditioned on: the chat template's user turn plus the assistant header."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` in evaluation mode for the duration, its own mode restored after: how a trained model decodes.

    Detail: transformers checkpoints activations (``gradientCheckpointing``) only in training mode, and there
    it drops the KV cache; PPO turns dropout off in its models anyway, so for decoding evaluation mode changes
    nothing else.
    """
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def stop_token_ids(model: Any, tokenizer: Any, names: Sequence[str] | None = None,
                   field: str = "stopTokens") -> list[int]:
    """The tokens that end a response: ``names`` when given (each one token of the vocabulary), else the model's
    generation config's EOS ids (Llama 3's instruct models list more than one) and the tokenizer's EOS.

    Raises:
        ConfigError: a name is not one token of the vocabulary (``field`` is the spec field that gave it).
    """
    if names:
        vocabulary = tokenizer.get_vocab()
        unknown = [name for name in names if name not in vocabulary]
        if unknown:
            raise ConfigError(f"{field}: {', '.join(map(repr, unknown))} is not one token of the model's vocabulary: "
                              "name tokens as the tokenizer spells them (e.g. <|eot_id|>), or unset it for the "
                              "model's own end-of-turn tokens")
        return [vocabulary[name] for name in names]
    eos = getattr(getattr(transformers_model(model), "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [i for i in ([eos] if isinstance(eos, int) else list(eos or [])) if i not in ids]
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids the policy is conditioned on: the chat template's user turn and assistant header."""
    texts = [format_prompt(tokenizer, p, use_chat_template) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


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
    stop_token_ids: Sequence[int],
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
        model: a causal LM (or a peft model around one); it decodes in evaluation mode (:func:`eval_mode`).
        queries: (B, P) left-padded prompt ids.
        query_mask: (B, P) attention mask of the prompts.
        gen: max_new_tokens, temperature (0 = greedy), top_k, top_p.
        stop_token_ids: a row stops after sampling one of them.
        pad_token_id: fills a row after it stopped.
        generators: one per row (PPO's: one per episode, seeded by the episode's index).
        interrupted: checked before each token; when it returns true, sampling stops early (the caller discards
            the partial responses: SIGTERM should not wait for a whole generation).

    Returns:
        responses (B, R) with ``R <= max_new_tokens`` (as long as the longest response; padding after each
        row's stop token) and their log-probabilities (B, R), 0 on padding.
    """
    with eval_mode(model):
        return _sample(model, queries, query_mask, gen, stop_token_ids, pad_token_id, generators, interrupted)


def distinct_rows(queries: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The batch's distinct prompts: ``(firsts, copies)`` with ``queries[firsts][copies]`` equal to ``queries``.

    Several answers per prompt (the preferences and evaluate stages) repeat a prompt in a batch; its prompt pass
    runs once and the KV cache is copied to the repeats. ``firsts`` is None when every prompt is distinct.
    """
    rows = torch.cat([queries, query_mask.to(queries.dtype)], dim=1)  # equal ids and equal padding
    distinct, copies = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return None, copies
    firsts = torch.full((distinct.shape[0],), rows.shape[0], dtype=torch.long, device=rows.device)
    firsts.scatter_reduce_(0, copies, torch.arange(rows.shape[0], device=rows.device), reduce="amin")
    return firsts, copies


def _sample(model: Any, queries: torch.Tensor, query_mask: torch.Tensor, gen: GenerationSpec,
            stop_token_ids: Sequence[int], pad_token_id: int, generators: Sequence[torch.Generator],
            interrupted: Callable[[], bool]) -> tuple[torch.Tensor, torch.Tensor]:
    warpers = _warpers(gen)
    stops = torch.as_tensor(list(stop_token_ids), device=queries.device)
    scale = logit_scale(gen.temperature)
    batch = queries.shape[0]
    mask = query_mask.clone()
    positions = position_ids(mask)
    firsts, copies = distinct_rows(queries, query_mask)
    if firsts is None:
        out = model(input_ids=queries, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    else:  # one prompt pass per distinct prompt
        out = model(input_ids=queries[firsts], attention_mask=mask[firsts], position_ids=positions[firsts],
                    use_cache=True, logits_to_keep=1)
        out.past_key_values.reorder_cache(copies)
        logits = out.logits[copies, -1]
    # Rows still decoding, by their index in the batch: a row that samples the stop token leaves the decoding
    # batch (and its KV cache), so the later passes compute only the answers still being written.
    rows = torch.arange(batch, device=queries.device)
    responses = torch.full((batch, gen.max_new_tokens), pad_token_id, dtype=queries.dtype, device=queries.device)
    logprobs = torch.zeros((batch, gen.max_new_tokens), device=queries.device)
    length = 0
    for step in range(gen.max_new_tokens):
        if interrupted():
            break
        logits = logits.float() / scale
        if gen.temperature == 0:
            next_tokens = logits.argmax(-1)
        else:
            filtered = logits
            for warp in warpers:
                filtered = warp(None, filtered)
            next_tokens = sample_tokens(filtered, [generators[i] for i in rows.tolist()])
        responses[rows, step] = next_tokens
        logprobs[rows, step] = logits.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        length = step + 1
        going = ~torch.isin(next_tokens, stops)
        if not bool(going.any()) or length == gen.max_new_tokens:  # no forward pass for a token never sampled
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            out.past_key_values.reorder_cache(keep)
            rows, mask, positions, next_tokens = rows[keep], mask[keep], positions[keep], next_tokens[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
        logits = out.logits[:, -1]
    return responses[:, :length], logprobs[:, :length]


@torch.inference_mode()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    gen: GenerationSpec,
    *,
    batch_size: int,
    seed: int,
    use_chat_template: bool = True,
    desc: str = "generating",
) -> list[Sample]:
    """One sampled response per prompt (repeat a prompt to get several), in the prompts' order, ending at EOS.

    The i-th prompt's response draws from a generator seeded by ``(seed, "sample", i)``. The model's linear layers
    decode from copies of their weights made once for the call (:func:`rlhf_trainer.accelerations.decoding_weights`).
    """
    device = next(model.parameters()).device
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id
    prompt_ids = encode_prompts(tokenizer, prompts, use_chat_template)
    out: list[Sample] = []
    with decoding_weights(model, rows=batch_size):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            rows = range(start, min(start + batch_size, len(prompts)))
            queries, query_mask = left_pad([prompt_ids[i] for i in rows], pad)
            responses, logprobs = sample_responses(
                model, queries.to(device), query_mask.to(device), gen, stop_token_ids=stops, pad_token_id=pad,
                generators=[generator(seed, "sample", i, device=device) for i in rows])
            for i, response, response_logprobs in zip(rows, responses.tolist(), logprobs.tolist()):
                end = next((k for k, token in enumerate(response) if token in stops), None)
                has_eos = end is not None
                response = response[:end + 1] if has_eos else response
                text = tokenizer.decode(response, skip_special_tokens=True).strip()
                out.append(Sample(prompts[i], prompt_ids[i], response, text, has_eos,
                                  tuple(response_logprobs[:len(response)])))
    return out
