"""Small pure pieces of the trainer against hand-computed values and plain torch."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rlhf_api.spec import ModelSpec, RewardSpec, SFTSpec
from rlhf_trainer import models as trainer_models
from rlhf_trainer.cli import main as train_main
from rlhf_trainer.data import builtin_dataset_path, read_rows, require_fields
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.generation import Sample
from rlhf_trainer.hf_training import training_args
from rlhf_trainer.judges import make_judge
from rlhf_trainer.modeling import sequences
from rlhf_trainer.models import load_tokenizer, quantization_config
from rlhf_trainer.padding import group_rows, index_batches
from rlhf_trainer.stages.evaluate import mean_kl_per_token, rm_pair_accuracy, win_rate
from rlhf_trainer.stages.preferences import make_pairs
from rlhf_trainer.stages.reward import margin, score_std


def test_best_worst_pairs_keep_one_pair_per_prompt_above_the_margin():
    scored = {
        "p1": [("good", 0.9), ("meh", 0.1), ("bad", -0.8)],
        "p2": [("a", 0.30), ("b", 0.25)],  # margin 0.05 < 0.1: dropped
        "p3": [("same", 0.5), ("same", 0.5)],  # identical responses teach nothing
    }
    pairs = make_pairs(scored, "best_worst", 0.1)
    assert pairs == [{"prompt": "p1", "chosen": "good", "rejected": "bad", "chosen_score": 0.9,
                      "rejected_score": -0.8}]


def test_all_pairs():
    pairs = make_pairs({"p": [("x", 1.0), ("y", 0.0), ("z", 0.5)]}, "all", 0.3)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x", "z"), ("x", "y"), ("z", "y")]


def test_score_margin_scales_the_judge_score_difference_and_needs_scores():
    pair = {"prompt": "p", "chosen": "good", "rejected": "bad", "chosen_score": 0.75, "rejected_score": -0.25}
    assert margin(pair, 0.5) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="scoreMargin.*chosen_score"):
        margin({"prompt": "p", "chosen": "good", "rejected": "bad"}, 1.0)


def test_score_normalization_divides_by_the_population_std_and_refuses_one_score_for_all():
    assert score_std([1.0, 3.0, 1.0, 3.0]) == pytest.approx(1.0)
    assert score_std([0.0, 4.0]) == pytest.approx(2.0)
    for scores in ([0.7, 0.7, 0.7], [0.7]):
        with pytest.raises(ConfigError, match="normalizeScores.*one score"):
            score_std(scores)


def test_a_resumed_attempts_log_replaces_the_interrupted_ones_steps(tmp_path):
    from rlhf_trainer.plots import read_log

    log = tmp_path / "trainer_log.jsonl"
    steps = [5, 10, 15, 5, 10, 15, 20, 20]  # an attempt died after step 15; the next restarted from step 0
    log.write_text("".join(json.dumps({"step": s, "loss": i}) + "\n" for i, s in enumerate(steps)))
    assert [(e["step"], e["loss"]) for e in read_log(log)] == [(5, 3), (10, 4), (15, 5), (20, 6), (20, 7)]


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 0.9, -1.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_rm_pair_accuracy_compares_answers_to_the_same_prompt_only():
    prompts = ["p", "p", "p", "q", "q", "r"]
    judge = [0.9, 0.1, 0.1, 0.5, -0.5, 0.7]
    rm = [2.0, 1.0, 3.0, 0.0, 0.0, -9.0]
    # p: (0.9 vs 0.1) rm 2 > 1 agrees; (0.9 vs 0.1) rm 2 < 3 disagrees; (0.1 vs 0.1) judge tie: not a pair.
    # q: rm tie counts half. r: one answer, no pair; the rm scores across prompts are never compared.
    assert rm_pair_accuracy(prompts, judge, rm) == pytest.approx((1 + 0 + 0.5) / 3)
    assert rm_pair_accuracy(["p", "p", "q"], [0.2, 0.2, 0.4], [1.0, 2.0, 3.0]) is None


def test_mean_kl_per_token_weights_tokens_not_sequences():
    policy = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5])]
    ref = [torch.tensor([-1.5, -2.0, -2.0]), torch.tensor([-1.5])]
    # differences: 0.5, 0, -1, 1 -> mean over 4 tokens
    assert mean_kl_per_token(policy, ref) == pytest.approx(0.5 / 4 + 0 - 1 / 4 + 1 / 4)


def test_sequences_left_pad_prompts_and_right_pad_responses():
    batch = sequences([[5, 6], [9]], [[7, 8], [10]], pad_token_id=0)
    assert batch.queries.tolist() == [[5, 6], [0, 9]] and batch.query_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.responses.tolist() == [[7, 8], [10, 0]] and batch.mask.tolist() == [[True, True], [True, False]]
    ids, attention, positions = batch.input_ids()
    assert ids.tolist() == [[5, 6, 7, 8], [0, 9, 10, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert positions[:, :3].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_group_rows_keeps_first_appearance_order():
    assert group_rows(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]
    assert group_rows([]) == []


def test_index_batches_in_input_order_or_sorted_by_a_key_stably():
    assert index_batches(5, 2) == [[0, 1], [2, 3], [4]]
    lengths = [7, 3, 9, 3, 1]
    assert index_batches(5, 2, key=lengths.__getitem__) == [[4, 1], [3, 0], [2]]  # equal lengths: 1 before 3


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_logprobs_match_plain_log_softmax(tiny_model_dir, temperature):
    """Log-probabilities of the temperature-scaled distribution, as sampling at that temperature draws from."""
    from transformers import AutoModelForCausalLM

    from rlhf_trainer.stages.evaluate import sample_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = [Sample("c", [3], [4, 5, 6, 7], "", False), Sample("a", [3, 4, 5], [6, 7], "", False),
               Sample("b", [8], [9, 10, 11], "", False)]
    got = sample_logprobs(model, samples, pad_token_id=0, temperature=temperature, batch_size=2)  # [a, b], [c]
    for sample, logps in zip(samples, got):  # one unpadded sequence at a time, full log_softmax
        seq = torch.tensor([sample.prompt_ids + sample.response_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(seq).logits[0, :-1].float() / temperature, dim=-1)
        targets = seq[0, 1:]
        expected = full.gather(-1, targets[:, None])[:, 0][-len(sample.response_ids):]
        torch.testing.assert_close(logps, expected, atol=1e-4, rtol=1e-4)
    if temperature != 1.0:  # the scaling is not a no-op on this model
        assert not torch.allclose(got[0], sample_logprobs(model, samples, 0, temperature=1.0)[0], atol=1e-3)


def test_sampled_answers_depend_on_seed_and_index_not_on_the_batch(tiny_model_dir):
    """The stages' sampler (preferences, evaluate): one generator per answer, so batching changes nothing."""
    from rlhf_api.spec import GenerationSpec
    from rlhf_trainer.generation import sample
    from rlhf_trainer.models import load_causal_lm

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)  # adds its own pad token, as the stages load it
    model = load_causal_lm(tiny_model_dir, spec, tok).eval()
    gen = GenerationSpec(maxNewTokens=12, temperature=1.0)
    prompts = ["Review a heist film", "Review a ghost story set in a lighthouse", "Review a heist film"]
    one_by_one = sample(model, tok, prompts, gen, batch_size=1, seed=3)
    batched = sample(model, tok, prompts, gen, batch_size=3, seed=3)
    assert batched == one_by_one
    assert batched[0].response_ids != batched[2].response_ids  # the same prompt twice: two draws
    assert sample(model, tok, prompts, gen, batch_size=3, seed=4) != batched
    for answer, prompt in zip(batched, prompts):
        assert answer.prompt == prompt and 0 < len(answer.response_ids) <= 12
        assert answer.has_eos == (tok.eos_token_id in answer.response_ids)
        assert tok.pad_token_id not in answer.response_ids[:-1]
        assert answer.text == tok.decode(answer.response_ids, skip_special_tokens=True).strip()


