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

import functools
import inspect
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: the recipe's checks read this registry without importing torch
    import torch
    from torch import nn

# Config fields that give a model_type's routed-expert count: what makes a config an MoE config. These four names
# cover every MoE config of transformers 5.24 (mistral4's and deepseek's n_routed_experts, ernie's and dbrx's
# moe_num_experts, ...); test_families checks that no config declares experts under a name missing here.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Config fields (or nested config fields) that give the aux-loss coefficient under another name than TRL's
# `router_aux_loss_coef`: JetMoE's, DBRX's ffn_config.
AUX_COEF_FIELDS = ("aux_loss_coef", "moe_loss_weight")
# Config fields that give the experts each token is routed to.
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k")

AUX_LOSS = "aux_loss"  # the model returns `aux_loss` (with output_router_logits); TRL adds coef * aux_loss
BIAS = "bias"  # aux-loss-free: an `e_score_correction_bias` added to the scores when choosing experts
# The names of that bias: DeepSeek-V3's, which most families copy, and AFMoE's.
BIAS_NAMES = ("e_score_correction_bias", "expert_bias")


def is_balancing_bias(name: str) -> bool:
    """Whether a parameter or buffer name is an aux-loss-free balancing bias (a load statistic, not a weight)."""
    return name.rsplit(".", 1)[-1] in BIAS_NAMES


def indices_third(output, router: nn.Module) -> torch.Tensor:
    """(logits, top-k weights, top-k indices): the layout of most routers."""
    return output[2]


def indices_from_logits(output, router: nn.Module) -> torch.Tensor:
    """(dense scores, logits) (Llama 4): the top-k of the logits are the experts chosen."""
    return output[1].topk(router.top_k, dim=-1).indices


def tensors_of(output) -> list[torch.Tensor]:
    """The tensors of a module's output: the output itself, or those of its tuple."""
    import torch  # here, not at the top: the recipe's checks read this registry without importing torch

    items = output if isinstance(output, (tuple, list)) else (output,)
    return [item for item in items if isinstance(item, torch.Tensor)]


def indices_generic(output, router: nn.Module, num_experts: int, top_k: int) -> torch.Tensor:
    """Any router's output: its integer tensor of top-k indices, else the top-k of its per-token logits. Per-token
    tensors have a token dimension and an expert (or top-k) one: 1-D tensors (JetMoE's tokens sorted by expert,
    its gates) are not read."""
    tensors = tensors_of(output)
    for tensor in tensors:
        if not tensor.is_floating_point() and tensor.dim() >= 2 and tensor.shape[-1] == top_k:
            return tensor.reshape(-1, top_k)
    return logits_generic(output, num_experts).topk(top_k, dim=-1).indices


def logits_generic(output, num_experts: int) -> torch.Tensor:
    """The router's per-token logits: the first float tensor of its output with one column per expert (or more:
    LongCat-Flash adds zero-computation experts)."""
    tensors = tensors_of(output)
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.shape[-1] >= num_experts:
            return tensor.reshape(-1, tensor.shape[-1])
    raise ValueError(f"a router output without per-expert logits: shapes {[tuple(t.shape) for t in tensors]}")


def logits_first(output) -> torch.Tensor:
    return output[0]


def logits_second(output) -> torch.Tensor:
    return output[1]


