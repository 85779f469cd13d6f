"""The PPO engine on tiny random models, in this process: it trains what it should and nothing else, LoRA keeps
one copy of each base model, and runs are reproducible on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import PROMPTS

from rlhf_api.spec import PPOSpec
from rlhf_trainer import models as hf_models
from rlhf_trainer.generation import encode_prompts, sample_responses
from rlhf_trainer.modeling import response_logprobs
from rlhf_trainer.padding import left_pad
from rlhf_trainer.ppo import distributed
from rlhf_trainer.ppo.models import load_models
from rlhf_trainer.ppo.rollout import episode_generators
from rlhf_trainer.ppo.trainer import PPOTrainer
from rlhf_trainer.stages.ppo import save_policy


def settings(**overrides) -> PPOSpec:
    base = {"prompts": {"uri": "builtin://movie-reviews/prompts-train"}, "batchSize": 4, "miniBatchSize": 2,
            "totalEpisodes": 8, "numPpoEpochs": 2, "learningRate": 1e-3, "seed": 7, "bf16": False,
            "generation": {"maxNewTokens": 10, "temperature": 1.0}}  # float32 on a GPU too, unless a test sets bf16
    return PPOSpec.model_validate({**base, **overrides})


def make_trainer(ppo_inputs, **overrides) -> PPOTrainer:
    sft, rm, spec = ppo_inputs
    s = settings(**overrides)
    torch.manual_seed(s.seed)
    world = distributed.init()
    return PPOTrainer(s, load_models(sft, rm, spec, s, world.device), PROMPTS, world)


def prompt_batch(trainer: PPOTrainer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts in the chat template, left-padded, on the trainer's device."""
    tok = trainer.models.tokenizer
    queries, mask = left_pad(encode_prompts(tok, prompts, True), tok.pad_token_id)
    return queries.to(trainer.device), mask.to(trainer.device)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_full_finetuning_trains_policy_and_value_only(ppo_inputs):
    trainer = make_trainer(ppo_inputs)
    models = trainer.models
    before = {role: snapshot(m) for role, m in
              [("policy", models.policy), ("reference", models.reference), ("value", models.value),
               ("reward", models.reward)]}
    history = trainer.train()

    assert len(history) == 2 and trainer.step == 2
    assert changed(before["policy"], models.policy) == set(before["policy"])  # every weight moved
    assert "classifier.score.weight" in changed(before["value"], models.value)
    assert not changed(before["reference"], models.reference) and not changed(before["reward"], models.reward)
    assert all(not p.requires_grad for m in (models.reference, models.reward) for p in m.parameters())
    for entry in history:
        assert all(math.isfinite(v) for v in entry.values()), entry
    # before the first update the policy is the reference (sampling-pass log-probs: float rounding only)
    assert abs(history[0]["objective/kl"]) < 1e-5
    assert history[1]["objective/kl"] != 0.0
    for key in ("objective/rm_score", "loss/policy", "loss/value", "policy/entropy", "policy/clipfrac",
                "policy/approxkl", "response/length", "response/eos_rate", "time/generate", "time/update",
                "throughput/tokens_per_s", "guardrail/kl_above_threshold"):
        assert key in history[-1]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_reward_model_of_fewer_layers_than_the_policy_scores_and_its_value_model_trains(ppo_inputs, tmp_path,
                                                                                          lora):
    """spec.reward.numLayers: R_phi keeps pi_SFT's first layers; PPO's reward and value models are that shape."""
    sft, _, spec = ppo_inputs
    tokenizer = hf_models.load_tokenizer(sft, spec)
    hf_models.save_plain(hf_models.load_sequence_classifier(sft, spec, tokenizer, num_layers=1), tokenizer,
                         tmp_path / "rm1")
    s = settings(lora={"enabled": lora, "r": 4, "alpha": 8})
    torch.manual_seed(s.seed)
    world = distributed.init()
    trainer = PPOTrainer(s, load_models(sft, tmp_path / "rm1", spec, s, world.device), PROMPTS, world)
    models = trainer.models

    def layers(module):
        return {n.split(".layers.")[1].split(".")[0] for n, _ in module.named_parameters() if ".layers." in n}

    with models.reward_model() as reward_model:
        assert layers(reward_model) == {"0"} and reward_model.config.num_hidden_layers == 1
    assert layers(models.value) == {"0"} and layers(models.policy) == {"0", "1"}
    before = snapshot(models.value)
    history = trainer.train()
    assert changed(before, models.value) and all(math.isfinite(v) for e in history for v in e.values())
    # the frozen reward model is still R_phi (under LoRA: the trained value model with its adapter off)
    from rlhf_trainer.reward_scoring import reward_scores

    plain = hf_models.load_sequence_classifier(tmp_path / "rm1", spec, tokenizer).to(trainer.device).eval()
    texts = ["A lovely, moving film.", "Dull."]
    with models.reward_model() as reward_model, torch.no_grad():
        got = reward_scores(reward_model, models.reward_tokenizer, PROMPTS[:2], texts, chat=True)
        expected = reward_scores(plain, models.reward_tokenizer, PROMPTS[:2], texts, chat=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_holds_one_copy_of_each_base_model(ppo_inputs, tmp_path):
    sft, rm, spec = ppo_inputs
    trainer = make_trainer(ppo_inputs, lora={"enabled": True, "r": 4, "alpha": 8})
    models = trainer.models
    assert models.reference is None and models.reward is None  # adapters disabled stand in for them

    def base_storages(module):
        return {p.data_ptr(): p.numel() for n, p in module.named_parameters() if "lora_" not in n
                and "modules_to_save" not in n}

    plain_policy = hf_models.load_causal_lm(sft, spec, models.tokenizer).to(trainer.device)
    plain_reward = hf_models.load_sequence_classifier(rm, spec, models.tokenizer)
    assert sum(base_storages(models.policy).values()) == sum(p.numel() for p in plain_policy.parameters())
    assert sum(base_storages(models.value).values()) == sum(p.numel() for p in plain_reward.parameters())
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    history = trainer.train()
    assert history[1]["objective/kl"] != 0.0
    # the reference (adapter disabled) is still exactly pi_SFT after training
    queries, mask = prompt_batch(trainer, PROMPTS[:2])
    with torch.no_grad():
        responses, logprobs = sample_responses(models.policy, queries, mask, trainer.settings.generation,
                                               stop_token_ids=trainer.stop_ids, pad_token_id=trainer.pad_id,
                                               generators=episode_generators(1, [0, 1], trainer.device))
        rollout = trainer.score_rollouts([0, 1], PROMPTS[:2], queries, mask, responses.clone(), logprobs.clone())[0]
        expected = response_logprobs(plain_policy, rollout, trainer.temperature)[0]
        # the sampling pass's log-probs are the policy's, as a full forward pass computes them
        torch.testing.assert_close(rollout.logprobs, response_logprobs(models.policy, rollout, trainer.temperature)[0],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollout.ref_logprobs, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rollout.logprobs, expected)

    # the output: a plain checkpoint with the adapter merged in, computing what the adapted policy computes
    from transformers import AutoModelForCausalLM

    save_policy(trainer, tmp_path / "merged", merge=True, base_uri=sft.as_uri(), base_dir=sft, spec=spec)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(trainer.device)
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(merged, rollout, trainer.temperature)[0], rollout.logprobs,
                                   atol=1e-5, rtol=1e-5)


