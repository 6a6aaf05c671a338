"""A trained LoRA adapter re-laid out for the servers that load it: pure tensor work on PEFT state dicts.

Inside, an adapter is a dict target -> Factors: for a Linear (target_modules) `a` (r, in) and `b` (out, r); for a
fused expert parameter (target_parameters, `...experts.gate_up_proj`) `a` (E, r, in) and `b` (E, out, r) in the
logical (out, in) orientation of each expert's matrix, whichever way the family stores it. The LoRA scaling is
folded into `b`, so the update of a matrix is always b @ a.

PEFT's saved layout of a fused expert parameter (peft 0.19 and later): lora_A (E*r, in) with the experts outer,
lora_B (out, r*E) with the experts inner; per expert A_e = A.view(E, r, in)[e], B_e = B.view(out, r, E)[..., e].
Both parameters of one experts module share its name: `experts.base_layer.lora_*` is gate_up_proj and
`experts.lora_*` is down_proj (PEFT's nesting, which vLLM's loader also assumes). PEFT 0.18 read every 3-D
parameter as (E, in, out); for the (E, out, in) parameters of most families its lora_A therefore spans `out` and
its lora_B `in` (PEFT#3165 swapped them in 0.19): such adapters are read with the roles of A and B exchanged.

Per-expert 2-D keys are named as the base checkpoint names each expert's weights on disk (Mixtral's
`block_sparse_moe.experts.{e}.w1`, Qwen's `mlp.experts.{e}.gate_proj`): transformers' own reverse weight
conversion (what `save_pretrained` writes) is run on a probe tensor whose entries are (expert, row) indices, so
which rows of gate_up_proj become which file's gate or up (concatenated or interleaved) is read off, not assumed.

SGLang's stacked experts keys (families whose checkpoint stores the experts fused, so there are no per-expert names),
read from SGLang's source as the code index stores it: LoRAMemoryPool.load_lora_weight_to_buffer (mem_pool.py at
00639c4d) takes a 3-D tensor whose name holds `experts` (`elif "experts" in name and weights.dim() == 3`) into the
`gate_up_proj_moe` / `down_proj_moe` buffer of the layer its `layers.{l}.` names, one [c*r, in] A and one [out, r]
B per expert (_iter_local_expert_weights walks the leading experts dimension), B times lora_alpha / r;
LoRAAdapter.normalize_gate_up_proj (lora.py, the version with _is_non_gated_moe_weight) repeats an already stacked
`gate_up_proj` lora_A twice along its rank dimension, so gate and up share A_e as in PEFT's 3-D layout;
FusedMoEWithLoRA._slice_moe_b_2d (layers.py, the version with _uses_interleaved_gate_up) reads B's first half as
the gate rows and its second as the up rows, and interleaves them itself where the base interleaves (gpt-oss,
gemm1_alpha set). So: `...experts.gate_up_proj.lora_A` (E, r, H), `...lora_B` (E, 2I, r) as [gate; up],
`...experts.down_proj.lora_A` (E, r, I), `...lora_B` (E, H, r), in each expert's (out, in) orientation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from packaging.version import Version
from torch import nn

from finetune.modeling import moe

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
GATE_UP, DOWN = "gate_up_proj", "down_proj"
SWAP_FIXED_IN = Version("0.19.0")  # PEFT#3165: in/out of (E, out, in) parameters read the right way round


FUSED_ON_DISK = ("the base checkpoint stores this family's experts fused (one 3-D tensor, not a matrix per expert): "
                 "there are no per-expert names to write their LoRA under")
NOT_ONE_EXPERTS_MODULE = ("this family's experts are not one experts module holding gate_up_proj and down_proj "
                          "(JetMoE's input_linear and output_linear hold one `weight` each) and its checkpoint stores "
                          "them fused, so there are no per-expert names either")
SGLANG_NO_STACKED = (f"{NOT_ONE_EXPERTS_MODULE}: SGLang reads stacked expert LoRA only as `...experts.gate_up_proj` / "
                     f"`...experts.down_proj` of one FusedMoE (mem_pool.py at 00639c4d), and SGLang has no JetMoE "
                     f"model class (no python/sglang/srt/models/jetmoe.py). Use --format merged")
VLLM_NO_STACKED = (f"{NOT_ONE_EXPERTS_MODULE}: vLLM reads PEFT's 3-D experts layout only as `<experts>.base_layer` "
                   f"(gate_up_proj) and `<experts>` (down_proj) of one FusedMoE module (vllm/lora/model_manager.py "
                   f"at 01533aa, _stack_moe_lora_weights and _convert_3d_to_2d_moe_lora), and vLLM has no JetMoE "
                   f"model class (no vllm/model_executor/models/jetmoe.py). Use --format merged")
FLAT_EXPERTS = ("this family's experts are three flat matrices per layer (DBRX's w1, v1, w2, each (experts x ffn, "
                "hidden) on disk; moetune views them as 3-D), not one experts module holding gate_up_proj and "
                "down_proj, and the checkpoint has no per-expert names")
VLLM_FLAT = (f"{FLAT_EXPERTS}: vLLM's DbrxForCausalLM (vllm/model_executor/models/dbrx.py at 055e47c2, the class "
             f"registry.py at 685269b9 maps DbrxForCausalLM to, and every other copy the code index holds: "
             f"`class DbrxForCausalLM(nn.Module, SupportsPP)` over `DbrxExperts(FusedMoE)`) does not implement "
             f"SupportsLoRA, and vLLM's LoRA runner (vllm/v1/worker/lora_model_runner_mixin.py) stops with "
             f"'DbrxForCausalLM does not support LoRA yet'. Use --format merged")
SGLANG_FLAT = (f"{FLAT_EXPERTS}: SGLang's DbrxForCausalLM (python/sglang/srt/models/dbrx.py at 9c60ab42, and the "
               f"newer copy with ForwardBatch the code index holds) is a plain nn.Module whose experts are its own "
               f"`ws`/`w2s` Parameters (load_weights maps experts.mlp.w1/v1 -> ws, w2 -> w2s) run by fused_moe, not a "
               f"FusedMoE module, which is what SGLang's LoRA code wraps. Use --format merged")
VLLM_INTERLEAVED = ("this family's gate_up_proj interleaves gate and up rows, and vLLM's mixed-format loader "
                    "(_convert_3d_to_2d_moe_lora) splits it into halves for every class but GptOssForCausalLM. "
                    "Use --format merged")
# The newest SGLang LoRA code the code index holds: python/sglang/srt/lora/utils.py and lora_manager.py at 300a92ca
# (the dense-LoRA runner's commit, lora/dense/runner.py; utils there defines Phase and get_default_hidden_dim), and
# the lora.py whose LoRAAdapter takes `base_model=` as that lora_manager constructs it (the other stored lora.py
# versions either lack that parameter, the one with a DeepSeek-V2/V3 MLA branch keeping a lone q_proj, or import
# utils.normalize_lora_qkv_weights, which utils.py at 300a92ca does not define).
SGLANG_NO_QKV = ("this family's q_proj has no v_proj beside it (latent or linear attention), and SGLang cannot "
                 "load it: LoRAAdapter.normalize_qkv_proj (lora.py, the version whose LoRAAdapter takes base_model= "
                 "as lora_manager.py at 300a92ca builds it) stacks every key holding `q_proj` with `weights[v_name]` "
                 "into qkv_proj, a KeyError without a v_proj (the zero-filled v_proj of sgl-project/sglang#28199 is "
                 "an open pull request), and even stacked, get_normalized_target_modules (utils.py at 300a92ca) "
                 "maps q_proj to qkv_proj while LoRAManager.init_lora_modules (lora_manager.py at 300a92ca) wraps a "
                 "module only when its own name is a normalized target, so a q projection that is a module of its "
                 "own (MLA without q_lora_rank, linear attention) gets no LoRA. Use --format merged")
# SGLang's per-expert key leaves: its loader (lora.py, LoRAAdapter._rename_expert_w_to_proj) renames w1/w3/w2 to
# gate_proj/up_proj/down_proj, stacks gate_proj + up_proj of each expert into gate_up_proj, and wraps an experts
# module (FusedMoE) only when the adapter's target_modules normalize to both gate_up_proj and down_proj
# (lora_manager.init_lora_modules): the keys and target_modules carry these names, not the checkpoint's w1/w3/w2.
SGLANG_EXPERT_LEAVES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                        "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
PER_EXPERT = re.compile(r"^(?P<head>.+\.experts\.\d+)\.(?P<leaf>[^.]+)$")


FUSED_LINEAR_ON_DISK = ("the base checkpoint has no tensor named `<module>.weight` holding this Linear's rows (Inkling "
                        "2 stores it under a parameter name, `k_sconv.weight_proj`): there is no module name on disk "
                        "to write its LoRA under. Use --format merged")
SGLANG_SHARED_LINEAR = ("the base checkpoint stores this Linear inside one tensor with others (Sarvam's "
                        "query_key_value, LaraMini's linear-attention in_proj), which a server can only take as one "
                        "LoRA module on that tensor (moetune writes it so for vLLM, whose SarvamMoEForCausalLM, a "
                        "BailingMoeForCausalLM, maps query_key_value -> [query_key_value]); SGLang sizes such a "
                        "module's LoRA buffers only through the model class's get_hidden_dim, and "
                        "utils.get_default_hidden_dim (utils.py at 300a92ca) raises NotImplementedError for "
                        "query_key_value and in_proj: SGLang's SarvamMoEForCausalLM (models/sarvam_moe.py at "
                        "d7b80314) is a BailingMoEForCausalLM, which defines no get_hidden_dim "
                        "(models/bailing_moe.py at b0f07a55, nor its later stored version with "
                        "set_eagle3_layers_to_capture), and the code index holds no SGLang model class for LaraMini. "
                        "Use --format merged")
# model_type -> why SGLang cannot load LoRA on the family's own Linears: it has no model class for the family, and
# none of its classes sizes those modules. An adapter on the experts only is still written (SGLang's stacked 3-D
# keys are sized from the FusedMoE module, mem_pool.py at 00639c4d), and the export warns that SGLang registers no
# class for the architecture (server_classes): the layout is expressible, serving it needs an SGLang with the class.
SGLANG_NO_INKLING2 = ("SGLang has no Inkling 2 model class to size the LoRA of Inkling 2's own Linears (the short "
                      "convolutions' weight_proj, the attention sink and gate projections): models/inkling.py (at "
                      "e5283137) registers InklingForConditionalGeneration and its MTP draft only (EntryClass), and "
                      "that class's LoRA (its get_hidden_dim) sizes only qkvr (wq_du, wk_dv, wv_dv, wr_du stacked), "
                      "wo_ud, the dense gate_up_proj/down_proj, the experts and the embeddings, raising "
                      "NotImplementedError for gate_attn, attn_sink_proj and the short convolutions' weight_proj. "
                      "Train the experts only (exported with a warning), or use --format merged")
SGLANG_NO_MODEL_CLASS = {"inkling2_text": SGLANG_NO_INKLING2, "inkling2_loop_text": SGLANG_NO_INKLING2}


class LayoutError(ValueError):
    """A format cannot express this adapter; the message says why and what to do instead."""


class FusedOnDisk(LayoutError):
    """The base checkpoint has no per-expert matrices to name the experts' LoRA after."""