@dataclass(frozen=True)
class Family:
    """What a family does differently from the generic detection (finetune/moe.py), which finds the router, the
    routed experts, shared experts and dense MLPs by structure. A field left None is found that way."""

    model_type: str
    # ModelInit -> config kwargs of this family; None: its default config shrunk (modeling/tiny_configs.py)
    sizes: Callable[[Any], dict] | None = field(default=None, repr=False)
    # ModelInit -> config kwargs set on top of the shrunk default config (what shrinking cannot guess)
    overrides: Callable[[Any], dict] | None = field(default=None, repr=False)
    router: str | None = "gate"  # the router's name inside the MoE block
    router_weight: str = "weight"  # the router weight's name inside the router module
    shared_experts: tuple[str, ...] | None = ()  # names of shared-expert modules (children of the block or layer)
    dense_mlp: str | None = "mlp"  # the decoder layer's FFN child: dense where the layer has no MoE block
    token_mixers: tuple[str, ...] | None = ("self_attn",)  # modules whose Linears form the `attention` role
    # Linears whose weight the model reads directly instead of calling them (Jamba's dt_proj): a LoRA wrapper
    # there would change nothing until merged, so they are left out of every role.
    unreachable_linears: tuple[str, ...] = ()
    top_k_indices: Callable = field(default=indices_third, repr=False)
    router_logits: Callable = field(default=logits_first, repr=False)
    balancing: tuple[str, ...] | None = (AUX_LOSS,)  # None: read from the config and the model (generic)
    backbone: str | None = None  # the decoder's attribute name where `base_model_prefix` does not name it
    padding_free: str | None = None  # why speed.padding_free cannot run this family; None: it can
    # Phi-MoE's router samples experts at random in training (SparseMixer): two forwards of a batch differ.
    samples_experts_in_training: bool = False
    # Expert weights stored flat, one (experts x rows, cols) matrix per projection (DBRX's w1, v1, w2): moetune
    # views them as 3-D at load and writes them back flat (finetune/modeling/flat_experts.py)
    flat_experts: tuple[str, ...] = ()

    @property
    def has_aux_loss(self) -> bool:
        return AUX_LOSS in (self.balancing or ())

    @property
    def has_bias(self) -> bool:
        return BIAS in (self.balancing or ())


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


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("mixtral", local_experts),
    Family("phimoe", local_experts, router="router", samples_experts_in_training=True),
    Family("qwen2_moe", lambda init: qwen_sizes(init, shared=True), shared_experts=("shared_expert",)),
    Family("qwen3_moe", qwen_sizes),
    Family("qwen3_5_moe_text", lambda init: {**qwen_sizes(init, shared=True), **linear_attention_sizes(init)},
           shared_experts=("shared_expert",), token_mixers=("self_attn", "linear_attn")),
    Family("qwen3_next", lambda init: {**qwen_sizes(init, shared=True), **linear_attention_sizes(init)},
           shared_experts=("shared_expert",), token_mixers=("self_attn", "linear_attn")),
    Family("olmoe", olmo_sizes),
    Family("flex_olmo", olmo_sizes),
    Family("deepseek_v2", deepseek_sizes, shared_experts=("shared_experts",), balancing=()),
    Family("deepseek_v3", deepseek_sizes, shared_experts=("shared_experts",), balancing=(BIAS,)),
    Family("glm4_moe", glm_sizes, shared_experts=("shared_experts",), balancing=(BIAS,)),
    Family("dots1", glm_sizes, shared_experts=("shared_experts",), balancing=(BIAS,)),
    Family("gpt_oss", gpt_oss_sizes, router="router"),
    Family("llama4_text", llama4_sizes, router="router", shared_experts=("shared_expert",), dense_mlp="feed_forward",
           top_k_indices=indices_from_logits, router_logits=logits_second, balancing=(), backbone="model"),
    Family("minimax_m2", local_experts, balancing=(AUX_LOSS, BIAS)),
    Family("granitemoe", local_experts, router="router"),
    Family("granitemoeshared", granite_shared_sizes, router="router", shared_experts=("shared_mlp",)),
    Family("granitemoehybrid", granite_hybrid_sizes, router="router", shared_experts=("shared_mlp",),
           token_mixers=("self_attn", "mamba")),
    Family("ernie4_5_moe", ernie_sizes, shared_experts=("shared_experts",), balancing=(AUX_LOSS, BIAS)),
    Family("hunyuan_v1_moe", hunyuan_sizes, router_weight="wg.weight", shared_experts=("shared_mlp",),
           balancing=()),
    Family("jamba", jamba_sizes, router="router", dense_mlp="feed_forward", token_mixers=("self_attn", "mamba"),
           unreachable_linears=("dt_proj",)),
)}