def test_lora_under_bf16_keeps_the_frozen_base_in_bf16_and_merges_into_the_float32_weights(ppo_inputs, tmp_path):
    sft, rm, spec = ppo_inputs
    trainer = make_trainer(ppo_inputs, lora={"enabled": True, "r": 4, "alpha": 8}, bf16=True)
    models = trainer.models
    for net in (models.policy, models.value):
        dtypes = {n: p.dtype for n, p in net.named_parameters()}
        assert {d for n, d in dtypes.items() if "lora_" not in n and "modules_to_save" not in n} == {torch.bfloat16}
        # trained weights (adapters, the value model's score head) keep float32 master copies
        assert {p.dtype for p in net.parameters() if p.requires_grad} == {torch.float32}
    trainer.train()

    save_policy(trainer, tmp_path / "merged", merge=True, base_uri=sft.as_uri(), base_dir=sft, spec=spec)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(trainer.device)
    plain = hf_models.load_causal_lm(sft, spec, models.tokenizer).to(trainer.device)
    assert merged.dtype == torch.float32
    adapter = models.policy.get_base_model().model.layers[0].self_attn.q_proj
    delta = (adapter.lora_B["default"].weight @ adapter.lora_A["default"].weight) * adapter.scaling["default"]
    # pi_SFT's float32 weights plus the adapter's update, not the bf16-rounded copy training ran on
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight,
                               plain.model.layers[0].self_attn.q_proj.weight + delta.detach())
    unchanged = merged.model.layers[0].input_layernorm.weight
    assert torch.equal(unchanged, plain.model.layers[0].input_layernorm.weight)


