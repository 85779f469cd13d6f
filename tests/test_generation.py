"""Sampling on the tiny model: reproducible per answer whatever the batch, one forward pass per sampled token, and
log-probabilities equal to a plain forward pass."""

from __future__ import annotations

import pytest
import torch

from rlhf_api.spec import ModelSpec
from rlhf_trainer.generation import Sample
from rlhf_trainer.models import load_tokenizer


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
        return sample_responses(model, queries, mask, gen, stop_token_ids=[stop], pad_token_id=tok.pad_token_id,
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


def test_a_response_ends_at_the_first_of_several_stop_tokens_and_they_default_to_the_models_own(tiny_model_dir):
    from rlhf_api.spec import GenerationSpec
    from rlhf_trainer.errors import ConfigError
    from rlhf_trainer.generation import encode_prompts, sample_responses, stop_token_ids
    from rlhf_trainer.models import load_causal_lm
    from rlhf_trainer.padding import left_pad
    from rlhf_trainer.ppo.functional import truncate_at_stop
    from rlhf_trainer.seeding import generator

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)
    model = load_causal_lm(tiny_model_dir, spec, tok).eval()
    queries, mask = left_pad(encode_prompts(tok, ["Review a heist film", "Review a musical"] * 3, True),
                             tok.pad_token_id)

    def decode(stops):
        return sample_responses(model, queries, mask, GenerationSpec(maxNewTokens=12, temperature=1.0),
                                stop_token_ids=stops, pad_token_id=tok.pad_token_id,
                                generators=[generator(3, "stops", i) for i in range(6)])[0].tolist()

    free = decode([-1])  # nothing stops: two tokens the rows sample at different steps become the stop tokens
    first, second = free[0][3], free[1][2]
    ends = [min([k for k, t in enumerate(row) if t in (first, second)] or [len(row) - 1]) for row in free]
    stopped = decode([first, second])
    assert [row[:end + 1] for row, end in zip(stopped, ends)] == [row[:end + 1] for row, end in zip(free, ends)]
    assert all(all(t == tok.pad_token_id for t in row[end + 1:]) for row, end in zip(stopped, ends))
    truncated, lengths, _ = truncate_at_stop(torch.tensor(free), [first, second], tok.pad_token_id)
    assert lengths.tolist() == [end + 1 for end in ends] and truncated.tolist() == stopped

    model.generation_config.eos_token_id = [tok.eos_token_id, first]  # e.g. Llama 3 instruct: two end tokens
    assert stop_token_ids(model, tok) == [tok.eos_token_id, first]
    assert stop_token_ids(model, tok, [tok.convert_ids_to_tokens(second)]) == [second]
    with pytest.raises(ConfigError, match=r"spec.ppo.stopTokens: 'no such token' is not one token"):
        stop_token_ids(model, tok, ["no such token"], field="spec.ppo.stopTokens")