def test_sampling_runs_one_forward_pass_per_sampled_token(tiny_model_dir):
    """The prompt's pass samples the first token, each cached pass the next: none for a token never sampled."""
    from rlhf_api.spec import GenerationSpec
    from rlhf_trainer.generation import sample
    from rlhf_trainer.models import load_causal_lm

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)
    model = load_causal_lm(tiny_model_dir, spec, tok).eval()
    passes = []
    model.register_forward_hook(lambda module, args, kwargs, out: passes.append(kwargs["input_ids"].shape[1]),
                                with_kwargs=True)
    answers = sample(model, tok, ["Review a heist film", "Review a musical"], GenerationSpec(maxNewTokens=6),
                     batch_size=2, seed=1)
    longest = max(len(a.response_ids) for a in answers)
    assert longest == 6  # an answer ran to maxNewTokens: where a spare pass would come
    assert passes[0] > 1 and passes[1:] == [1] * (longest - 1)


def test_a_reward_model_of_the_first_layers_keeps_their_weights_and_too_many_layers_name_the_field(tiny_model_dir,
                                                                                                    tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_trainer.models import load_causal_lm, load_sequence_classifier, save_plain
    from rlhf_trainer.stages.reward import backbone_layers

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)
    lm = load_causal_lm(tiny_model_dir, spec, tok)
    rm = load_sequence_classifier(tiny_model_dir, spec, tok, num_layers=1, zero_new_head=True)
    assert len(rm.model.layers) == 1 and rm.config.num_hidden_layers == 1
    for name, weight in rm.model.named_parameters():
        expected = lm.model.get_parameter(name)
        if name == "embed_tokens.weight":  # but the row of the pad token load_tokenizer added: drawn afresh
            weight, expected = weight[:tok.pad_token_id], expected[:tok.pad_token_id]
        torch.testing.assert_close(weight, expected, atol=0, rtol=0)
    save_plain(rm, tok, tmp_path / "rm")
    assert len(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").model.layers) == 1

    assert backbone_layers(tiny_model_dir, 2, spec) == 2 and backbone_layers(tiny_model_dir, None, spec) is None
    with pytest.raises(ConfigError, match=r"spec.reward.numLayers is 3 but the backbone has 2 .* at most 2"):
        backbone_layers(tiny_model_dir, 3, spec)


def test_distinct_rows_find_repeated_prompts_with_their_padding():
    from rlhf_trainer.generation import distinct_rows

    queries = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [5, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    firsts, copies = distinct_rows(queries, mask)
    assert sorted(firsts.tolist()) == [0, 1, 4]  # each prompt's first row
    assert torch.equal(queries[firsts][copies], queries) and torch.equal(mask[firsts][copies], mask)
    padded_alike = torch.tensor([[0, 5, 6], [0, 5, 6]])  # the same ids, but pad id 0 is a real token in one
    assert distinct_rows(padded_alike, torch.tensor([[0, 1, 1], [1, 1, 1]]))[0] is None
    assert distinct_rows(queries[:2], mask[:2])[0] is None


def test_a_batch_decodes_a_repeated_prompt_once_and_drops_rows_that_stopped(tiny_model_dir):
    """Each answer equals the one its row samples alone, while the passes shrink: one prompt pass per distinct
    prompt, and a row that sampled the stop token is in no later pass."""
    from rlhf_api.spec import GenerationSpec
    from rlhf_trainer.generation import encode_prompts, sample_responses
    from rlhf_trainer.models import load_causal_lm
    from rlhf_trainer.padding import left_pad
    from rlhf_trainer.seeding import generator

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)
    model = load_causal_lm(tiny_model_dir, spec, tok).eval()
    prompts = ["Review a heist film", "Review a musical", "Review a heist film", "Review a heist film"]
    gen = GenerationSpec(maxNewTokens=10, temperature=1.0)
    ids = encode_prompts(tok, prompts, True)

    def decode(rows, stop):
        queries, mask = left_pad([ids[i] for i in rows], tok.pad_token_id)
        return sample_responses(model, queries, mask, gen, stop_token_id=stop, pad_token_id=tok.pad_token_id,
                                generators=[generator(9, "test", i) for i in rows])

    free, _ = decode(range(4), stop=-1)  # no row stops: pick a stop token some rows sample early, others never
    stop = free[0, 2].item()
    assert any(stop not in row for row in free.tolist())
    passes = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: passes.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)
    together, logprobs = decode(range(4), stop)
    hook.remove()
    for i in range(4):
        alone, alone_logprobs = decode([i], stop)
        n = alone.shape[1]
        assert together[i, :n].tolist() == alone[0].tolist() and (together[i, n:] == tok.pad_token_id).all()
        torch.testing.assert_close(logprobs[i, :n], alone_logprobs[0], atol=1e-5, rtol=1e-5)
        assert (logprobs[i, n:] == 0).all()
    lengths = [row.index(stop) + 1 if stop in row else len(row) for row in together.tolist()]
    assert passes[0][0] == 2  # two distinct prompts
    assert [rows for rows, _ in passes[1:]] == [sum(n > t for n in lengths) for t in range(1, max(lengths))]
    assert min(lengths) < max(lengths)  # a row left the batch early


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_forward_pass_over_the_answers(tiny_model_dir, temperature):
    """The evaluate stage reads the policy's log-probabilities from its sampling pass, not a second forward pass."""
    from rlhf_api.spec import GenerationSpec
    from rlhf_trainer.generation import sample
    from rlhf_trainer.models import load_causal_lm
    from rlhf_trainer.stages.evaluate import sample_logprobs

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)
    model = load_causal_lm(tiny_model_dir, spec, tok).eval()
    prompts = ["Review a heist film", "Review a ghost story set in a lighthouse", "Review a musical"]
    answers = sample(model, tok, prompts, GenerationSpec(maxNewTokens=12, temperature=temperature), batch_size=3,
                     seed=5)
    forward = sample_logprobs(model, answers, tok.pad_token_id, temperature)
    for answer, expected in zip(answers, forward):
        assert len(answer.logprobs) == len(answer.response_ids) > 0
        torch.testing.assert_close(torch.tensor(answer.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert len({len(a.prompt_ids) for a in answers}) == 3  # left-padded prompts of three lengths


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


@pytest.mark.parametrize("native", [False, True], ids=["cpu-without-bf16-simulated", "cpu-with-bf16-simulated"])
def test_bf16_set_where_the_cpu_emulates_bfloat16_is_obeyed_with_one_warning_naming_the_field(native, monkeypatch,
                                                                                              capsys):
    # The CPU's instruction set is the boundary simulated here: this machine has one kind or the other (and no GPU).
    monkeypatch.setattr(trainer_models, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer_models._warn_once.cache_clear()
    assert [trainer_models.bf16_enabled(True, "spec.sft.bf16") for _ in range(2)] == [True, True]
    assert trainer_models.bf16_enabled(False, "spec.reward.bf16") is False
    assert trainer_models.bf16_enabled(None, "spec.reward.bf16") is native  # unset: where the hardware has it
    warnings_printed = capsys.readouterr().err.splitlines()
    if native:
        assert warnings_printed == []
    else:
        assert len(warnings_printed) == 1
        assert "spec.sft.bf16 is true" in warnings_printed[0] and "set it false" in warnings_printed[0]


def test_cpu_bf16_detection_follows_the_override_variable_and_rejects_other_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, as in CI
    detect = trainer_models.cpu_has_native_bf16
    try:
        for value, expected in (("1", True), ("0", False)):
            monkeypatch.setenv("RLHF_CPU_BF16", value)
            detect.cache_clear()
            assert detect() is expected
            assert trainer_models.bf16_enabled(None, "spec.ppo.bf16") is expected
        monkeypatch.setenv("RLHF_CPU_BF16", "yes")
        detect.cache_clear()
        with pytest.raises(ConfigError, match="RLHF_CPU_BF16='yes'.* 0 .* or 1"):
            detect()
    finally:
        monkeypatch.undo()
        detect.cache_clear()


def test_tokenizer_gets_a_pad_token_distinct_from_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, ModelSpec(uri=tiny_model_dir.as_uri()))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_a_new_score_head_starts_at_zero_and_a_trained_one_is_kept(tiny_model_dir, tmp_path):
    from rlhf_trainer.models import load_sequence_classifier, save_plain

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tokenizer = load_tokenizer(tiny_model_dir, spec)
    random_head = load_sequence_classifier(tiny_model_dir, spec, tokenizer)
    assert random_head.score.weight.abs().sum() > 0  # what transformers initialises a missing head to
    zero_head = load_sequence_classifier(tiny_model_dir, spec, tokenizer, zero_new_head=True)
    assert torch.count_nonzero(zero_head.score.weight) == 0
    ids = tokenizer(["a b c", "d e"], return_tensors="pt", padding=True)
    assert torch.equal(zero_head(**ids).logits, torch.zeros(2, 1))

    save_plain(random_head, tokenizer, tmp_path / "rm")  # a reward model: its head is trained, not new
    reloaded = load_sequence_classifier(tmp_path / "rm", spec, tokenizer, zero_new_head=True)
    assert torch.equal(reloaded.score.weight, random_head.score.weight)


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


def test_vader_judge_orders_sentiment():
    judge = make_judge("vader")
    good, bad = judge.score(["p", "p"], ["A wonderful, moving film.", "A dull, awful mess."])
    assert good > 0.5 and bad < -0.5


def test_quantization_on_cpu_is_a_configuration_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only node, also on a GPU machine
    spec = ModelSpec.model_validate({"uri": "builtin://smollm2-135m-instruct", "quantization": {"bits": 4}})
    with pytest.raises(ConfigError, match="quantization.bits=4 needs a CUDA GPU"):
        quantization_config(spec)


def test_quantization_without_bitsandbytes_names_the_image_that_has_it_gpu_simulated(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU is the boundary simulated here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    spec = ModelSpec.model_validate({"uri": "builtin://smollm2-135m-instruct", "quantization": {"bits": 8}})
    with pytest.raises(ConfigError, match="bits=8 loads weights with bitsandbytes.*CUDA trainer image"):
        quantization_config(spec)


def test_builtin_and_file_datasets(tmp_path):
    rows = read_rows(builtin_dataset_path("builtin://movie-reviews/prompts-eval"))
    assert len(rows) == 60 and rows[0]["prompt"].startswith("Write a one-sentence movie review")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        read_rows(bad)
    with pytest.raises(ConfigError, match="row 1 has no text field 'completion'"):
        require_fields([{"prompt": "x"}], ("prompt", "completion"), "d.jsonl")
    with pytest.raises(ConfigError, match="unknown builtin dataset"):
        builtin_dataset_path("builtin://movie-reviews/nope")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": "r"}]), path)
    assert read_rows(path) == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


def test_rlhf_train_exit_codes(tmp_path, capsys):
    from rlhf_api.entrypoint import EXIT_CONFIG_ERROR
    from rlhf_api.spec import Stage
    from rlhf_api.stage_config import build_stage_config
    from rlhf_operator.loading import parse_pipeline

    doc = parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                          "metadata": {"name": "x"},
                          "spec": {"model": {"uri": "builtin://smollm2-135m-instruct"},
                                   "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}}}})
    config = tmp_path / "sft.json"
    config.write_text(build_stage_config(doc, Stage.SFT, (tmp_path / "store").as_uri()).to_json())
    assert train_main(["sft", "--config", str(config), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["dryRun"] is True
    assert train_main(["reward", "--config", str(config)]) == EXIT_CONFIG_ERROR  # config for another stage
    assert "the config is for stage sft" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{}")
    assert train_main(["sft", "--config", str(tmp_path / "broken.json")]) == EXIT_CONFIG_ERROR
    ppo = build_stage_config(doc, Stage.PPO, (tmp_path / "store").as_uri())
    (tmp_path / "ppo.json").write_text(ppo.to_json())
    assert train_main(["ppo", "--config", str(tmp_path / "ppo.json"), "--workspace", str(tmp_path / "ws")]) \
        == EXIT_CONFIG_ERROR
    assert "spec.ppo.prompts is required" in capsys.readouterr().err  # checked before any model is loaded
    assert not (tmp_path / "store").exists()  # nothing was published


def test_a_second_process_on_a_one_gpu_node_is_refused_naming_the_fix_gpu_simulated(monkeypatch):
    """NCCL needs a GPU per process; two on one GPU would fail later with "Duplicate GPU detected". The GPU is the
    boundary simulated here (torch.cuda says one is present); the check runs before any CUDA call."""
    from rlhf_trainer.ppo import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1, but this node has 1 GPU.*spec\.ppo\.resources\.limits"):
        distributed.init()
