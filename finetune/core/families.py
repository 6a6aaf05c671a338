"""The MoE families moetune knows, one entry per transformers `model_type`: what each does differently.

All of transformers 5's MoE families store their routed experts as one module holding fused 3-D parameters
`gate_up_proj` and `down_proj`, called as `experts(hidden, top_k_index, top_k_weights)`. What differs, and lives
here instead of in `if model_type == ...` branches elsewhere:
- the router's name inside the MoE block (`gate`, `router`) and where its weight is (`wg.weight` for Hunyuan);
- what the router returns: most return (logits, top-k weights, top-k indices); Llama 4 returns (dense scores,
  logits), so its top-k indices are read from the logits;
- shared experts (`shared_expert`, `shared_experts`, `shared_mlp`), the dense FFN layers before the first MoE
  layer, and the token mixers (attention, MLA projections, linear attention, Mamba);
- how the load is balanced: an aux loss the model computes, an aux-loss-free `e_score_correction_bias`, or none;
- the config sizes `model.init` sets to build a tiny model of the family;
- what a speed lever or NF4 experts cannot do for it yet, with the reason.

A model_type not listed: a dense model uses the generic path (attention only); an MoE model_type of the installed
transformers is refused by name before any work (`check_supported`); a remote-code model is detected generically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: the recipe's checks read this registry without importing torch
    import torch
    from torch import nn

# Config fields that give a model_type's routed-expert count: what makes a config an MoE config.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

AUX_LOSS = "aux_loss"  # the model returns `aux_loss` (with output_router_logits); TRL adds coef * aux_loss
BIAS = "bias"  # aux-loss-free: an `e_score_correction_bias` added to the scores when choosing experts


def indices_third(output, router: nn.Module) -> torch.Tensor:
    """(logits, top-k weights, top-k indices): the layout of most routers."""
    return output[2]


def indices_from_logits(output, router: nn.Module) -> torch.Tensor:
    """(dense scores, logits) (Llama 4): the top-k of the logits are the experts chosen."""
    return output[1].topk(router.top_k, dim=-1).indices


def logits_first(output) -> torch.Tensor:
    return output[0]


def logits_second(output) -> torch.Tensor:
    return output[1]


@dataclass(frozen=True)
class Family:
    model_type: str
    sizes: Callable[[Any], dict] = field(repr=False)  # ModelInit -> config kwargs of this family
    router: str = "gate"  # the router's name inside the MoE block
    router_weight: str = "weight"  # the router weight's name inside the router module
    shared_experts: tuple[str, ...] = ()  # names of shared-expert modules (children of the block or the layer)
    dense_mlp: str = "mlp"  # the decoder layer's FFN child: dense where the layer has no MoE block
    token_mixers: tuple[str, ...] = ("self_attn",)  # modules whose Linears form the `attention` role
    # Linears whose weight the model reads directly instead of calling them (Jamba's dt_proj): a LoRA wrapper
    # there would change nothing until merged, so they are left out of every role.
    unreachable_linears: tuple[str, ...] = ()
    top_k_indices: Callable = field(default=indices_third, repr=False)
    router_logits: Callable = field(default=logits_first, repr=False)
    balancing: tuple[str, ...] = (AUX_LOSS,)
    backbone: str | None = None  # the decoder's attribute name where `base_model_prefix` does not name it
    padding_free: str | None = None  # why speed.padding_free cannot run this family; None: it can
    # Phi-MoE's router samples experts at random in training (SparseMixer): two forwards of a batch differ.
    samples_experts_in_training: bool = False
    nf4_experts: str | None = None  # why NF4 experts cannot run this family; None: they can

    @property
    def has_aux_loss(self) -> bool:
        return AUX_LOSS in self.balancing

    @property
    def has_bias(self) -> bool:
        return BIAS in self.balancing


# ---------------------------------------------------------------- the sizes model.init sets

def common_sizes(init) -> dict:
    return dict(hidden_size=init.hidden_size, num_hidden_layers=init.num_layers,
                num_attention_heads=init.num_heads, num_key_value_heads=init.num_kv_heads,
                max_position_embeddings=init.max_position_embeddings, intermediate_size=init.intermediate_size,
                head_dim=init.hidden_size // init.num_heads)


def with_aux(init, **sizes) -> dict:
    return {**common_sizes(init), "num_experts_per_tok": init.experts_per_token,
            "router_aux_loss_coef": init.router_aux_loss_coef, **sizes}


def local_experts(init) -> dict:  # mixtral, phimoe, granite, minimax_m2
    return with_aux(init, num_local_experts=init.num_experts)


def qwen_sizes(init, shared: bool = False) -> dict:
    sizes = with_aux(init, num_experts=init.num_experts, moe_intermediate_size=init.intermediate_size,
                     decoder_sparse_step=1)
    return {**sizes, "shared_expert_intermediate_size": init.intermediate_size} if shared else sizes


def linear_attention_sizes(init) -> dict:
    """Qwen3-Next / Qwen3.5: Gated DeltaNet layers, then full attention; the pattern repeats."""
    head = init.hidden_size // init.num_heads
    pattern = ["linear_attention", "full_attention"]
    return dict(linear_key_head_dim=head, linear_value_head_dim=head, linear_num_key_heads=init.num_kv_heads,
                linear_num_value_heads=init.num_heads,
                layer_types=[pattern[i % 2] for i in range(init.num_layers)])


def olmo_sizes(init) -> dict:
    return with_aux(init, num_experts=init.num_experts)


def deepseek_sizes(init) -> dict:
    """DeepSeek-V2/V3 style: dense FFN in the first layer, then MoE layers with one shared expert; MLA attention
    (query and key/value go through low-rank projections)."""
    head = init.hidden_size // init.num_heads
    return {**common_sizes(init), "num_key_value_heads": init.num_heads, "n_routed_experts": init.num_experts,
            "num_experts_per_tok": init.experts_per_token, "n_shared_experts": 1,
            "moe_intermediate_size": init.intermediate_size, "first_k_dense_replace": 1,
            "kv_lora_rank": init.hidden_size // 2, "q_lora_rank": init.hidden_size // 2,
            "qk_nope_head_dim": head, "qk_rope_head_dim": head, "v_head_dim": head, "head_dim": head,
            "n_group": 1, "topk_group": 1}


def glm_sizes(init) -> dict:  # glm4_moe, dots1: DeepSeek-V3 routing with ordinary attention
    return {**common_sizes(init), "n_routed_experts": init.num_experts, "num_experts_per_tok": init.experts_per_token,
            "n_shared_experts": 1, "moe_intermediate_size": init.intermediate_size, "first_k_dense_replace": 1,
            "n_group": 1, "topk_group": 1}


def gpt_oss_sizes(init) -> dict:
    pattern = ["sliding_attention", "full_attention"]
    return {**local_experts(init), "sliding_window": 16,
            "layer_types": [pattern[i % 2] for i in range(init.num_layers)]}


def llama4_sizes(init) -> dict:
    pattern = ["chunked_attention", "full_attention"]
    return {**local_experts(init), "intermediate_size_mlp": init.intermediate_size, "router_aux_loss_coef": 0.0,
            "layer_types": [pattern[i % 2] for i in range(init.num_layers)]}


def granite_shared_sizes(init) -> dict:
    return {**local_experts(init), "shared_intermediate_size": init.intermediate_size}


def granite_hybrid_sizes(init) -> dict:
    pattern = ["mamba", "attention"]
    head = init.hidden_size // init.num_heads
    return {**granite_shared_sizes(init), "layer_types": [pattern[i % 2] for i in range(init.num_layers)],
            "mamba_n_heads": 2 * init.hidden_size // head, "mamba_d_head": head, "mamba_d_state": head,
            "mamba_chunk_size": head}


def ernie_sizes(init) -> dict:
    return {**common_sizes(init), "moe_num_experts": init.num_experts, "moe_k": init.experts_per_token,
            "moe_intermediate_size": init.intermediate_size, "moe_num_shared_experts": 1,
            "moe_layer_start_index": 1, "router_aux_loss_coef": init.router_aux_loss_coef}


def hunyuan_sizes(init) -> dict:
    return {**common_sizes(init), "num_experts": init.num_experts, "moe_topk": init.experts_per_token,
            "moe_intermediate_size": init.intermediate_size, "num_shared_expert": 1}


def jamba_sizes(init) -> dict:
    """Attention in even layers, Mamba in odd ones; MoE in odd layers, a dense FFN in even ones."""
    return {**with_aux(init, num_experts=init.num_experts), "expert_layer_period": 2, "expert_layer_offset": 1,
            "attn_layer_period": 2, "attn_layer_offset": 0, "use_mamba_kernels": False,
            "mamba_dt_rank": init.hidden_size // 8}


HYBRID = ("its {kind} layers carry a recurrent state across a packed row's sequence boundaries, which block "
          "attention does not reset")
OWN_EXPERTS_FORWARD = ("its experts run their own forward, outside transformers' experts interface, so the NF4 "
                       "expert forward cannot replace it; set model.quantization: null")

FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("mixtral", local_experts),
    Family("phimoe", local_experts, router="router", samples_experts_in_training=True),
    Family("qwen2_moe", lambda init: qwen_sizes(init, shared=True), shared_experts=("shared_expert",)),
    Family("qwen3_moe", qwen_sizes),
    Family("qwen3_5_moe_text", lambda init: {**qwen_sizes(init, shared=True), **linear_attention_sizes(init)},
           shared_experts=("shared_expert",), token_mixers=("self_attn", "linear_attn"),
           padding_free=HYBRID.format(kind="Gated DeltaNet (linear attention)")),
    Family("qwen3_next", lambda init: {**qwen_sizes(init, shared=True), **linear_attention_sizes(init)},
           shared_experts=("shared_expert",), token_mixers=("self_attn", "linear_attn"),
           padding_free=HYBRID.format(kind="Gated DeltaNet (linear attention)")),
    Family("olmoe", olmo_sizes),
    Family("flex_olmo", olmo_sizes),
    Family("deepseek_v2", deepseek_sizes, shared_experts=("shared_experts",), balancing=()),
    Family("deepseek_v3", deepseek_sizes, shared_experts=("shared_experts",), balancing=(BIAS,)),
    Family("glm4_moe", glm_sizes, shared_experts=("shared_experts",), balancing=(BIAS,)),
    Family("dots1", glm_sizes, shared_experts=("shared_experts",), balancing=(BIAS,)),
    Family("gpt_oss", gpt_oss_sizes, router="router"),
    Family("llama4_text", llama4_sizes, router="router", shared_experts=("shared_expert",), dense_mlp="feed_forward",
           top_k_indices=indices_from_logits, router_logits=logits_second, balancing=(), backbone="model",
           nf4_experts=OWN_EXPERTS_FORWARD),
    Family("minimax_m2", local_experts, balancing=(AUX_LOSS, BIAS)),
    Family("granitemoe", local_experts, router="router"),
    Family("granitemoeshared", granite_shared_sizes, router="router", shared_experts=("shared_mlp",)),
    Family("granitemoehybrid", granite_hybrid_sizes, router="router", shared_experts=("shared_mlp",),
           token_mixers=("self_attn", "mamba"), padding_free=HYBRID.format(kind="Mamba-2")),
    Family("ernie4_5_moe", ernie_sizes, shared_experts=("shared_experts",), balancing=(AUX_LOSS, BIAS)),
    Family("hunyuan_v1_moe", hunyuan_sizes, router_weight="wg.weight", shared_experts=("shared_mlp",),
           balancing=()),
    Family("jamba", jamba_sizes, router="router", dense_mlp="feed_forward", token_mixers=("self_attn", "mamba"),
           unreachable_linears=("dt_proj",), padding_free=HYBRID.format(kind="Mamba")),
)}

# `model.init.architecture` names; qwen3_5_moe is the text model of the Qwen3.5 checkpoints.
ARCHITECTURES = tuple(FAMILIES)
ALIASES = {"qwen3_5_moe": "qwen3_5_moe_text"}

# The generic fallback, for remote-code MoE models: routers found by their shape (see moe.is_router).
GENERIC = Family("generic", lambda init: {}, router="", shared_experts=("shared_expert", "shared_experts"))


class UnsupportedFamily(ValueError):
    """An MoE model_type of the installed transformers that the registry has no entry for."""


def text_config(config):
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):  # not a transformers config; or several text configs (encoder-decoder)
        return config


def declares_experts(config) -> bool:
    """Whether a config (or its text config) has a routed-expert count field: an MoE model."""
    for candidate in {id(c): c for c in (config, text_config(config))}.values():
        for name in EXPERT_COUNT_FIELDS:
            try:
                if hasattr(candidate, name):
                    return True
            except Exception:  # per-layer configs refuse global reads of their per-layer fields: still MoE
                return True
    return False


def family_for_config(config) -> Family | None:
    """The registry entry of a config's family; GENERIC for remote-code models; None for dense models.

    Raises UnsupportedFamily for an MoE model_type of the installed transformers that is not in the registry."""
    model_type = ALIASES.get(config.model_type, config.model_type)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if not declares_experts(config):
        return None
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        raise UnsupportedFamily(
            f"model_type '{model_type}' is a Mixture-of-Experts family that moetune does not support yet: its "
            f"router, experts and load balancing are not in finetune/core/families.py. Supported: {', '.join(FAMILIES)}.")
    return GENERIC


def check_supported(config) -> None:
    """Refuse, before any weights load, an MoE model_type the registry has no entry for (UnsupportedFamily)."""
    family_for_config(config)


def prepare_for_generation(model: nn.Module) -> None:
    """What any MoE model needs before generate(): router logits off. A model saved by SFTTrainer (and a tiny
    model.init one) asks for them in its config, and generate() then computes the load-balancing loss on the cache
    and fails. Training turns them back on through TRL."""
    model.config.output_router_logits = False


def prepare_for_training(model: nn.Module) -> None:
    """What a family needs before TRL trains it.

    - Families without an aux loss (Llama 4, Hunyuan, DeepSeek, GLM-4.5, dots1) compute none, yet their configs ask
      for router logits (and Llama 4's carries a coefficient): TRL would add coef * None, or compute Mixtral's aux
      loss in its fused LM head. Router logits off and coefficient 0 is TRL's "no aux loss".
    - TRL's fused LM head computes the aux loss with `config.num_experts`, which Phi-MoE and Granite configs
      call `num_local_experts`: the count is copied under the name TRL reads.
    - Llama4ForCausalLM's `base_model_prefix` ("language_model") names no attribute, so `model.base_model` (what
      TRL's fused LM head and packed DPO call for the decoder) would be the whole model: the instance gets the
      attribute's real name.
    - `e_score_correction_bias` is a load statistic, not a weight (ERNIE 4.5 stores it as a Parameter): never
      trained by gradients, also in full fine-tuning; balancing.bias_update_rate moves it instead.
    """
    family = family_of(model)
    config = text_config(model.config)
    if not family.has_aux_loss and family is not GENERIC:
        config.output_router_logits = False
        if hasattr(config, "router_aux_loss_coef"):
            config.router_aux_loss_coef = 0.0
    if family.has_aux_loss and not hasattr(config, "num_experts"):
        config.num_experts = next(getattr(config, name) for name in EXPERT_COUNT_FIELDS if hasattr(config, name))
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if family.backbone:
        causal_lm.base_model_prefix = family.backbone
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            param.requires_grad_(False)


def family_of(model: nn.Module) -> Family:
    """The family of a loaded model (GENERIC for dense and remote-code models, whose roles are found by shape)."""
    config = getattr(model, "config", None)
    return (family_for_config(config) if config is not None else None) or GENERIC


def init_config_kwargs(init) -> dict:
    """The config sizes of a tiny model of `init.architecture`."""
    return FAMILIES[ALIASES.get(init.architecture, init.architecture)].sizes(init)