@dataclass
class Factors:
    a: torch.Tensor  # (r, in) or (E, r, in)
    b: torch.Tensor  # (out, r) or (E, out, r), scaling folded in

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    def delta(self) -> torch.Tensor:
        return self.b @ self.a


@dataclass(frozen=True)
class ExpertsInfo:
    """What the re-layout needs to know of one experts module of the base model."""

    counts: dict[str, int]  # parameter -> experts it holds (LongCat-Flash's gate_up_proj has its zero-computation
    # experts too, down_proj only the routed ones)
    transposed: bool  # stored (E, in, out) (gpt-oss) instead of (E, out, in)
    shapes: dict[str, tuple[int, int]]  # parameter -> logical (out, in)
    # Its 3-D parameters: (input projection, down_proj), as gate_up_proj (or Nemotron-H's up_proj) and down_proj;
    # PEFT nests the two wrappers, the inner one (`base_layer`) holds the first. One (JetMoE's `weight`) where each
    # projection is its own experts module; three (DBRX's w1, v1, w2, as PEFT sees them: (E, ffn, hidden) each).
    params: tuple[str, ...] = (GATE_UP, DOWN)
    # gate_up_proj's rows [gate; up] (transformers' is_concatenated, its default) or interleaved (gpt-oss)
    concatenated: bool = True
    # stored (E, in, out) without transformers' is_transposed flag (Llama 4's bmm experts): `shapes` and the factors
    # are then in the stored orientation, and each expert's (out, in) matrix is their transpose
    unflagged_transpose: bool = False
    # flat on disk (DBRX's w1, v1, w2: finetune/modeling/flat_experts.py): no server's expert LoRA layout fits
    flat: bool = False


