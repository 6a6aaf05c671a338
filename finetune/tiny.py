"""Tiny MoE models built from a config (`model.init`): a byte-level BPE tokenizer trained on the recipe's data,
with role tokens and a chat template, and a config of the named architecture. For CPU demos and tests."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from finetune.recipe import ModelInit

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
    """A config of the named MoE architecture; the three share most names but not the expert-count ones."""
    common = dict(
        vocab_size=len(tokenizer), hidden_size=init.hidden_size, num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_heads, num_key_value_heads=init.num_kv_heads,
        num_experts_per_tok=init.experts_per_token, router_aux_loss_coef=init.router_aux_loss_coef,
        output_router_logits=True, max_position_embeddings=init.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    per_architecture = {
        "mixtral": dict(num_local_experts=init.num_experts, intermediate_size=init.intermediate_size),
        "qwen3_moe": dict(num_experts=init.num_experts, moe_intermediate_size=init.intermediate_size,
                          intermediate_size=init.intermediate_size, decoder_sparse_step=1,
                          head_dim=init.hidden_size // init.num_heads),
        "olmoe": dict(num_experts=init.num_experts, intermediate_size=init.intermediate_size),
    }
    return AutoConfig.for_model(init.architecture, **common, **per_architecture[init.architecture])
