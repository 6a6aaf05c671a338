"""Shared pieces for the eval tests (no tests here): a tiny random chat MoE and the MT-Bench data location."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

MT_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mt_bench"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def mt_bench_file(name: str) -> Path:
    path = MT_BENCH / name
    if not path.is_file():
        pytest.skip(f"MT-Bench data {path} is absent (expected the shared data next to the repo, see shared/data/README.md)")
    return path


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