def test_under_bf16_frozen_models_are_bf16_and_rollouts_sample_from_a_refreshed_bf16_copy(ppo_inputs):
    trainer = make_trainer(ppo_inputs, bf16=True)
    models = trainer.models
    assert {p.dtype for m in (models.reference, models.reward) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for m in (models.policy, models.value) for p in m.parameters()} == {torch.float32}
    # trained models use eager attention on CPU (its backward is the fast one under bf16), the sampler SDPA
    assert models.policy.config._attn_implementation == ("eager" if trainer.device.type == "cpu" else "sdpa")
    assert trainer.sampler.model.config._attn_implementation == "sdpa"

    history = trainer.train()
    assert all(math.isfinite(v) for entry in history for v in entry.values())
    copy = trainer.sampler.refreshed()
    for (name, mine), theirs in zip(copy.named_parameters(), models.policy.parameters()):
        assert mine.dtype == torch.bfloat16 and not mine.requires_grad
        assert torch.equal(mine, theirs.detach().to(torch.bfloat16)), name  # the trained weights, rounded
    plain = make_trainer(ppo_inputs, bf16=False)
    assert plain.sampler is None
    # in float32 SDPA's backward is as fast, and it keeps less for it than eager attention
    assert plain.models.policy.config._attn_implementation == "sdpa"
    assert make_trainer(ppo_inputs, bf16=True, lora={"enabled": True, "r": 4, "alpha": 8}).sampler is None


def test_after_sampling_from_the_bf16_copy_the_old_logprobs_are_the_trained_models_so_the_first_ratio_is_one(
        ppo_inputs):
    """The copy runs its norms and softmax in bfloat16, autocast over the trained weights in float32: their
    log-probabilities differ, and PPO's ratio must start at 1 for the model it updates."""
    trainer = make_trainer(ppo_inputs, bf16=True, numPpoEpochs=1, miniBatchSize=4, totalEpisodes=4)
    seen = {}
    rollout, make_experience = trainer.rollout, trainer.make_experience

    def sampling(*args):
        responses, logprobs = rollout(*args)
        seen["sampled"] = logprobs.clone()
        return responses, logprobs

    def experience(*args):
        seen["experience"] = make_experience(*args)
        return seen["experience"]

    trainer.rollout, trainer.make_experience = sampling, experience
    [metrics] = trainer.train()
    old, mask = seen["experience"].logprobs, seen["experience"].mask
    sampled = seen["sampled"][:, :old.shape[1]] * mask
    assert (sampled - old).abs().max() > 1e-4  # the copy's log-probabilities are not the trained model's
    assert metrics["policy/approxkl"] < 1e-9  # one mini-batch, one epoch: the update saw ratios of 1


def test_on_a_bf16_gpu_trained_weights_stay_float32_and_bf16_false_loads_nothing_in_bf16_gpu_simulated(
        ppo_inputs, monkeypatch):
    """The dtype decisions load_models makes on a GPU with bfloat16, the GPU simulated (torch.cuda answers as an
    Ampere GPU would while the models load on this CPU). dtype auto once meant bfloat16 there for every weight: with
    bf16 false, LoRA's float32 value head then met its bfloat16 base (a dtype error in the first step)."""
    sft, rm, spec = ppo_inputs
    world = distributed.init()

    def load(**overrides):
        with monkeypatch.context() as gpu:
            gpu.setattr(torch.cuda, "is_available", lambda: True)
            gpu.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
            s = settings(**{"bf16": None, **overrides})  # unset: bfloat16 on such a GPU
            return s, load_models(sft, rm, spec, s, world.device)

    _, models = load()
    assert {p.dtype for m in (models.policy, models.value) for p in m.parameters()} == {torch.float32}
    assert {p.dtype for m in (models.reference, models.reward) for p in m.parameters()} == {torch.bfloat16}

    s, models = load(bf16=False, lora={"enabled": True, "r": 4, "alpha": 8})
    assert {p.dtype for m in (models.policy, models.value) for p in m.parameters()} == {torch.float32}
    torch.manual_seed(s.seed)
    history = PPOTrainer(s, models, PROMPTS, world).train()  # on this CPU, as bf16 false runs on the GPU
    assert all(math.isfinite(v) for entry in history for v in entry.values())