def experts_info(model: nn.Module) -> dict[str, ExpertsInfo]:
    """Every fused experts module of `model` by qualified name (no "base_model.model." prefix): the modules holding
    3-D expert parameters, found by structure as training finds them."""
    found = {}
    count = moe.config_expert_count(model)
    hidden = model.config.get_text_config().hidden_size
    for name, module in moe.experts_modules(model).items():
        params = tuple(sorted(moe.expert_parameter_names(module, count), key=lambda param: param == DOWN))
        transposed = bool(getattr(module, "is_transposed", False))
        shapes, counts = {}, {}
        for param in params:
            counts[param], first, second = getattr(module, param).shape
            shapes[param] = (second, first) if transposed else (first, second)
        out_features, in_features = shapes[params[0]]
        unflagged = len(params) == 2 and out_features == hidden != in_features  # the input projection reads hidden
        found[name] = ExpertsInfo(counts, transposed, shapes, params, bool(getattr(module, "is_concatenated", True)),
                                  unflagged, hasattr(module, "flat_experts"))
    return found


# ---------------------------------------------------------------- reading PEFT's layout

def scaling(config: dict) -> float:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LayoutError("the adapter sets rank_pattern/alpha_pattern, which moetune's export does not read; "
                          "export it with --format peft, or train with one rank.")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def check_plain_lora(config: dict) -> None:
    """What no per-matrix re-layout can carry: DoRA's magnitudes, LoRA biases, weights of whole modules."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LayoutError(f"the adapter is {config['peft_type']}, not LoRA.")
    if config.get("use_dora"):
        raise LayoutError("the adapter uses DoRA (a magnitude vector per matrix, not a low-rank update): vLLM does "
                          "not load DoRA adapters. Use --format merged, or train without DoRA.")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise LayoutError("the adapter trains biases; export it with --format merged.")
    if config.get("modules_to_save"):
        raise LayoutError(f"the adapter saves whole modules ({config['modules_to_save']}); export it with --format "
                          f"merged.")


def is_old_layout(config: dict) -> bool:
    """Saved by a PEFT that read (E, out, in) parameters as (E, in, out) (before 0.19)."""
    version = config.get("peft_version")
    return version is not None and Version(version.split("+")[0]) < SWAP_FIXED_IN


def names_experts(target: str, experts: dict[str, ExpertsInfo]) -> bool:
    """Whether a `target_parameters` entry (`mlp.experts.down_proj`) names a parameter of an experts module."""
    module, _, param = target.rpartition(".")
    return any((owner == module or owner.endswith("." + module)) and param in info.params
               for owner, info in experts.items())


def expert_target(module: str, experts: dict[str, ExpertsInfo], config: dict) -> tuple[str, str] | None:
    """(experts module, parameter) a wrapper key names, or None for a Linear. PEFT nests one wrapper per targeted
    parameter of a module, the first registered innermost: with n targeted, the i-th (in registration order) is under
    n - 1 - i `.base_layer`s (gate_up_proj under one, down_proj under none; DBRX's w1, v1, w2 under two, one, none)."""
    owner, depth = module, 0
    while owner not in experts and owner.endswith(".base_layer"):
        owner, depth = owner.removesuffix(".base_layer"), depth + 1
    if owner not in experts:
        return None
    targeted = [p for p in experts[owner].params if any(t.endswith("." + p) or t == p
                                                        for t in config.get("target_parameters") or ())]
    return owner, targeted[len(targeted) - 1 - depth]


def wrapper_depth(info: ExpertsInfo, targeted: list[str], param: str) -> int:
    """How many `.base_layer`s PEFT puts between an experts module's name and `param`'s wrapper (expert_target)."""
    ordered = [p for p in info.params if p in targeted]
    return len(ordered) - 1 - ordered.index(param)


def read_peft(tensors: dict[str, torch.Tensor], config: dict, experts: dict[str, ExpertsInfo],
              servable: bool = True) -> dict[str, Factors]:
    """A saved PEFT adapter (either layout) as target -> Factors. `servable`: refuse what vLLM/SGLang cannot apply
    (DoRA, biases, whole modules, a router); otherwise (the merged export's delta report) read the LoRA pairs only."""
    if servable:
        check_plain_lora(config)
        router = [t for t in config.get("target_parameters") or () if not names_experts(t, experts)]
        if router:
            raise LayoutError(f"the adapter trains the router ({', '.join(router)}): vLLM and SGLang apply LoRA to "
                              f"Linear layers and experts only, not to a router weight. Use --format merged.")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor.float()
        elif servable:
            raise LayoutError(f"the adapter holds {key}, which is not a LoRA A/B matrix; export it with --format "
                              f"merged.")
    s, old = scaling(config), is_old_layout(config)
    factors = {}
    for module, pair in pairs.items():
        target = expert_target(module, experts, config)
        if target is None:
            factors[module] = Factors(pair["A"], pair["B"] * s)
            continue
        owner, param = target
        info = experts[owner]
        factors[f"{owner}.{param}"] = expert_factors(pair["A"], pair["B"], info, param, old and not info.transposed, s)
    return factors


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, info: ExpertsInfo, param: str, swapped: bool,
                   s: float) -> Factors:
    """One fused expert parameter's A and B as per-expert (E, r, in) / (E, out, r) factors."""
    e = info.counts[param]
    out_features, in_features = info.shapes[param]
    rank = lora_a.shape[0] // e
    if swapped:  # PEFT 0.18: A spans `out`, B spans `in`, and the update is (B_e A_e)^T
        a = lora_b.reshape(in_features, rank, e).permute(2, 1, 0)
        b = lora_a.reshape(e, rank, out_features).permute(0, 2, 1)
    else:
        a = lora_a.reshape(e, rank, in_features)
        b = lora_b.reshape(out_features, rank, e).permute(2, 0, 1)
    if a.shape != (e, rank, in_features) or b.shape != (e, out_features, rank):
        raise LayoutError(f"the adapter's {param} factors {tuple(lora_a.shape)}/{tuple(lora_b.shape)} do not fit "
                          f"{e} experts of ({out_features}, {in_features}): it was trained on another model.")
    return Factors(a.contiguous(), (b * s).contiguous())


