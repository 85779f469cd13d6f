"""Scoring (prompt, response) pairs with a reward model, formatted exactly as the reward stage trained it.

TRL's RewardTrainer tokenizes a conversational example as the chat template applied to the user turn plus
the assistant turn; a plain example as prompt + response + EOS. :func:`reward_input_ids` reproduces that, so
the reward stage's held-out accuracy, the evaluate stage and PPO all score what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_trainer.padding import index_batches, right_pad


def reward_input_ids(tokenizer: Any, prompt: str, response: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt + response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def reward_scores(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, chat: bool,
                  batch_size: int = 16, by_length: bool = False) -> torch.Tensor:
    """Reward-model score of each (prompt, response): the scalar head at the last real token.

    Runs in the caller's autograd mode: :func:`score` (the reward and evaluate stages) under inference mode,
    PPO under ``no_grad`` (ZeRO-3's parameter gathering and peft's adapter switching cannot run under inference
    mode). ``by_length``: batch the texts in order of length (for hundreds of texts of varied lengths: sorted, a
    batch carries little padding); the scores come back in input order either way.

    Returns:
        (B,) float32 scores on the model's device.
    """
    device = next(model.parameters()).device
    sequences = [reward_input_ids(tokenizer, p, r, chat) for p, r in zip(prompts, responses)]
    scores = torch.empty(len(sequences), device=device)
    for rows in index_batches(len(sequences), batch_size, key=(lambda i: len(sequences[i])) if by_length else None):
        ids, mask = right_pad([sequences[i] for i in rows], tokenizer.pad_token_id)  # read at the last real token
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        scores[rows] = logits[:, 0].float()
    return scores


@torch.inference_mode()
def score(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, chat: bool,
          batch_size: int = 16) -> list[float]:
    """:func:`reward_scores` under inference mode, batched by length, as a list."""
    return reward_scores(model, tokenizer, prompts, responses, chat=chat, batch_size=batch_size,
                         by_length=True).tolist()
