"""Batched sampling from a causal LM (the log-probabilities of what was sampled: :mod:`rlhf_trainer.ppo.forward`).

Prompts are wrapped in the chat template (when there is one and the spec wants it), left-padded, and
generated in batches under ``torch.inference_mode`` with the KV cache. A response ends at the first EOS
(kept in its token ids, so a later stage can tell which responses stopped on their own).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_operator.spec import GenerationSpec


@dataclass(frozen=True)
class Sample:
    prompt: str  # the user's prompt, as in the dataset
    prompt_ids: list[int]  # the prompt as the model saw it (chat template applied), no padding
    response_ids: list[int]  # generated tokens up to and including the first EOS
    text: str  # the response decoded without special tokens
    has_eos: bool


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """The text the model is conditioned on: the chat template's user turn plus the assistant header."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def logit_scale(temperature: float) -> float:
    """What sampling at ``temperature`` divides the logits by: the temperature, or 1 for greedy decoding (0)."""
    return temperature if temperature > 0 else 1.0


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` in evaluation mode for the duration, its own mode restored after: how a trained model decodes.

    Detail: transformers checkpoints activations (``gradientCheckpointing``) only in training mode, and there
    it drops the KV cache; the trainers turn dropout off anyway (:func:`rlhf_trainer.ppo.models.disable_dropout`),
    so for decoding evaluation mode changes nothing else.
    """
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def generation_config(gen: GenerationSpec, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    sampling = gen.temperature > 0
    return GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        do_sample=sampling,
        temperature=gen.temperature if sampling else None,
        top_p=gen.top_p if sampling else None,
        top_k=gen.top_k if sampling else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


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
    """One sampled response per prompt (repeat a prompt to get several), in the prompts' order."""
    torch.manual_seed(seed)
    config = generation_config(gen, tokenizer)
    dev = next(model.parameters()).device
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[Sample] = []
    try:
        with eval_mode(model):
            for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
                batch = list(prompts[start:start + batch_size])
                texts = [format_prompt(tokenizer, p, use_chat_template) for p in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
                generated = model.generate(**enc, generation_config=config)
                width = enc["input_ids"].shape[1]
                for row, prompt in enumerate(batch):
                    prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                    response = generated[row, width:].tolist()
                    has_eos = tokenizer.eos_token_id in response
                    if has_eos:
                        response = response[: response.index(tokenizer.eos_token_id) + 1]
                    else:
                        response = [t for t in response if t != tokenizer.pad_token_id]
                    text = tokenizer.decode(response, skip_special_tokens=True).strip()
                    out.append(Sample(prompt, prompt_ids, response, text, has_eos))
    finally:
        tokenizer.padding_side = previous_side
    return out