# ---------------------------------------------------------------- combining a chain of adapters

def combine(adapters: list[dict[str, Factors]]) -> dict[str, Factors]:
    """One adapter equal to the sum of the updates of several (SFT then DPO on top of it): the ranks concatenated.

    b1 a1 + b2 a2 = [b1 b2] [a1; a2], exactly; a target only one adapter has gets zeros for the other's share."""
    if len(adapters) == 1:
        return adapters[0]
    combined = {}
    for target in dict.fromkeys(t for adapter in adapters for t in adapter):
        parts = [adapter.get(target) for adapter in adapters]
        shape = next(p for p in parts if p is not None)
        filled = [p or Factors(shape.a.new_zeros(*shape.a.shape[:-2], 0, shape.a.shape[-1]),
                               shape.b.new_zeros(*shape.b.shape[:-1], 0)) for p in parts]
        combined[target] = Factors(torch.cat([p.a for p in filled], -2), torch.cat([p.b for p in filled], -1))
    return combined


def padded(factors: Factors, rank: int) -> Factors:
    """The same update at a higher rank (zero rows of a, zero columns of b): servers want one rank per adapter."""
    extra = rank - factors.rank
    if extra == 0:
        return factors
    return Factors(torch.cat([factors.a, factors.a.new_zeros(*factors.a.shape[:-2], extra, factors.a.shape[-1])], -2),
                   torch.cat([factors.b, factors.b.new_zeros(*factors.b.shape[:-1], extra)], -1))