def test_seeded_runs_are_identical_on_cpu(ppo_inputs):
    def run():
        return [{k: v for k, v in entry.items() if not k.startswith(("time/", "throughput/"))}
                for entry in make_trainer(ppo_inputs).train()]

    assert run() == run()


def test_gradient_accumulation_gives_the_gradient_of_the_whole_mini_batch(ppo_inputs, monkeypatch):
    """One mini-batch per epoch: the value model's rollout pass is also its first update, one micro-batch at a
    time. The same weights and losses come out with one micro-batch or two, and with the update running a
    forward pass of its own."""
    from rlhf_trainer.ppo import trainer as trainer_module

    value_forwards: list[int] = []  # rollouts per forward pass of the value model
    response_values = trainer_module.response_values
    monkeypatch.setattr(trainer_module, "response_values", lambda model, rollout: (
        value_forwards.append(len(rollout.lengths)) or response_values(model, rollout)))
    runs = []
    for accumulation, shared in ((1, True), (2, True), (2, False)):
        value_forwards.clear()
        trainer = make_trainer(ppo_inputs, totalEpisodes=8, numPpoEpochs=2, miniBatchSize=4,
                               gradientAccumulationSteps=accumulation)
        assert trainer.value_pass_trains  # one mini-batch per epoch
        trainer.value_pass_trains = shared  # not shared: the first update runs a value forward pass of its own
        history = trainer.train()
        # 2 steps of 2 epochs over 4 rollouts; the rollout pass is the first epoch's or a pass of its own
        assert value_forwards == [4 // accumulation] * accumulation * 2 * (2 if shared else 3)
        runs.append((snapshot(trainer.models.policy), snapshot(trainer.models.value), history[-1]))
    (policy, value, metrics) = runs[0]
    for other_policy, other_value, other_metrics in runs[1:]:
        for before, after in ((policy, other_policy), (value, other_value)):
            for name, weight in before.items():
                torch.testing.assert_close(after[name], weight, atol=1e-6, rtol=1e-5, msg=name)
        for name in ("loss/value", "loss/policy", "val/grad_norm", "val/mean"):
            assert other_metrics[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-7), name
        # the fraction of tokens whose value moved further than cliprangeValue in the second epoch: a token on that
        # boundary may flip with the micro-batches' rounding (on an Intel Xeon with AMX: 0.0125 against 0.0 while
        # the weights agreed), so it may differ by a token or two
        assert other_metrics["val/clipfrac"] == pytest.approx(metrics["val/clipfrac"], abs=0.025)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_trains_the_same_weights_keeping_less_for_the_backward_pass(ppo_inputs, lora):
    from rlhf_trainer.ppo.models import response_values

    runs = []
    for checkpointing in (False, True):
        trainer = make_trainer(ppo_inputs, totalEpisodes=4, gradientCheckpointing=checkpointing,
                               lora={"enabled": lora, "r": 4, "alpha": 8})
        history = trainer.train()
        queries, mask = prompt_batch(trainer, PROMPTS[:2])
        responses, logprobs = sample_responses(trainer.models.policy, queries, mask, trainer.settings.generation,
                                               stop_token_ids=trainer.stop_ids, pad_token_id=trainer.pad_id,
                                               generators=episode_generators(0, [0, 1], trainer.device))
        rollout = trainer.score_rollouts([0, 1], PROMPTS[:2], queries, mask, responses, logprobs)[0]
        saved = []  # bytes the value model's forward pass keeps for its backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            response_values(trainer.value.model, rollout)
        runs.append((snapshot(trainer.models.policy), snapshot(trainer.models.value), history[-1], sum(saved)))
    (policy, value, metrics, saved), (policy_ck, value_ck, metrics_ck, saved_ck) = runs
    for before, after in ((policy, policy_ck), (value, value_ck)):
        for name, weight in before.items():
            torch.testing.assert_close(after[name], weight, atol=1e-6, rtol=1e-5)
    assert metrics_ck["loss/policy"] == pytest.approx(metrics["loss/policy"], rel=1e-5, abs=1e-7)
    assert saved_ck < saved / 2


def test_a_rollout_does_not_depend_on_its_batch(ppo_inputs):
    """Each episode samples from its own generator: one process or two give the same responses."""
    trainer = make_trainer(ppo_inputs)
    gen = trainer.settings.generation.model_copy(update={"max_new_tokens": 16})

    def sample(prompts, episodes):
        queries, mask = prompt_batch(trainer, prompts)
        out, _ = sample_responses(trainer.models.policy, queries, mask, gen, stop_token_ids=trainer.stop_ids,
                                  pad_token_id=trainer.pad_id,
                                  generators=episode_generators(3, episodes, trainer.device))
        return [row[row != trainer.pad_id].tolist() for row in out]

    together = sample(PROMPTS[:4], [0, 1, 2, 3])
    assert together == sample(PROMPTS[:2], [0, 1]) + sample(PROMPTS[2:4], [2, 3])
    assert together != sample(PROMPTS[:4], [4, 5, 6, 7])  # other episodes, other samples


def test_a_stop_request_ends_sampling_early_and_leaves_the_state_of_the_last_step(ppo_inputs):
    from rlhf_trainer.ppo.trainer import Stopped

    trainer = make_trainer(ppo_inputs)
    before = snapshot(trainer.models.policy)
    saved = []
    trainer.stop_requested = True  # as the SIGTERM handler sets it
    with pytest.raises(Stopped, match="before its update"):
        trainer.train(checkpoint=lambda t: saved.append(t.step))
    assert saved == [0] and trainer.step == 0 and not trainer.history
    assert not changed(before, trainer.models.policy)


def test_reward_scores_read_each_text_at_its_last_token_when_batched(ppo_inputs):
    """Right padding in a batch of texts of different lengths changes no score (PPO's reward model is the value
    model's classifier with its adapter off under LoRA; plain here)."""
    from rlhf_trainer.reward_scoring import reward_scores, score

    trainer = make_trainer(ppo_inputs)
    responses = ["A lovely, moving film.", "Dull.", "An awful mess from start to finish."]
    with trainer.models.reward_model() as reward_model, torch.no_grad():
        batched = reward_scores(reward_model, trainer.models.reward_tokenizer, PROMPTS[:3], responses, chat=True,
                                batch_size=3)
        alone = [reward_scores(reward_model, trainer.models.reward_tokenizer, [p], [r], chat=True, batch_size=1)
                 for p, r in zip(PROMPTS[:3], responses)]
        # the stages' scoring batches texts in order of length (two batches here) and answers in input order
        listed = score(reward_model, trainer.models.reward_tokenizer, PROMPTS[:3], responses, chat=True, batch_size=2)
    assert batched.shape == (3,) and len(set(batched.tolist())) == 3
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert listed == pytest.approx(batched.tolist(), abs=1e-5)


def test_reward_scores_of_several_answers_to_a_prompt_read_it_once_and_equal_each_answer_scored_alone(ppo_inputs):
    """The evaluate stage scores four answers per prompt: a prompt's answers share a batch, which reads the prompt
    (and the first words they share) once; every score equals that of the answer alone."""
    from rlhf_trainer.reward_scoring import prompt_group_batches, reward_scores, score

    trainer = make_trainer(ppo_inputs)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    responses = ["A lovely, moving film.", "Dull.", "A lovely mess.", "An awful mess from start to finish.",
                 "Dull and slow, far too long.", "Fine."]
    assert prompt_group_batches(prompts, [[0]] * 6, batch_size=4, by_length=False) == [[[0, 2, 3]], [[1, 4], [5]]]
    with trainer.models.reward_model() as reward_model, torch.no_grad():
        alone = torch.cat([reward_scores(reward_model, trainer.models.reward_tokenizer, [p], [r], chat=True,
                                         batch_size=1) for p, r in zip(prompts, responses)])
        grouped = reward_scores(reward_model, trainer.models.reward_tokenizer, prompts, responses, chat=True,
                                batch_size=4)
        listed = score(reward_model, trainer.models.reward_tokenizer, prompts, responses, chat=True, batch_size=3)
    assert len(set(alone.tolist())) == 6
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-5)
    assert listed == pytest.approx(alone.tolist(), abs=1e-5)


