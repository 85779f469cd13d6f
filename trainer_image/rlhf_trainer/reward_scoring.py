"""Scoring (prompt, response) pairs with a reward model, formatted exactly as the reward stage trained it.

TRL's RewardTrainer tokenizes a conversational example as the chat template applied to the user turn plus
the assistant turn; a plain example as prompt + response + EOS. :func:`reward_input_ids` reproduces that, so
the reward stage's held-out accuracy, the evaluate stage and PPO all score what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_trainer.padding import group_rows, right_pad
from rlhf_trainer.shared_prefix import shared_prefix_scores, shared_prefixes


def reward_input_ids(tokenizer: Any, prompt: str, response: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt + response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def reward_scores(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, chat: bool,
                  batch_size: int = 16, by_length: bool = False, group_prompts: bool = True) -> torch.Tensor:
    """Reward-model score of each (prompt, response): the scalar head at the last real token.

    Runs in the caller's autograd mode: :func:`score` (the reward and evaluate stages) under inference mode,
    PPO under ``no_grad`` (ZeRO-3's parameter gathering and peft's adapter switching cannot run under inference
    mode). ``by_length``: batch the texts in order of length (for hundreds of texts of varied lengths: sorted, a
    batch carries little padding); the scores come back in input order either way. Where a prompt has several
    answers (the evaluate stage's, a held-out set's), they share a batch and the model reads the prompt once
    (:mod:`rlhf_trainer.shared_prefix`), unless ``group_prompts`` is false: then the batches are consecutive rows,
    each one whole-sequence pass, whatever the prompts (PPO under ZeRO-3, where every process must run the same
    forward passes: its parameters are gathered in collectives).

    Returns:
        (B,) float32 scores on the model's device.
    """
    device = next(model.parameters()).device
    sequences = [reward_input_ids(tokenizer, p, r, chat) for p, r in zip(prompts, responses)]
    scores = torch.empty(len(sequences), device=device)
    for groups in prompt_group_batches(prompts, sequences, batch_size, by_length, group_prompts):
        rows = [row for group in groups for row in group]
        split: dict[str, torch.Tensor] = {}
        if len(groups) < len(rows):  # a prompt with several answers here: read it once
            position = {row: i for i, row in enumerate(rows)}
            split = shared_prefixes([sequences[row] for row in rows],
                                    [(position[group[0]], position[row]) for group in groups for row in group[1:]],
                                    tokenizer.pad_token_id)
        if split:
            logits = shared_prefix_scores(model, **{k: v.to(device) for k, v in split.items()})
        else:  # no prompt repeats here (PPO's rollouts): whole sequences, one pass
            ids, mask = right_pad([sequences[row] for row in rows], tokenizer.pad_token_id)  # read at the last token
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        scores[rows] = logits[:, 0].float()
    return scores


def prompt_group_batches(prompts: Sequence[str], sequences: Sequence[Sequence[int]], batch_size: int,
                         by_length: bool, group_prompts: bool = True) -> list[list[list[int]]]:
    """Row indices in batches of at most ``batch_size``, each batch a list of groups: rows of one prompt.

    A prompt's rows stay together (in chunks of ``batch_size`` when there are more); ``by_length`` orders the
    groups by their longest sequence, otherwise they keep the order of their first row. Without
    ``group_prompts`` every row is a group of its own: the batches depend on the number of rows only.
    """
    grouped = group_rows(prompts) if group_prompts else [[row] for row in range(len(prompts))]
    groups = [rows[start:start + batch_size] for rows in grouped for start in range(0, len(rows), batch_size)]
    if by_length:
        groups.sort(key=lambda group: max(len(sequences[row]) for row in group))
    batches: list[list[list[int]]] = []
    for group in groups:
        if not batches or sum(map(len, batches[-1])) + len(group) > batch_size:
            batches.append([])
        batches[-1].append(group)
    return batches


@torch.inference_mode()
def score(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, chat: bool,
          batch_size: int = 16) -> list[float]:
    """:func:`reward_scores` under inference mode, batched by length, as a list."""
    return reward_scores(model, tokenizer, prompts, responses, chat=chat, batch_size=batch_size,
                         by_length=True).tolist()