def max_rank(factors: dict[str, Factors]) -> int:
    return max(f.rank for f in factors.values())


# ---------------------------------------------------------------- writing layouts

def lora_config(base: str, rank: int, target_modules: list[str], target_parameters: list[str] | None) -> dict:
    """adapter_config.json for factors with the scaling folded in (alpha = r: scaling 1)."""
    import peft

    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": rank, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
            "fan_in_fan_out": False, "target_modules": sorted(target_modules),
            "target_parameters": sorted(target_parameters) if target_parameters else None,
            "modules_to_save": None, "inference_mode": True, "peft_version": peft.__version__}


def to_peft(factors: dict[str, Factors], experts: dict[str, ExpertsInfo]) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's current layout (3-D experts through target_parameters): (tensors, config fields r, targets)."""
    rank = max_rank(factors)
    tensors, modules, parameters = {}, set(), set()
    by_owner: dict[str, list[str]] = {}
    for target in factors:
        owner, _, param = target.rpartition(".")
        if owner in experts and param in experts[owner].params:
            by_owner.setdefault(owner, []).append(param)
    for target, factor in factors.items():
        factor = padded(factor, rank)
        owner, _, param = target.rpartition(".")
        if owner in experts and param in experts[owner].params:
            e = experts[owner].counts[param]
            module = owner + ".base_layer" * wrapper_depth(experts[owner], by_owner[owner], param)
            lora_a = factor.a.reshape(e * rank, factor.a.shape[-1])
            lora_b = factor.b.permute(1, 2, 0).reshape(factor.b.shape[1], rank * e)
            parameters.add(".".join(owner.split(".")[-2:] + [param]))
        else:
            module, lora_a, lora_b = target, factor.a, factor.b
            modules.add(target)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b.contiguous()
    return tensors, {"r": rank, "target_modules": sorted(modules), "target_parameters": sorted(parameters)}


