"""Where the trainer meets TRL: the SFT loss and gradients, the TRL configs built from a spec, and the reward model's
tokenization agree with TRL's own."""

from __future__ import annotations

import warnings

import pytest
import torch

from rlhf_api.spec import ModelSpec, RewardSpec, SFTSpec
from rlhf_trainer.hf_training import training_args
from rlhf_trainer.models import load_tokenizer


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_cpu_sft_loss_over_the_scored_positions_equals_trls_fused_loss_and_so_do_gradients(tiny_model_dir, tmp_path,
                                                                                           bf16):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf_trainer.stages.sft import completion_logits_trainer

    tok = load_tokenizer(tiny_model_dir, ModelSpec(uri=tiny_model_dir.as_uri()))
    tok.padding_side = "right"
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in [("Review a heist film", "Slick and fun."), ("Review a ghost story", "Dull, slow and long.")]]
    losses, accuracies, grads, body_dtypes = {}, {}, {}, {}
    for name, cls in (("trl", SFTTrainer), ("scored_positions", completion_logits_trainer(SFTTrainer))):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.resize_token_embeddings(len(tok))
        trainer = cls(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows),
                      args=SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, report_to=[],
                                     use_cpu=True, activation_checkpointing=False, bf16=bf16))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompt and padding are masked
        trainer.model.train()
        trainer.accelerator.prepare_model(trainer.model)  # as train() does: under bf16, autocast around forward
        hook = model.model.layers[0].mlp.down_proj.register_forward_hook(  # (a hook's None keeps the output)
            lambda module, args, output: body_dtypes.setdefault(name, output.dtype) and None)
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=(batch["labels"] != -100).sum())
        hook.remove()
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in trainer.model.named_parameters()}
        accuracies[name] = trainer._metrics["train"]["mean_token_accuracy"][-1]
    # under bf16 the body runs in bfloat16 on both paths (TRL's LM head computes in float32, ours in bfloat16)
    assert body_dtypes == dict.fromkeys(("trl", "scored_positions"), torch.bfloat16 if bf16 else torch.float32)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(losses["scored_positions"], losses["trl"], **tolerance)
    if not bf16:  # the argmax of nearly tied random logits moves with bfloat16 rounding
        assert accuracies["scored_positions"] == pytest.approx(accuracies["trl"])
    for name, grad in grads["trl"].items():
        torch.testing.assert_close(grads["scored_positions"][name], grad, msg=name,
                                   **(tolerance if bf16 else {"atol": 1e-5, "rtol": 1e-4}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trl_configs_follow_the_specs_gradient_checkpointing_without_deprecation_warnings(checkpointing, tmp_path):
    from trl import RewardConfig, SFTConfig

    for spec, config in ((SFTSpec, SFTConfig), (RewardSpec, RewardConfig)):
        settings = spec.model_validate({"gradientCheckpointing": checkpointing,
                                        "dataset": {"uri": "builtin://movie-reviews/sft"}})
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # transformers 5 renamed gradient_checkpointing
            args = config(**training_args(settings, tmp_path, bf16=False))
        assert args.gradient_checkpointing is checkpointing and args.output_dir == str(tmp_path)


def test_reward_input_ids_match_trl_tokenization(tiny_model_dir):
    from transformers import AutoTokenizer
    from trl.trainer.reward_trainer import RewardTrainer  # noqa: F401  (TRL is what we must agree with)

    from rlhf_trainer.reward_scoring import reward_input_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Review this film"}, {"role": "assistant", "content": "Lovely."}]
    expected = tok.apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert reward_input_ids(tok, "Review this film", "Lovely.", chat=True) == list(expected)
    plain = reward_input_ids(tok, "Q: ", "A", chat=False)
    assert plain[-1] == tok.eos_token_id
