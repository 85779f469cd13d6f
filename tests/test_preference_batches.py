"""Reward-model batches that score each distinct response once: the same loss and gradients as TRL's
RewardTrainer on the same pairs, with fewer sequences through the model."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from rlhf_operator.spec import ModelSpec
from rlhf_trainer.preference_batches import DistinctResponseCollator, PromptGroupedSampler


def test_sampler_keeps_each_prompts_pairs_together_in_a_seeded_order_per_epoch():
    groups = [f"prompt {i % 7}" for i in range(30)]  # rows of a prompt scattered through the dataset
    sampler = PromptGroupedSampler(groups, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(30)) and len(sampler) == 30
        runs = [group for group, _ in itertools.groupby(groups[row] for row in order)]
        assert len(runs) == len(set(runs)) == 7  # each prompt's rows form one run
        orders.append(order)
    assert orders[0] == orders[2]  # an epoch's order depends on the seed and the epoch only (resume)
    assert orders[0] != orders[1]
    assert list(PromptGroupedSampler(groups, seed=4)) != orders[0]


def test_collator_pads_each_distinct_sequence_once_and_maps_every_side_to_its_row():
    a, b, c = [5, 6, 7], [5, 6, 8, 9], [5, 1]
    examples = [{"chosen_ids": a, "rejected_ids": b, "margin": 0.5},
                {"chosen_ids": a, "rejected_ids": c, "margin": 1.0},
                {"chosen_ids": b, "rejected_ids": c, "margin": 0.0}]
    batch = DistinctResponseCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (3, 4)
    sides = [a, a, b, b, c, c]  # chosen sides, then rejected sides
    for side, row in zip(sides, batch["pair_rows"].tolist()):
        assert batch["input_ids"][row, :len(side)].tolist() == side
        assert batch["attention_mask"][row].tolist() == [1] * len(side) + [0] * (4 - len(side))
    assert batch["margin"].tolist() == [0.5, 1.0, 0.0]
    assert "margin" not in DistinctResponseCollator(0)([{"chosen_ids": a, "rejected_ids": b}])


@pytest.mark.parametrize("center", [None, 0.01], ids=["plain", "centred"])
def test_loss_and_gradients_equal_trls_reward_trainer_with_fewer_sequences(tiny_model_dir, tmp_path, center):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from rlhf_trainer.models import load_sequence_classifier, load_tokenizer
    from rlhf_trainer.preference_batches import DistinctResponseRewardTrainer

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tokenizer = load_tokenizer(tiny_model_dir, spec)
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_model_dir, spec, tokenizer)
    answers = {"Review film A": ["A wonderful film.", "A dull mess.", "Fine, I guess."],
               "Review film B": ["Moving and funny.", "Awful."]}
    rows = [{"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": x}],
             "rejected": [{"role": "assistant", "content": y}], "margin": 0.3 * i}
            for i, (prompt, texts) in enumerate(answers.items()) for x, y in itertools.combinations(texts, 2)]
    losses, grads, sequences = [], [], []
    for trainer_class in (RewardTrainer, DistinctResponseRewardTrainer):
        trainer = trainer_class(
            model=copy.deepcopy(model), processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
            args=RewardConfig(output_dir=str(tmp_path / trainer_class.__name__), report_to=[], use_cpu=True, activation_checkpointing=False,
                              center_rewards_coefficient=center, per_device_train_batch_size=len(rows)))
        examples = [trainer.train_dataset[i] for i in range(len(rows))]
        collate = (DataCollatorForPreference(tokenizer.pad_token_id) if trainer_class is RewardTrainer
                   else trainer.data_collator)
        inputs = collate([{k: e[k] for k in ("chosen_ids", "rejected_ids", "margin")} for e in examples])
        sequences.append(inputs["input_ids"].shape[0])
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert sequences == [8, 5]  # 4 pairs: 8 sides, 5 distinct answers
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
