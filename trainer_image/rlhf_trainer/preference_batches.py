"""Reward-model training batches in which every distinct response is scored once.

The preferences stage pairs up to K answers to the same prompt (``pairs: all`` gives up to K(K-1)/2 pairs
per prompt), so a response appears in several pairs (in the demo, about two on average). TRL's RewardTrainer
runs the reward model on both sides of every pair. Here, as in InstructGPT (Ouyang et al. 2022, section 3.5: "a
single forward pass of the RM for each completion rather than C(K,2) forward passes for K completions"):

* :class:`PromptGroupedSampler` keeps the pairs of a prompt next to each other in the training order (prompts
  shuffled per epoch, seeded), so they mostly share a batch;
* :class:`DistinctResponseCollator` pads each distinct token sequence of a batch once and records which row
  holds each pair's chosen and rejected side;
* :class:`DistinctResponseRewardTrainer` runs the model on those rows and hands TRL's own loss (Bradley-Terry,
  its margin and centring terms, its metrics) the rewards of both sides of every pair.

The loss of a batch is the same as TRL's on the same pairs; a batch of the demo's pairs carries little more than
half the sequences TRL's does. And the answers to one prompt share their first tokens (the prompt, in the chat
template, and often the answer's first words): the batch runs each group's shared prefix through the model once,
keeps its keys and values, and runs every sequence's own remainder on top of them
(:func:`rlhf_trainer.shared_prefix.shared_prefix_scores`), so a prompt is read once per batch instead of once per
answer: fewer tokens through the model, a faster batch. What differs from TRL's run is which pairs share a batch:
two or three prompts' pairs instead of eight shuffled ones (on the demo: a lower held-out pair accuracy, but PPO
against that reward model gained more gold-judge score; figures for both: docs/measurements.md, "Reward
batches").
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer

from rlhf_trainer import seeding
from rlhf_trainer.modeling import transformers_model
from rlhf_trainer.padding import group_rows, right_pad
from rlhf_trainer.shared_prefix import PREFIX_KEYS, shared_prefix_scores, shared_prefixes


class PromptGroupedSampler(torch.utils.data.Sampler[int]):
    """Row indices with the rows of a group (a prompt) contiguous, groups in a seeded random order per epoch.

    The Trainer calls :meth:`set_epoch` before each epoch, also when it resumes in the middle of one (it then
    skips the batches already trained), so a resumed run sees the same order as an uninterrupted one.
    """

    def __init__(self, groups: Sequence[Hashable], seed: int) -> None:
        self.groups = group_rows(groups)
        self.rows = len(groups)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.groups), generator=seeding.generator(self.seed, "pair groups", self.epoch))
        for group in order.tolist():
            yield from self.groups[group]


@dataclass
class DistinctResponseCollator:
    """Pairs (``chosen_ids``, ``rejected_ids``, optional ``margin``) to a batch of their distinct sequences.

    Returns ``input_ids`` and ``attention_mask`` (U, S), right-padded, U <= 2B distinct sequences; ``pair_rows``
    (2B,): the row of each chosen side, then of each rejected side (TRL's order of the two halves); ``margin``
    (B,) when the pairs have one; and the same sequences split into shared prefixes and their remainders
    (:func:`rlhf_trainer.shared_prefix.shared_prefixes`).
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        row_of: dict[tuple[int, ...], int] = {}
        pair_rows = [row_of.setdefault(tuple(ids), len(row_of)) for ids in sides]
        sequences = list(row_of)
        input_ids, attention_mask = right_pad(sequences, self.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pair_rows": torch.tensor(pair_rows)}
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        pairs = list(zip(pair_rows[:len(examples)], pair_rows[len(examples):]))
        return batch | shared_prefixes(sequences, pairs, self.pad_token_id)


def reads_prefixes_once(model: Any) -> bool:
    """Whether :func:`rlhf_trainer.shared_prefix.shared_prefix_scores` can run ``model``: not under
    DistributedDataParallel, whose gradient synchronisation expects its own forward call, nor with activation
    checkpointing, which turns the cache off."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    return not getattr(transformers_model(model), "is_activation_checkpointing", False)


class DistinctResponseRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer over batches of distinct sequences (see the module's docstring). Pairs are grouped by
    their ``prompt`` column (without one, each pair is a group of its own: a plain shuffle)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = DistinctResponseCollator(self.processing_class.pad_token_id)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        # The dataset TRL prepared, before the dataloader drops the columns the model does not take
        rows = self.train_dataset
        groups = ([json.dumps(p, sort_keys=True) for p in rows["prompt"]] if "prompt" in rows.column_names
                  else list(range(len(rows))))
        return PromptGroupedSampler(groups, self.args.seed)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        pair_rows = inputs.pop("pair_rows")
        split = {key: inputs.pop(key) for key in PREFIX_KEYS if key in inputs}

        def both_sides_of_every_pair(**model_inputs: Any) -> Any:
            if split and reads_prefixes_once(model):
                with self.accelerator.autocast():  # the Trainer's autocast wraps the model's forward only
                    outputs = SequenceClassifierOutput(logits=shared_prefix_scores(model, **split).float())
            else:
                outputs = model(**model_inputs)
            outputs.logits = outputs.logits[pair_rows]  # (U, 1) -> (2B, 1); gradients add up per sequence
            return outputs

        return super().compute_loss(both_sides_of_every_pair, inputs, return_outputs, num_items_in_batch)