def test_ppo_scores_its_rollouts_in_the_same_passes_on_every_process_whatever_their_prompts(ppo_inputs, monkeypatch):
    """Under ZeRO-3 each forward pass gathers its weights in collectives, so every process must run the same passes:
    PPO's reward scoring never groups rollouts by prompt (a prompt repeated on one process would change its
    batches, and a shared-prefix batch is two passes, not one)."""
    from rlhf_trainer.ppo import trainer as trainer_module
    from rlhf_trainer.reward_scoring import prompt_group_batches

    sequences = [[1, 2, 3]] * 6
    repeated, distinct = [PROMPTS[0]] * 3 + PROMPTS[1:4], PROMPTS[:6]
    plain = [prompt_group_batches(p, sequences, 4, by_length=False, group_prompts=False) for p in (repeated, distinct)]
    assert plain[0] == plain[1] == [[[0], [1], [2], [3]], [[4], [5]]]
    assert prompt_group_batches(repeated, sequences, 4, by_length=False) != plain[0]  # grouped: depends on prompts

    calls = []
    scores = trainer_module.reward_scores
    monkeypatch.setattr(trainer_module, "reward_scores", lambda *args, **kwargs: calls.append(kwargs) or scores(
        *args, **kwargs))
    make_trainer(ppo_inputs, totalEpisodes=4, batchSize=4, miniBatchSize=4).train()
    assert calls and all(call["group_prompts"] is False for call in calls)


