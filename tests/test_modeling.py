"""The log-probabilities PPO and the evaluate stage take from a model are those of the distribution it samples
from, for every model family, including those that transform the LM head's output (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from rlhf_trainer.modeling import response_logprobs, sequences

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 0.5, "head_dim": 8}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
}


def tiny(family: str) -> torch.nn.Module:
    import transformers

    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_response_logprobs_are_the_sampling_distributions_in_every_family(family, temperature):
    model = tiny(family)
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15]]
    batch = sequences(prompts, responses, pad_token_id=0)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch, temperature)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            # what sampling reads: the model's own logits for the whole sequence, at the temperature
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float() / temperature
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            torch.testing.assert_close(logprobs[row, :len(response)], expected, atol=1e-5, rtol=1e-5)
            assert (logprobs[row, len(response):] == 0).all()
