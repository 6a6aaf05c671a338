"""Tiny MoE models built from a config (`model.init`): a byte-level BPE tokenizer trained on the recipe's data,
with role tokens and a chat template, and a config of the named MoE family (finetune/core/families.py). For CPU demos and tests."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from finetune.core import families
from finetune.config.recipe import ModelInit

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|end|>", "unk_token": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# A compact chat template with {% generation %} markers, so TRL's assistant-only loss can find the answers.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with role tokens and the chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS, additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_config(init: ModelInit, tokenizer) -> AutoConfig:
    """A config of the named MoE family, with the sizes its registry entry sets."""
    return family_config(init, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)


def family_config(init: ModelInit, vocab_size: int, **token_ids) -> AutoConfig:
    """The config of `init`'s family at a vocabulary size (before the tokenizer exists: its target size)."""
    sizes = families.init_config_kwargs(init)
    common = dict(vocab_size=vocab_size, output_router_logits=True, bos_token_id=None, tie_word_embeddings=False,
                  **token_ids)
    return AutoConfig.for_model(families.FAMILIES[families.ALIASES.get(init.architecture, init.architecture)].model_type,
                                **common, **sizes)