@pytest.mark.slow
def test_deepspeed_zero3_with_lora_in_one_process_matches_plain_pytorch_in_float32_and_under_bf16(ppo_inputs,
                                                                                                  monkeypatch):
    """Under bf16 the DeepSpeed engine runs its own mixed precision (bfloat16 weights, LoRA's and the score head's
    included, float32 masters in the optimizer); plain PyTorch runs autocast over float32 weights. Both precisions in
    one process group: DeepSpeed keeps the first group it saw for the life of the process, as a stage process has
    one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # restored after the test
    sft, rm, spec = ppo_inputs
    results = {}
    try:
        for bf16 in (False, True):
            for zero_stage in (0, 3):
                s = settings(totalEpisodes=4, lora={"enabled": True, "r": 4, "alpha": 8}, bf16=bf16,
                             distributed={"zeroStage": zero_stage})
                world = distributed.init(always_group=True)
                torch.manual_seed(s.seed)
                trainer = PPOTrainer(s, load_models(sft, rm, spec, s, world.device), PROMPTS, world)
                results[bf16, zero_stage] = trainer.train()[-1]
    finally:
        distributed.shutdown()
    for bf16, tolerance in ((False, dict(rel=1e-4, abs=1e-6)), (True, dict(rel=2e-2, abs=1e-4))):
        plain, zero3 = results[bf16, 0], results[bf16, 3]
        for key in ("objective/rm_score", "loss/policy", "loss/value", "policy/entropy"):
            assert zero3[key] == pytest.approx(plain[key], **tolerance), (bf16, key)
    assert results[True, 3]["loss/value"] != results[False, 3]["loss/value"]  # bf16 did compute in bfloat16


def test_adamw_with_its_moments_allocated_up_front_steps_exactly_as_torch_allocating_them_lazily():
    from rlhf_trainer.ppo.learner import adamw

    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    runs = []
    for eager in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = adamw(params, lr=0.1, eager_state=eager)
        assert bool(optimizer.state) == eager  # the moments exist before the first step only when eager
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        runs.append(([p.detach() for p in params], optimizer.state_dict()))
    (lazy, lazy_state), (eager, eager_state) = runs
    assert all(torch.equal(a, b) for a, b in zip(lazy, eager))
    for a, b in zip(lazy_state["state"].values(), eager_state["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