def found_by_structure(model_type: str, **fields) -> Family:
    """A family whose router, experts, shared experts, dense MLPs and token mixers the generic detection finds
    (finetune/moe.py), and whose balancing is read from its model: an entry says only what else differs."""
    generic = dict(router=None, router_weight=None, shared_experts=None, dense_mlp=None, token_mixers=None,
                   top_k_indices=None, router_logits=None, balancing=None)
    return Family(model_type, **{**generic, **fields})


def gemma4_moe(init) -> dict:
    """Gemma 4's default config is dense; its MoE checkpoints (26B-A4B) turn the MoE block on beside the MLP."""
    return dict(enable_moe_block=True, num_experts=init.num_experts, top_k_experts=init.experts_per_token,
                moe_intermediate_size=init.intermediate_size)


def qwen4_exp_indexer(init) -> dict:
    """Qwen4-Exp's indexed attention selects blocks of compressed keys; its default config leaves the sizes unset."""
    return dict(indexer_n_heads=init.num_heads, indexer_kv_heads=1, indexer_head_dim=init.hidden_size // init.num_heads,
                indexer_budget=16, indexer_compress_ratio=4)


def dbrx_sizes(init) -> dict:
    """DBRX names its sizes its own way and nests attention and FFN configs. Its checkpoints set rope_theta and
    clip_qkv in attn_config (transformers 5.24's defaults have neither and its attention cannot run without them):
    the values of databricks/dbrx-instruct."""
    return dict(d_model=init.hidden_size, n_heads=init.num_heads, n_layers=init.num_layers,
                max_seq_len=init.max_position_embeddings, router_aux_loss_coef=init.router_aux_loss_coef,
                rope_parameters=dict(rope_type="default", rope_theta=500000.0),
                attn_config=dict(kv_n_heads=init.num_kv_heads, rope_theta=500000.0, clip_qkv=8.0),
                ffn_config=dict(ffn_hidden_size=init.intermediate_size, moe_num_experts=init.num_experts,
                                moe_top_k=init.experts_per_token, moe_loss_weight=init.router_aux_loss_coef))


def lfm2_layers(init) -> dict:
    """LFM2-MoE: short-convolution layers with full attention every few layers (its default computes the list)."""
    pattern = ["conv", "full_attention"]
    return dict(layer_types=[pattern[i % 2] for i in range(init.num_layers)])


