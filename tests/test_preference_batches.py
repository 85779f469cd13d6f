"""Reward-model batches that score each distinct response once and read a prompt's shared prefix once: the same
loss and gradients as TRL's RewardTrainer on the same pairs, with fewer tokens through the model."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from rlhf_api.spec import ModelSpec
from rlhf_trainer.preference_batches import (
    DistinctResponseCollator,
    PromptGroupedSampler,
    reads_prefixes_once,
    shared_prefix_scores,
    shared_prefixes,
)


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
    assert batch["prefix_ids"].tolist() == [[5]] and batch["prefix_rows"].tolist() == [0, 0, 0]


def test_shared_prefixes_group_a_prompts_answers_and_leave_each_sequence_a_token_of_its_own():
    a, b, c = [5, 6, 7], [5, 6, 8, 9], [5, 6]  # one prompt's answers: c is all prefix of the others
    d, e = [3, 4, 5], [3, 4, 5, 6]  # another prompt's
    split = shared_prefixes([a, b, c, d, e], pairs=[(0, 1), (3, 4), (1, 2)], pad_token_id=0)
    assert split["prefix_rows"].tolist() == [0, 0, 0, 1, 1]
    assert split["prefix_ids"].tolist() == [[0, 5], [3, 4]]  # left-padded: every prefix ends at the last column
    assert split["prefix_mask"].tolist() == [[0, 1], [1, 1]]
    assert split["suffix_ids"].tolist() == [[6, 7, 0], [6, 8, 9], [6, 0, 0], [5, 0, 0], [5, 6, 0]]
    assert split["suffix_mask"].sum(1).tolist() == [2, 3, 1, 1, 2]
    for row, seq in enumerate([a, b, c, d, e]):  # prefix + remainder is the sequence again
        prefix = split["prefix_ids"][split["prefix_rows"][row]][split["prefix_mask"][split["prefix_rows"][row]] == 1]
        assert prefix.tolist() + split["suffix_ids"][row][split["suffix_mask"][row] == 1].tolist() == seq
    assert shared_prefixes([[7], [7, 8]], [(0, 1)], pad_token_id=0) == {}  # a one-token sequence: no split


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_scores_read_through_shared_prefixes_equal_the_classifiers_own_and_so_do_gradients(tiny_model_dir, lora):
    from peft import get_peft_model

    from rlhf_api.spec import LoraSpec
    from rlhf_trainer.models import load_sequence_classifier, load_tokenizer, lora_config
    from rlhf_trainer.padding import right_pad

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tokenizer = load_tokenizer(tiny_model_dir, spec)
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_model_dir, spec, tokenizer)
    if lora:
        model = get_peft_model(model, lora_config(LoraSpec(enabled=True, r=4, dropout=0.0), "SEQ_CLS"))
        for name, p in model.named_parameters():  # adapters away from their zero start, so they matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    prompt_a, prompt_b = [10, 11, 12, 13, 14, 15, 16], [50, 51, 52, 53]
    sequences = [prompt_a + [20, 21, 22, 23, 24], prompt_a + [20, 30], prompt_a + [20, 21, 40, 41, 42, 43, 44, 45],
                 prompt_b + [54, 55, 56, 57, 58, 59, 33, 34, 35], prompt_b + [54]]
    split = shared_prefixes(sequences, [(0, 1), (1, 2), (3, 4)], tokenizer.pad_token_id)
    # prompt a and its answers' shared first token; prompt b alone (its second answer is one token long)
    assert split["prefix_mask"].sum(1).tolist() == [8, 4] and split["suffix_ids"].shape == (5, 9)
    weights = torch.randn(len(sequences), 1, generator=torch.Generator().manual_seed(2))

    def scores_and_gradients(score: callable) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        scores = score()
        (scores * weights).sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    input_ids, attention_mask = right_pad(sequences, tokenizer.pad_token_id)
    whole, whole_grads = scores_and_gradients(lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                            use_cache=False).logits)
    shared, shared_grads = scores_and_gradients(lambda: shared_prefix_scores(model, **split))
    assert shared.shape == whole.shape == (5, 1)
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == whole_grads.keys() and any("embed" in n for n in whole_grads) != lora
    for name in whole_grads:
        torch.testing.assert_close(shared_grads[name], whole_grads[name], rtol=1e-4, atol=1e-5, msg=name)

    assert reads_prefixes_once(model)
    model.activation_checkpointing_enable()  # no cache under activation checkpointing: whole sequences then
    assert not reads_prefixes_once(model)


@pytest.mark.parametrize(("center", "bf16"), [(None, False), (0.01, False), (None, True)],
                         ids=["plain", "centred", "bf16-autocast"])
def test_loss_and_gradients_equal_trls_reward_trainer_with_fewer_sequences(tiny_model_dir, tmp_path, center, bf16):
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
    losses, grads, sequences, body_dtypes = [], [], [], []
    for trainer_class in (RewardTrainer, DistinctResponseRewardTrainer):
        trainer = trainer_class(
            model=copy.deepcopy(model), processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
            args=RewardConfig(output_dir=str(tmp_path / trainer_class.__name__), report_to=[], use_cpu=True,
                              activation_checkpointing=False, center_rewards_coefficient=center,
                              per_device_train_batch_size=len(rows), bf16=bf16))
        examples = [trainer.train_dataset[i] for i in range(len(rows))]
        collate = (DataCollatorForPreference(tokenizer.pad_token_id) if trainer_class is RewardTrainer
                   else trainer.data_collator)
        inputs = collate([{k: e[k] for k in ("chosen_ids", "rejected_ids", "margin")} for e in examples])
        sequences.append(inputs["input_ids"].shape[0])
        trainer.accelerator.prepare_model(trainer.model)  # as train() does: under bf16, autocast around forward
        hook = trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(  # (a hook's None keeps the output)
            lambda module, args, output: body_dtypes.append(output.dtype) and None)
        loss = trainer.compute_loss(trainer.model, inputs)
        hook.remove()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert sequences == [8, 5]  # 4 pairs: 8 sides, 5 distinct answers (scored on top of 2 shared prompts)
    # TRL runs the model once; ours runs the 2 shared prompts, then the 5 answers on top: bfloat16 under bf16
    assert body_dtypes == [torch.bfloat16 if bf16 else torch.float32] * 3
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {}
    torch.testing.assert_close(losses[1], losses[0], **tolerance)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name, **tolerance)
