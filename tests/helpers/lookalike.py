"""Look-alike checkpoints: folders shaped like a MoE family's Hub checkpoint, small enough for a CPU test.

`build_lookalike(family, folder)` writes what `from_pretrained` reads from a real repository of that family: a tiny
config of the family's own class (real field names, dims multiples of 64) saved with `save_pretrained`, a byte-level
BPE tokenizer trained here on generated chat text with the family's real special tokens (bos/eos/pad, role and
channel markers), the family's real chat template (TRL's copy under trl/chat_templates/; none for a base model) and
a `generation_config.json`. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trl
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from finetune.core import synthetic_task

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    """What a look-alike of one family needs: its config fields, its tokens and its chat template."""

    model_type: str
    config: dict
    bos: str | None
    eos: str
    pad: str | None
    extra_tokens: list[str] = field(default_factory=list)
    template: str | None = None  # a file of trl/chat_templates/, or None for a base model
    adds_bos: bool = False  # the tokenizer puts bos in front of every text (Llama/Mistral style)


FAMILIES = {
    # Mixtral-8x7B-v0.1: a base model; Llama-style sentencepiece tokens, no pad token and no chat template.
    "mixtral": Family("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=128,
                                      router_aux_loss_coef=0.02, head_dim=16),
                      bos="<s>", eos="</s>", pad=None, extra_tokens=["<unk>"], adds_bos=True),
    "qwen3_moe": Family("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                          intermediate_size=128, head_dim=16, router_aux_loss_coef=0.001),
                        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                        extra_tokens=["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>"],
                        template="qwen3.jinja"),
    # gpt-oss: attention sinks, sliding windows in alternate layers (a window short enough to matter here); its
    # YaRN rotary scaling expects its own context length.
    "gpt_oss": Family("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, head_dim=16,
                                      sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                      router_aux_loss_coef=0.9, max_position_embeddings=131072),
                      bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
                      extra_tokens=["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>"],
                      template="gptoss.jinja"),
    # DeepSeek-V3: MLA attention, a dense first layer, a shared expert, aux-loss-free routing with a correction bias.
    "deepseek_v3": Family("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                              moe_intermediate_size=64, intermediate_size=128, first_k_dense_replace=1,
                                              n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
                                              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                                              num_key_value_heads=4),  # MLA: one value head per query head
                          bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
                          extra_tokens=["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
                          template="deepseekv3.jinja"),
}


def corpus(n: int = 400, seed: int = 0):
    """Chat text like the tests' synthetic data: what the look-alike tokenizers learn their merges from."""
    for row in itertools.chain(synthetic_task.sft_conversations(n, seed), synthetic_task.preference_pairs(n // 2, seed)):
        for key in ("messages", "prompt", "chosen", "rejected"):
            for message in row.get(key) or []:
                yield f"{message['role']}: {message['content']}"


def train_family_tokenizer(family: Family, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(t for t in [family.bos, family.eos, family.pad, *family.extra_tokens] if t))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if family.adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tokenizer.token_to_id(family.bos))])
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in named.items() if v},
                                   additional_special_tokens=[t for t in family.extra_tokens if t != family.pad])
    if family.template is not None:
        fast.chat_template = (TRL_TEMPLATES / family.template).read_text(encoding="utf-8")
    return fast


def family_config(name: str, **fields):
    """The tiny config of family `name` (its own config class), with `fields` on top."""
    family = FAMILIES[name]
    return AutoConfig.for_model(family.model_type, **{**SIZES, **family.config, **fields})


def build_lookalike(name: str, folder: Path, seed: int = 0) -> Path:
    """A look-alike checkpoint of family `name` in `folder`: config, safetensors, tokenizer, generation config."""
    family = FAMILIES[name]
    tokenizer = train_family_tokenizer(family)
    ids = {f"{kind}_token_id": tokenizer.convert_tokens_to_ids(token) if token else None
           for kind, token in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad))}
    config = family_config(name, vocab_size=len(tokenizer), **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(**ids, do_sample=False).save_pretrained(folder)
    return folder