NEW_FAMILIES = (
    found_by_structure("gemma4_text", overrides=gemma4_moe),
    found_by_structure("qwen4_exp_text", overrides=qwen4_exp_indexer),
    found_by_structure("lfm2_moe", overrides=lfm2_layers),
    # DBRX's attention sits in a module whose class name says Norm (DbrxNormAttentionNorm), which the generic
    # detection takes for a norm: its `attn` is named
    found_by_structure("dbrx", sizes=dbrx_sizes, flat_experts=("w1", "v1", "w2"), token_mixers=("attn",)),
    found_by_structure("zaya", overrides=lambda init: dict(num_experts_per_tok=1)),  # ZAYA routes to one expert
    found_by_structure("doge", overrides=lambda init: dict(is_moe=True)),  # Doge's default config is dense
    # PEFT refuses LoRA on the Mamba mixers' out_proj of nemotron_h (its fused Mamba kernel reads the weight)
    found_by_structure("nemotron_h", unreachable_linears=("out_proj",)),
    # dots.llm3's sliding-window layers use MLA-sized heads: its config checks head_dim = nope + rope dims
    found_by_structure("dots3_note_text", overrides=lambda init: dict(head_dim=2 * init.hidden_size // init.num_heads)),
)
FAMILIES.update({family.model_type: family for family in NEW_FAMILIES})

# The generic fallback: any MoE model_type without an entry (and remote-code MoE models) is found by structure.
GENERIC = found_by_structure("generic")


@functools.lru_cache(maxsize=None)
def moe_model_types() -> tuple[str, ...]:
    """Every causal-LM model_type of the installed transformers whose config declares routed experts (one of
    EXPERT_COUNT_FIELDS, in the config or a nested config), read from the config classes' fields without building
    them. Multimodal ones are listed as they are; `text_model_type` names the text model they run as."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(model_type for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                        if model_type in CONFIG_MAPPING and set(config_field_names(CONFIG_MAPPING[model_type]))
                        & set(EXPERT_COUNT_FIELDS)))


def config_field_names(config_class, depth: int = 0) -> set[str]:
    """The field names a config class declares, with those of its nested (sub-)config classes."""
    names = set()
    for cls in config_class.__mro__:
        names |= set(getattr(cls, "__annotations__", {}))
        try:
            names |= set(inspect.signature(cls.__init__).parameters)
        except (TypeError, ValueError):
            pass
    for sub in (getattr(config_class, "sub_configs", None) or {}).values():
        if depth < 2 and isinstance(sub, type):
            names |= config_field_names(sub, depth + 1)
    return names


@functools.lru_cache(maxsize=None)
def text_model_type(model_type: str) -> str:
    """The model_type a family runs as: a multimodal one's text model (gemma4 -> gemma4_text), else itself."""
    model_type = ALIASES.get(model_type, model_type)
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        text = CONFIG_MAPPING[model_type]().get_text_config()
    except (AttributeError, ValueError, TypeError):
        return model_type
    text_type = getattr(text, "model_type", None)
    return text_type if text_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else model_type


def family_entry(model_type: str) -> Family:
    """The registry entry of a model_type; a family found by structure where it has none."""
    model_type = ALIASES.get(model_type, model_type)
    return FAMILIES.get(model_type) or found_by_structure(model_type)


# `model.init.architecture` names: any MoE model_type of the installed transformers (moe_model_types); the
# registry's own names are listed in the docs. qwen3_5_moe is the text model of the Qwen3.5 checkpoints.
ARCHITECTURES = tuple(FAMILIES)
ALIASES = {"qwen3_5_moe": "qwen3_5_moe_text"}


def text_config(config):
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):  # not a transformers config; or several text configs (encoder-decoder)
        return config


def config_value(config, names: tuple[str, ...]):
    """The first of `names` set (not None) on a config, its text config or a nested config (DBRX's ffn_config)."""
    candidates = [config, text_config(config)]
    candidates += [value for c in list(candidates) for value in vars(c).values() if hasattr(value, "to_dict")]
    for candidate in candidates:
        for name in names:
            try:
                value = getattr(candidate, name, None)
            except Exception:  # per-layer configs refuse global reads of their per-layer fields
                continue
            if value is not None:
                return value
    return None


def expert_count(config) -> int | None:
    """Routed experts per MoE layer that a config declares (None for a dense config)."""
    return config_value(config, EXPERT_COUNT_FIELDS)


def experts_per_token(config) -> int | None:
    return config_value(config, TOP_K_FIELDS)


def declares_experts(config) -> bool:
    """Whether a config (or its text or nested config) sets a routed-expert count: an MoE model."""
    return expert_count(config) is not None


def family_for_config(config) -> Family | None:
    """The registry entry of a config's family; a family found by structure for any other MoE config (every MoE
    family of the installed transformers, remote-code models); None for dense models."""
    model_type = ALIASES.get(config.model_type, config.model_type)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return found_by_structure(model_type) if declares_experts(config) else None


def check_supported(config) -> None:
    """Every MoE family is handled (generic detection where the registry has no entry): nothing to refuse. Kept
    as the place a family found not to train would be refused before its weights load."""
    family_for_config(config)


def prepare_for_generation(model: nn.Module) -> None:
    """What any MoE model needs before generate(): router logits off. A model saved by SFTTrainer (and a tiny
    model.init one) asks for them in its config, and generate() then computes the load-balancing loss on the cache
    and fails. Training turns them back on through TRL."""
    model.config.output_router_logits = False


def balancing_of(model: nn.Module) -> tuple[str, ...]:
    """How a model's family balances its experts, read from the model: an aux loss where its modeling module
    computes one (transformers' `load_balancing_loss_func`), a bias where it has one (BIAS_NAMES)."""
    module = sys.modules.get(type(model).__module__)
    found = (AUX_LOSS,) if module is not None and hasattr(module, "load_balancing_loss_func") else ()
    if any(is_balancing_bias(name) for name, _ in [*model.named_parameters(), *model.named_buffers()]):
        found += (BIAS,)
    return found


def prepare_for_training(model: nn.Module) -> None:
    """What a family needs before TRL trains it.

    - Families without an aux loss (Llama 4, Hunyuan, DeepSeek, GLM-4.5, dots1) compute none, yet their configs ask
      for router logits (and Llama 4's carries a coefficient): TRL would add coef * None, or compute Mixtral's aux
      loss in its fused LM head. Router logits off and coefficient 0 is TRL's "no aux loss".
    - TRL's fused LM head computes the aux loss with `config.num_experts` and `config.num_experts_per_tok`, which
      Phi-MoE and Granite configs call `num_local_experts` and DBRX's ffn_config `moe_num_experts` / `moe_top_k`:
      they are copied under the names TRL reads. So is the coefficient, which JetMoE calls `aux_loss_coef` and
      DBRX's ffn_config `moe_loss_weight` (TRL reads `router_aux_loss_coef`, and without it neither adds nor logs
      the aux loss).
    - Llama4ForCausalLM's `base_model_prefix` ("language_model") names no attribute, so `model.base_model` (what
      TRL's fused LM head and packed DPO call for the decoder) would be the whole model: the instance gets the
      attribute's real name.
    - `e_score_correction_bias` is a load statistic, not a weight (ERNIE 4.5 stores it as a Parameter): never
      trained by gradients, also in full fine-tuning; balancing.bias_update_rate moves it instead.
    """
    family = family_of(model)
    config = text_config(model.config)
    if not family.has_aux_loss:
        config.output_router_logits = False
        if hasattr(config, "router_aux_loss_coef"):
            config.router_aux_loss_coef = 0.0
    if family.has_aux_loss and getattr(config, "num_experts", None) is None:
        config.num_experts = expert_count(config)
    if family.has_aux_loss and "num_experts_per_tok" not in vars(config):  # not a per-layer value either
        config.num_experts_per_tok = experts_per_token(config)
    if family.has_aux_loss and getattr(config, "router_aux_loss_coef", None) is None \
            and config_value(config, AUX_COEF_FIELDS) is not None:
        config.router_aux_loss_coef = config_value(config, AUX_COEF_FIELDS)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if family.backbone:
        causal_lm.base_model_prefix = family.backbone
    for name, param in model.named_parameters():
        if is_balancing_bias(name):
            param.requires_grad_(False)


def family_of(model: nn.Module) -> Family:
    """The family of a loaded model: its registry entry, or one found by structure (dense and remote-code models
    too), with the balancing read from the model where the entry does not say."""
    config = getattr(model, "config", None)
    family = (family_for_config(config) if config is not None else None) or GENERIC
    if family.balancing is None:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        family = replace(family, balancing=balancing_of(causal_lm))
    return family


def main() -> None:
    """Print the MoE families of the installed transformers: model_type, the model it runs as, its entry."""
    for model_type in moe_model_types():
        runs_as = text_model_type(model_type)
        entry = "registry entry" if ALIASES.get(runs_as, runs_as) in FAMILIES and FAMILIES[
            ALIASES.get(runs_as, runs_as)].router is not None else "found by structure"
        print(f"{model_type:24} {runs_as if runs_as != model_type else '':24} {entry}")


if __name__ == "__main__":
    main()
