"""Scoring (prompt, response) pairs with a reward model, formatted exactly as the reward stage trained it.

TRL's RewardTrainer tokenizes a conversational example as the chat template applied to the user turn plus
the assistant turn; a plain example as prompt + response + EOS. :func:`reward_input_ids` reproduces that, so
the reward stage's held-out accuracy, the evaluate stage and PPO all score what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def reward_input_ids(tokenizer: Any, prompt: str, response: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt + response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def score(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, chat: bool,
    batch_size: int = 16,
) -> list[float]:
    """Reward-model score of each (prompt, response): the scalar head at the last real token."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [reward_input_ids(tokenizer, p, r, chat)
                for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: the model reads the score at the last non-pad token
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        out.extend(float(v) for v in logits[:, 0].float().cpu())
    return out
