"""Tiny models and tokenizers built here (no downloads): MoE models from a config with real-model shape rules, a
tokenizer trained locally, and a one-token-per-character ChatML tokenizer."""

from __future__ import annotations

import string

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM

from finetune.core import synthetic_task
from finetune.config.recipe import ModelInit
from finetune.modeling.tiny import init_config, train_tokenizer

ARCHITECTURES = ["mixtral", "qwen3_moe", "olmoe"]


def tiny_model(architecture="mixtral", seed=0, hidden_size=64, intermediate_size=64):
    """Two layers of 4 experts, with dims that are multiples of 64 as in real models (unless a test wants odd ones)."""
    texts = [m["content"] for row in synthetic_task.sft_conversations(200, 0) for m in row["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=280)
    init = ModelInit(architecture=architecture, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(init_config(init, tokenizer)), tokenizer


def batch(tokenizer):
    rows = [row["messages"] for row in synthetic_task.sft_conversations(4, 1)]
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    return tokenizer(texts, return_tensors="pt", padding=True)


SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per printable character, ChatML special tokens, a ChatML chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(string.printable))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_chat_model(seed: int = 0) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerFast]:
    """A randomly initialised ~50k-parameter Mixtral and its tokenizer; router logits on, as SFTTrainer saves it."""
    tokenizer = tiny_chat_tokenizer()
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, output_router_logits=True,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config), tokenizer