def checkpoint_rows(model: nn.Module, names: dict[str, int]) -> dict[str, list[tuple[str, int, torch.Tensor,
                                                                                   torch.Tensor]]]:
    """How the base checkpoint stores each named weight: name -> [(file key, expert, rows, where)] for fused experts
    ((E, out, in) logical names with `out` rows) and Linears ((out, in); expert -1): the name's `rows` lie at rows
    `where` of the file tensor (all of it, unless several Linears share one tensor, as Sarvam's query_key_value).

    Runs transformers' reverse weight conversion (what save_pretrained writes) on probe tensors holding each row's
    (expert, row) index; rows that come back in a 2-D tensor of one file key belong to that key."""
    from transformers.core_model_loading import revert_weight_conversion

    probes, ranges, offset = {}, [], 0
    for name, (experts, rows) in names.items():
        size = max(experts, 1) * rows
        index = torch.arange(offset, offset + size, dtype=torch.float64)
        probes[name] = index.reshape(experts, rows, 1) if experts else index.reshape(rows, 1)
        ranges.append((offset, offset + size, name))
        offset += size
    placed: dict[str, list] = {name: [] for name in names}
    starts = torch.tensor([start for start, _, _ in ranges])
    for key, tensor in revert_weight_conversion(model, dict(probes)).items():
        if tensor.dim() != 2 or tensor.shape[-1] != 1 or not key.endswith(".weight"):
            continue  # fused (3-D), transposed, or not a module's weight on disk: no LoRA module name for it
        flat = tensor.flatten().long()
        owners = torch.searchsorted(starts, flat, right=True) - 1  # which name each row of the file tensor holds
        pieces = []
        for index in owners.unique().tolist():
            start, _, name = ranges[index]
            where = (owners == index).nonzero().flatten()
            experts, rows = names[name]
            local = flat[where] - start
            expert = int(local[0] // rows) if experts else -1
            if experts and (len(where) != len(flat) or not bool((local // rows == expert).all())):
                break  # one file key mixing experts: not a per-expert matrix
            pieces.append((name, (key.removesuffix(".weight"), expert, local % rows, where)))
        else:
            for name, piece in pieces:
                placed[name].append(piece)
    return placed


def computed_experts(info: ExpertsInfo) -> int:
    """The experts every parameter holds: the ones the forward multiplies. LongCat-Flash's gate_up_proj also holds
    its zero-computation (identity) experts, which vLLM's and SGLang's FusedMoE leave out (routed experts only)."""
    return min(info.counts.values())


def to_per_expert(factors: dict[str, Factors], experts: dict[str, ExpertsInfo], model: nn.Module,
                  shared_linears: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-expert 2-D keys (`...experts.{e}.{gate,up,down}` as the checkpoint names them), attention, shared
    experts and dense MLPs as ordinary Linears; every expert of an adapted experts module gets all three
    projections (zeros where the adapter has none), as vLLM's packing of experts requires. Linears the checkpoint
    stores in one tensor become one LoRA on it (one_lora), or, without `shared_linears`, are refused for SGLang.
    Ranks as the factors' (pad_ranks evens them). (tensors, module names)"""
    rank = max_rank(factors)
    complete = dict(factors)
    for owner in {t.rpartition(".")[0] for t in factors} & set(experts):
        info = experts[owner]
        for param in info.params:
            out_features, in_features = info.shapes[param]
            complete.setdefault(f"{owner}.{param}", Factors(torch.zeros(info.counts[param], rank, in_features),
                                                            torch.zeros(info.counts[param], out_features, rank)))
    names = {}
    for target, factor in complete.items():
        owner, _, param = target.rpartition(".")
        if owner in experts:
            names[target] = (experts[owner].counts[param], factor.b.shape[1])
        else:
            names[f"{target}.weight"] = (0, factor.b.shape[0])
    rows_of = checkpoint_rows(model, names)
    placed = {t: rows_of[t if t.rpartition(".")[0] in experts else f"{t}.weight"] for t in complete}
    # nothing of its own on disk: the experts' reason first (a family with both says what matters most)
    for target in sorted((t for t in complete if not placed[t]), key=lambda t: t.rpartition(".")[0] not in experts):
        if target.rpartition(".")[0] in experts:
            raise FusedOnDisk(f"{FUSED_ON_DISK} ({target})")
        raise LayoutError(f"{FUSED_LINEAR_ON_DISK} ({target})")
    by_key: dict[str, list[Factors]] = {}
    for target, factor in complete.items():
        factor = padded(factor, rank)
        owner = target.rpartition(".")[0]
        pieces = placed[target]
        covered = sum(len(rows) for _, _, rows, _ in pieces)
        expected = factor.b.shape[-2] * (factor.b.shape[0] if factor.b.dim() == 3 else 1)
        if covered != expected:
            raise LayoutError(f"the base checkpoint splits {target} in a way moetune cannot map row by row.")
        for key, expert, rows, where in pieces:
            if owner in experts and expert >= computed_experts(experts[owner]):
                continue  # a zero-computation expert: never multiplied, and the servers hold no weights for it
            a, b = (factor.a[expert], factor.b[expert]) if factor.b.dim() == 3 else (factor.a, factor.b)
            placed_b = b.new_zeros(int(where.max()) + 1, b.shape[1])
            placed_b[where] = b[rows]
            by_key.setdefault(key, []).append(Factors(a, placed_b))
            if len(by_key[key]) > 1 and not shared_linears:
                raise LayoutError(f"{SGLANG_SHARED_LINEAR} ({target})")
    return {name: tensor for key, parts in by_key.items() for name, tensor in one_lora(key, parts).items()}, \
        list(by_key)


def one_lora(key: str, parts: list[Factors]) -> dict[str, torch.Tensor]:
    """One file tensor's LoRA: a Linear's or an expert matrix's own; for Linears stored in one tensor (Sarvam's
    query_key_value) their A's stacked and their B's side by side, each on its own rows (zeros elsewhere), so
    B @ A is each one's update on its rows. Its rank is then the sum of theirs (pad_ranks evens the adapter)."""
    rows = max(part.b.shape[0] for part in parts)
    b = torch.cat([torch.cat([part.b, part.b.new_zeros(rows - part.b.shape[0], part.b.shape[1])]) for part in parts],
                  1)
    return {f"{PREFIX}{key}.lora_A.weight": torch.cat([part.a for part in parts]).contiguous(),
            f"{PREFIX}{key}.lora_B.weight": b.contiguous()}


def pad_ranks(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """2-D LoRA keys padded to the highest rank among them (zero rows of A, zero columns of B): one rank per
    adapter, as the servers want. (tensors, rank)"""
    rank = max(tensor.shape[0] for name, tensor in tensors.items() if ".lora_A." in name)
    padded_keys = {}
    for name, tensor in tensors.items():
        extra = rank - (tensor.shape[0] if ".lora_A." in name else tensor.shape[1])
        zeros = tensor.new_zeros((extra, tensor.shape[1]) if ".lora_A." in name else (tensor.shape[0], extra))
        padded_keys[name] = torch.cat([tensor, zeros], 0 if ".lora_A." in name else 1) if extra else tensor
    return padded_keys, rank


def stacked_experts(factors: dict[str, Factors], experts: dict[str, ExpertsInfo],
                    refusals: tuple[str, str]) -> dict[str, Factors]:
    """The expert targets as a server reads one fused experts module (gate_up_proj, down_proj), each in its experts'
    (out, in) orientation (Llama 4's stored (E, in, out) transposed); refused where the experts are not one such
    module: `refusals` (experts of another layout, flat experts)."""
    found = {}
    for target, factor in factors.items():
        owner = target.rpartition(".")[0]
        if owner not in experts:
            continue
        info = experts[owner]
        if info.params != (GATE_UP, DOWN):
            raise LayoutError(f"{refusals[info.flat]} ({target})")
        found[target] = Factors(factor.b.transpose(1, 2), factor.a.transpose(1, 2)) if info.unflagged_transpose \
            else factor
    return found


def to_sglang_stacked(factors: dict[str, Factors], experts: dict[str, ExpertsInfo],
                      model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SGLang's stacked experts keys (module docstring) for experts fused on disk; attention, shared experts and
    dense MLPs as SGLang's 2-D keys (to_per_expert, sglang_names). (tensors, module names)"""
    rank = max_rank(factors)
    factors = {target: padded(factor, rank) for target, factor in factors.items()}
    linears = {t: f for t, f in factors.items() if t.rpartition(".")[0] not in experts}
    tensors, modules = sglang_names(*to_per_expert(linears, experts, model, False)) if linears else ({}, [])
    for target, factor in stacked_experts(factors, experts, (SGLANG_NO_STACKED, SGLANG_FLAT)).items():
        owner, _, param = target.rpartition(".")
        info, b = experts[owner], factor.b
        if param == GATE_UP and not info.concatenated:  # SGLang wants [gate; up] and interleaves for such bases
            b = torch.cat([b[:, 0::2], b[:, 1::2]], 1)
        kept = computed_experts(info)  # SGLang's FusedMoE holds the routed experts only
        tensors[f"{PREFIX}{target}.lora_A.weight"] = factor.a[:kept].contiguous()
        tensors[f"{PREFIX}{target}.lora_B.weight"] = b[:kept].contiguous()
        modules += [f"{owner}.{GATE_UP}", f"{owner}.{DOWN}"]  # SGLang wraps the experts only when both are targets
    return tensors, list(dict.fromkeys(modules))


def to_vllm_mixed(factors: dict[str, Factors], experts: dict[str, ExpertsInfo]) -> tuple[dict[str, torch.Tensor],
                                                                                             dict]:
    """PEFT's 3-D layout as vLLM's mixed-format loader reads it (vllm/lora/model_manager.py at 01533aa,
    LoRAModelManager._convert_3d_to_2d_moe_lora, used with --enable-mixed-moe-lora-format for a request declaring
    is_3d_lora_weight): `<experts>.base_layer.lora_A` (r*E, hidden) / `lora_B` (2I, r*E) for gate_up_proj, gate and
    up sharing A and split as B's halves (w1 first; interleaved only for GptOssForCausalLM), `<experts>.lora_*`
    (r*E, I) / (hidden, r*E) for down_proj: each expert's (out, in) orientation, which is PEFT's own file for every
    family but Llama 4. (tensors, config fields) as to_peft."""
    stacked = stacked_experts(factors, experts, (VLLM_NO_STACKED, VLLM_FLAT))
    for target in stacked:
        if not experts[target.rpartition(".")[0]].concatenated:
            raise LayoutError(f"{VLLM_INTERLEAVED} ({target})")
    return to_peft({**factors, **stacked}, experts)


def sglang_names(tensors: dict[str, torch.Tensor], modules: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-expert 2-D keys (to_per_expert) renamed as SGLang's loader looks them up: each expert's projections as
    gate_proj / up_proj / down_proj (SGLANG_EXPERT_LEAVES), a non-gated expert's one input projection (Nemotron-H's
    up_proj) as gate_proj; attention, shared experts and dense MLPs unchanged.

    Non-gated experts, as SGLang reads them: LoRAAdapter.normalize_gate_up_proj (lora.py, the version with
    _is_non_gated_moe_weight) renames an expert's gate_proj that has no up_proj to gate_up_proj unstacked when the
    layer's FusedMoE is not gated (moe_runner_config.is_gated), NemotronHForCausalLM.get_stacked_multiply gives
    gate_up_proj_moe one slot ("Non-gated: only w1, no w3"), and FusedMoEWithLoRA._slice_moe_b_2d takes that B as
    the expert's [intermediate, r] w1; an expert up_proj without a gate_proj is left as `up_proj`, for which the
    pool makes no per-expert buffer (only gate_up_proj_moe / down_proj_moe)."""
    leaves = {}
    for module in modules:
        match = PER_EXPERT.match(module)
        if match is not None:
            leaf = SGLANG_EXPERT_LEAVES.get(match["leaf"])
            if leaf is None:
                raise LayoutError(f"the base checkpoint names an expert matrix {module}; SGLang's loader reads only "
                                  f"gate_proj/up_proj/down_proj (or w1/w3/w2) per expert. Use --format merged.")
            leaves[module] = (match["head"], leaf)
    gated = {head for head, leaf in leaves.values() if leaf == "gate_proj"}
    renamed, names = {}, []
    for module in modules:
        name = module
        if module in leaves:
            head, leaf = leaves[module]
            name = f"{head}.{'gate_proj' if leaf == 'up_proj' and head not in gated else leaf}"
        for ab in "AB":
            renamed[f"{PREFIX}{name}.lora_{ab}.weight"] = tensors[f"{PREFIX}{module}.lora_{ab}.weight"]
        names.append(name)
    return renamed, names


def check_sglang_model(model_type: str, targets, experts: dict[str, ExpertsInfo]) -> None:
    """Refuse an adapter on a Linear of a family SGLang has no model class for (SGLANG_NO_MODEL_CLASS); an
    experts-only adapter passes (the export warns that SGLang registers no class for the architecture)."""
    linears = sorted(target for target in targets if target.rpartition(".")[0] not in experts)
    if model_type in SGLANG_NO_MODEL_CLASS and linears:
        raise LayoutError(f"{SGLANG_NO_MODEL_CLASS[model_type]} ({linears[0]})")


def check_sglang_qkv(targets) -> None:
    """SGLang's loader (lora.py LoRAAdapter.normalize_qkv_proj, SGLANG_NO_QKV) stacks every q_proj with the v_proj
    beside it (and k_proj, or zeros) into qkv_proj, reading `v_proj` unconditionally: a q_proj without a v_proj
    sibling (latent or linear attention) has no slot there. Checked on the adapter's module names, before the
    re-layout's own refusals."""
    present = set(targets)
    for target in targets:
        head, _, leaf = target.rpartition(".")
        if leaf == "q_proj" and f"{head}.v_proj" not in present:
            raise LayoutError(f"{SGLANG_NO_QKV} ({target})")
