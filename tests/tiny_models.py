"""Tiny random models built from a config, so pipeline tests train for real in seconds.

The tokenizer is a small byte-level BPE trained on the demo data, with ChatML special tokens and a chat
template, so every code path that the real SmolLM2 takes (chat template, added pad token, EOS handling)
is taken here too. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "movie-reviews"


#: Prompts for the PPO tests' rollouts.
PROMPTS = ["Write a one-sentence review of a film about a lighthouse keeper.",
           "Review a comedy about two rival bakers.", "A thriller set on a night train.",
           "An animated film about a lost robot.", "A documentary about deep-sea fish.",
           "A romance between two chess players."]


def corpus() -> list[str]:
    texts = []
    for name in ("sft.jsonl", "prompts-train.jsonl", "prompts-eval.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            row = json.loads(line)
            texts.extend(v for v in row.values() if isinstance(v, str))
    return texts


def build_tiny_causal_lm(out: Path, seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    """A 2-layer Llama with a 600-token BPE vocabulary, saved as a plain checkpoint folder (``hidden_size`` 512:
    every weight matrix above DeepSpeed's default ZeRO-3 persistence threshold of 1e5 elements, so all are
    partitioned)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",  # like SmolLM2: pad == eos, so the trainer must add its own pad token
        chat_template=CHATML,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_llama(seed: int = 0, lora: bool = False):
    """A 2-layer Llama of random weights (no tokenizer), in evaluation mode; with ``lora`` a peft LoRA model over it
    (r=4 on every linear layer, B drawn at random instead of zero so the adapters change what the model computes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


ONEDNN_PRODUCT = "mkldnn._linear_pointwise.default"  # oneDNN's linear product, plain or packed weight
ATEN_PRODUCTS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.linear.default"}


def ops_run():
    """A dispatch mode that records the name of every operator run below autograd (backward passes included):
    ``with ops_run() as ops: ...`` then ``ops.names``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpsRun(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    return OpsRun()
