"""Tiny configs of any MoE family of the installed transformers, scaled down from the family's own default config.

`model.init` builds a model of a transformers model_type. Instead of a hand-written size table per family, the
family's default config (its real field names and values) is shrunk field by field: widths to the init's sizes,
expert counts to `num_experts`, top-k fields to `experts_per_token`, low-rank and head dims to small multiples of
16, and per-layer lists (`layer_types`, `mlp_layer_types`, ...) resampled so every kind of layer of the family still
appears in the few layers built. A family entry (finetune/core/families.py) adds only what this cannot guess.
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING

from finetune.core import families

# field name -> how it is set from the ModelInit (a callable of init) ; only fields the default config has are set
WIDTH = ("intermediate_size", "ffn_hidden_size", "moe_intermediate_size", "expert_ffn_hidden_size",
         "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", "shared_intermediate_size",
         "shared_experts_intermediate_size", "share_expert_dim", "intermediate_size_mlp", "dense_intermediate_size")
EXPERT_COUNTS = families.EXPERT_COUNT_FIELDS
TOP_K = families.TOP_K_FIELDS
SHARED_COUNTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "num_shared_expert")
HEAD_DIMS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "linear_key_head_dim", "linear_value_head_dim",
             "linear_head_dim", "mamba_head_dim", "mamba_d_head", "index_head_dim", "indexer_head_dim")
SMALL = {"n_group": 1, "num_expert_group": 1, "topk_group": 1, "n_groups": 1, "max_position_embeddings": 512,
         "model_max_length": 512, "ssm_state_size": 16, "mamba_d_state": 16, "chunk_size": 16,
         "mamba_chunk_size": 16, "sliding_window": 16, "index_topk": 16, "indexer_budget": 16,
         "hidden_size_per_layer_input": 16, "hc_lowrank": 16, "router_hidden_size": 16,
         "ngram_vocab_size_base": 256, "split_ngram_parts": 2, "layer_group_size": 2, "o_groups": 2,
         "use_mamba_kernels": False, "num_nextn_predict_layers": 0, "attention_chunk_size": 16}
DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index", "first_dense_layers")


def resample(kinds: list, length: int) -> list:
    """A per-layer list of `length` entries where each kind of the original appears, in order, cycling."""
    distinct = list(dict.fromkeys(kinds))
    return [distinct[i % len(distinct)] for i in range(max(length, len(distinct)))]


def shrunk_fields(defaults: dict, init, vocab_size: int) -> dict:
    """Fields of a default config (as a dict) set to tiny sizes: only fields the config has."""
    heads = init.num_heads
    head_dim = init.hidden_size // heads
    layers_default = defaults.get("num_hidden_layers", defaults.get("num_layers"))
    kv_equal = defaults.get("num_key_value_heads") == defaults.get("num_attention_heads")
    rules = {
        "hidden_size": init.hidden_size, "num_hidden_layers": init.num_layers, "num_layers": init.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": heads if kv_equal else init.num_kv_heads,
        "head_dim": head_dim, "q_lora_rank": init.hidden_size // 2, "kv_lora_rank": init.hidden_size // 2,
        "o_lora_rank": init.hidden_size // 2, "qk_head_dim": 2 * head_dim,
        "linear_num_key_heads": init.num_kv_heads, "linear_num_value_heads": heads, "linear_num_heads": heads,
        "index_n_heads": heads, "indexer_n_heads": heads, "indexer_kv_heads": 1,
        "mamba_num_heads": 2 * init.hidden_size // head_dim, "mamba_n_heads": 2 * init.hidden_size // head_dim,
        "ple_embed_dim": init.hidden_size, "vocab_size_per_layer_input": vocab_size, "unpadded_vocab_size": vocab_size,
        "swa_head_dim": head_dim, "sliding_window_size": 16, "router_aux_loss_coef": init.router_aux_loss_coef,
        **{name: init.intermediate_size for name in WIDTH},
        **{name: init.num_experts for name in EXPERT_COUNTS},
        **{name: init.experts_per_token for name in TOP_K},
        **{name: head_dim for name in HEAD_DIMS},
        **SMALL,
    }
    fields = {}
    for name, value in defaults.items():
        if name in rules and value is not None and not isinstance(value, (list, dict)):
            fields[name] = rules[name]
        elif name in SHARED_COUNTS and isinstance(value, int) and value > 0:
            fields[name] = 1
        elif name in DENSE_FIRST and isinstance(value, int) and value > 0:
            fields[name] = 1
        elif name == "zero_expert_num" and isinstance(value, int) and value > 0:
            fields[name] = init.num_experts // 2
        elif isinstance(value, list) and layers_default and len(value) == layers_default and value \
                and all(isinstance(kind, str) for kind in value):
            fields[name] = resample(value, init.num_layers)
    if "layers_block_type" in defaults and "num_hidden_layers" not in defaults:  # the list is the layer count
        fields["layers_block_type"] = resample(defaults["layers_block_type"], init.num_layers)
    nope, rope = defaults.get("qk_nope_head_dim"), defaults.get("qk_rope_head_dim")
    if nope and rope and defaults.get("head_dim") == nope + rope:  # MLA heads whose size the config checks
        fields["head_dim"] = 2 * head_dim
    if "per_layer_config" in defaults:
        fields["per_layer_config"] = {}
    return fields


def tiny_config_kwargs(model_type: str, init, vocab_size: int) -> dict:
    """Config kwargs of a tiny model of `model_type` (a text model_type): its registry entry's sizes, else its
    default config shrunk, with the entry's overrides on top."""
    family = families.family_entry(model_type)
    if family.sizes is not None:
        return family.sizes(init)
    fields = shrunk_fields(CONFIG_MAPPING[model_type]().to_dict(), init, vocab_size)
    return {**fields, **(family.overrides(init) if family.overrides else {})}
