"""QLoRA that reaches the experts: NF4 storage of the fused expert weights, a forward that dequantizes one expert at a
time (or, for experts that run their own forward, their weights read dequantized), and LoRA on those experts that
saves as a standard PEFT adapter.

bitsandbytes quantizes `nn.Linear` layers only. In transformers 5 the experts of Mixtral, Qwen3-MoE and OLMoE are
fused 3-D Parameters, `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) (gpt-oss stores them transposed, with
biases), about 95% of the weights, so a stock 4-bit load leaves them in full precision. Here every expert's matrix
is quantized with bitsandbytes' `quantize_4bit` (NF4, blocks of 64, optionally double quantization of the block
scales). The packed bytes replace the Parameter under its own name, so PEFT's `target_parameters` still finds it;
the scales are buffers beside it.

Every kernel path must read the blocks back as they were written. quantize_4bit cuts the flattened matrix into blocks
of 64, but bitsandbytes' AVX-512 CPU kernel for dequantize_4bit (bitsandbytes 0.50) cuts each row on its own, so a
matrix whose rows are not a whole number of blocks comes back wrong (relative error 0.2-0.4 instead of NF4's ~0.1).
Rows are therefore zero-padded to a multiple of 64 before quantizing (the forward pads its input to match; real
models' sizes are multiples of 64 and need none), and every quantized matrix is dequantized once at load time and
compared with the original, so a kernel that still gets it wrong stops the run naming the matrix.

The forward is registered with transformers' experts interface as "moetune_nf4". For each expert that received
tokens, `bitsandbytes.matmul_4bit` dequantizes that expert's matrix, multiplies and drops it, then the family's own
`_apply_gate` runs (Mixtral's SwiGLU; gpt-oss's interleaved gate/up and clamped SwiGLU); its backward
dequantizes again instead of keeping the matrix for later, so training never holds a layer's experts in full
precision. Non-gated experts (Nemotron-H's up_proj, `has_gate=False`) go through the activation instead.

Experts this forward cannot stand in for (Llama 4's and LongCat-Flash's own forwards, outside the experts interface;
JetMoE's one weight per projection module; DBRX's flat weights, read by its DbrxExperts; a per-expert output norm)
keep their forward, and reading a quantized
parameter gives it dequantized, plus the active adapter's update (read_dequantized): one layer's experts exist in
full precision while that layer runs, and autograd keeps a recipe instead of them for the backward.

LoRA: PEFT's ParamWrapper (what `target_parameters` creates) adds its delta by re-parametrizing the whole parameter
as W + B A, which needs W in full precision. `QuantizedExpertsLora` is a ParamWrapper that hands its factors to the
forward instead, which adds scaling * (x A_e^T) B_e^T for each expert e (the dequantized read adds scaling * B_e A_e
to the weights). Its weights, their names and the config are PEFT's own, so the saved adapter is a standard PEFT
adapter that `PeftModel.from_pretrained` loads onto the full-precision base (and `moetune merge` merges there).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraConfig as PeftLoraConfig
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from finetune.modeling import moe

# bitsandbytes is imported by the functions that quantize, not with this module: importing it prints warnings about
# kernels a machine lacks, which every command would show though only `model.quantization` recipes use it.

EXPERTS_IMPLEMENTATION = "moetune_nf4"
BLOCKSIZE = 64  # bitsandbytes' default for NF4: one scale per 64 weights
NESTED_BLOCKSIZE = 256  # double quantization: the 8-bit scales get one fp32 scale per 256
# NF4's relative round-trip error is about 0.09 on Gaussian weights, 0.10 on Laplace, 0.12 on Student-t(3); blocks
# read back in the wrong layout measure 0.2-0.4.
MAX_ROUND_TRIP_ERROR = 0.15


@dataclass(frozen=True)
class NF4Layout:
    """How one fused expert parameter is stored: each expert's (out, in) matrix quantized on its own."""

    shape: tuple[int, int]  # (out, in) as the model sees it
    double_quant: bool
    compute_dtype: torch.dtype
    padded_in: int  # `in` rounded up to whole blocks: what is stored and what the kernels multiply
    dtype: torch.dtype  # the weights' own dtype: what a read of the dequantized parameter gives

    @property
    def stored_shape(self) -> tuple[int, int]:
        return self.shape[0], self.padded_in


# ---------------------------------------------------------------- quantizing at load time

def quantize_experts(model: nn.Module, double_quant: bool, compute_dtype: torch.dtype,
                     device: torch.device | str | None = None) -> None:
    """Replace every routed-expert weight of `model` by its NF4 form; the experts then run the NF4 forward, or their
    own forward reading the weights dequantized (see the module docstring).

    `device`: where to quantize and keep the NF4 experts (default: where the weights are). Quantizing on a GPU takes
    milliseconds per matrix; bitsandbytes' CPU kernel takes seconds for one of Mixtral-8x7B's.
    """
    found = moe.experts_modules(model)
    if not found:
        raise ValueError("model.quantization: this model has no routed experts (3-D expert weights) to quantize; it "
                         "is not a transformers-5 MoE model.")
    count = moe.config_expert_count(model)
    nf4_forward = runs_nf4_forward(model, list(found.values()))
    for module_name, module in found.items():
        for name in moe.expert_parameter_names(module, count):
            weight = logical_matrices(module, name)
            quantize_parameter(module, name, double_quant, compute_dtype, device)
            check_round_trip(module, name, weight, f"{module_name}.{name}")
        module.active_lora = {}  # parameter name -> LoRA factors, set by QuantizedExpertsLora around its forward
        if not nf4_forward:
            read_dequantized(module)
    if nf4_forward:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)


def projections(experts: nn.Module) -> tuple[str, str]:
    """The two weights of an expert in transformers' experts interface: (gate_up_proj or up_proj, down_proj)."""
    return "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj", "down_proj"


def runs_nf4_forward(model: nn.Module, experts: list[nn.Module]) -> bool:
    """Whether the NF4 expert forward reproduces every experts module of `model`: all of them in transformers'
    experts interface (its flags say how the weights are stored; gated or not), without a norm after each expert,
    holding exactly the two projections, and a model class that lets its experts forward be chosen. Others run
    their own forward on weights read dequantized."""
    if not type(model)._can_set_experts_implementation():
        return False
    return all(hasattr(module, "is_transposed") and not getattr(module, "has_post_expert_norm", False)
               and set(moe.expert_parameter_names(module, None)) == set(projections(module)) for module in experts)


def logical_matrices(experts: nn.Module, name: str) -> torch.Tensor:
    """A fused expert parameter as (E, out, in) matrices, whichever layout the family stores."""
    weight = getattr(experts, name).detach()
    return weight.transpose(1, 2) if getattr(experts, "is_transposed", False) else weight


def quantize_parameter(experts: nn.Module, name: str, double_quant: bool, compute_dtype: torch.dtype,
                       device: torch.device | str | None) -> None:
    import bitsandbytes.functional as bnb_functional

    weight = logical_matrices(experts, name)
    in_features = weight.shape[-1]
    padding = padded_size(in_features) - in_features
    packed, scales, nested_scales, offsets = [], [], [], []
    for matrix in weight:  # one expert at a time: the transient full-precision copy is a single matrix
        matrix = nn.functional.pad(matrix.to(device), (0, padding))
        data, state = bnb_functional.quantize_4bit(matrix.contiguous(), blocksize=BLOCKSIZE,
                                                   compress_statistics=double_quant, quant_type="nf4")
        packed.append(data.reshape(-1))
        scales.append(state.absmax)
        if double_quant:
            nested_scales.append(state.state2.absmax)
            offsets.append(state.offset)
    # The packed bytes keep the parameter's name (PEFT finds LoRA targets among named_parameters); uint8 cannot train.
    setattr(experts, name, nn.Parameter(torch.stack(packed), requires_grad=False))
    experts.register_buffer(f"{name}_absmax", torch.stack(scales))
    experts.register_buffer("nf4_code", state.code)
    if double_quant:
        experts.register_buffer(f"{name}_nested_absmax", torch.stack(nested_scales))
        experts.register_buffer(f"{name}_offset", torch.stack(offsets))
        experts.register_buffer("nf4_nested_code", state.state2.code)
    layouts = getattr(experts, "nf4_layouts", {})
    layouts[name] = NF4Layout(tuple(weight.shape[1:]), double_quant, compute_dtype, in_features + padding,
                              weight.dtype)
    experts.nf4_layouts = layouts


def padded_size(in_features: int) -> int:
    """Rows stored as whole blocks: see the module docstring."""
    return -(-in_features // BLOCKSIZE) * BLOCKSIZE


def check_round_trip(experts: nn.Module, name: str, weight: torch.Tensor, label: str) -> None:
    """Dequantize each expert's matrix as the forward will and compare it with the original weights."""
    import bitsandbytes as bnb

    for expert, matrix in enumerate(weight):
        rounded = dequantize_expert(experts, name, expert).float()
        original = matrix.to(rounded.device).float()
        error = float((rounded - original).norm() / original.norm().clamp_min(1e-12))
        if error > MAX_ROUND_TRIP_ERROR:
            raise ValueError(
                f"model.quantization: {label}[{expert}] {tuple(matrix.shape)} reads back from NF4 with relative error "
                f"{error:.2f} (NF4 gives about 0.1; at most {MAX_ROUND_TRIP_ERROR} is accepted): this bitsandbytes "
                f"{bnb.__version__} kernel path does not quantize this shape correctly. Train without "
                f"model.quantization, or install the bitsandbytes version in constraints.txt.")


def is_quantized_experts(module: nn.Module) -> bool:
    return hasattr(module, "nf4_layouts")


def expert_quant_state(experts: nn.Module, name: str, expert: int):
    """bitsandbytes' description (a QuantState) of one expert's quantized matrix, built from the stacked buffers."""
    import bitsandbytes.functional as bnb_functional

    layout = experts.nf4_layouts[name]
    nested, offset = None, None
    if layout.double_quant:
        nested = bnb_functional.QuantState(absmax=getattr(experts, f"{name}_nested_absmax")[expert],
                                           code=experts.nf4_nested_code, blocksize=NESTED_BLOCKSIZE,
                                           dtype=torch.float32)
        offset = getattr(experts, f"{name}_offset")[expert]
    return bnb_functional.QuantState(absmax=getattr(experts, f"{name}_absmax")[expert],
                                     shape=torch.Size(layout.stored_shape),
                                     code=experts.nf4_code, blocksize=BLOCKSIZE, quant_type="nf4",
                                     dtype=layout.compute_dtype, offset=offset, state2=nested)


def dequantize_expert(experts: nn.Module, name: str, expert: int) -> torch.Tensor:
    """One expert's (out, in) matrix in the compute dtype."""
    import bitsandbytes.functional as bnb_functional

    packed = packed_weight(experts, name)[expert].reshape(-1, 1)
    in_features = experts.nf4_layouts[name].shape[1]
    return bnb_functional.dequantize_4bit(packed, expert_quant_state(experts, name, expert))[:, :in_features]


def packed_weight(experts: nn.Module, name: str) -> nn.Parameter:
    """The NF4 bytes registered under the parameter's name (attribute access may read them dequantized)."""
    return experts._parameters[name]


def dequantized_parameter(experts: nn.Module, name: str) -> torch.Tensor:
    """The whole fused parameter back in full precision, in the family's own layout (what it held before NF4).
    Counted from the stored matrices: LongCat-Flash's gate_up_proj has rows for its zero-computation experts too."""
    matrices = torch.stack([dequantize_expert(experts, name, expert)
                            for expert in range(len(packed_weight(experts, name)))])
    return matrices.transpose(1, 2) if getattr(experts, "is_transposed", False) else matrices


# ---------------------------------------------------------------- the forward

def expert_linear(experts: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """x @ W_e^T with W_e dequantized on the fly, plus the LoRA update of expert e when an adapter is active."""
    import bitsandbytes as bnb

    layout = experts.nf4_layouts[name]
    packed = packed_weight(experts, name)[expert].reshape(-1, 1)
    # matmul_4bit's backward dequantizes again rather than saving W_e for it; it takes the packed weight transposed.
    # The padded columns of W_e are zero; x gets as many zero features.
    padded = nn.functional.pad(x.to(layout.compute_dtype), (0, layout.padded_in - layout.shape[1]))
    out = bnb.matmul_4bit(padded, packed.t(), quant_state=expert_quant_state(experts, name, expert))
    out = out.to(x.dtype)
    if getattr(experts, "has_bias", False):  # gpt-oss: biases stay in full precision (and frozen)
        out = out + getattr(experts, f"{name}_bias")[expert].to(x.dtype)
    factors = experts.active_lora.get(name)
    if factors is not None:
        lora_b, lora_a, scaling = factors  # (E, out, r), (E, r, in)
        out = out + scaling * nn.functional.linear(nn.functional.linear(x, lora_a[expert].to(x.dtype)),
                                                   lora_b[expert].to(x.dtype))
    return out


def nf4_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, over quantized experts: only experts that received tokens are touched."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        experts_hit = expert_mask.sum(dim=(-1, -2)).nonzero().flatten().tolist()
    up_name, down_name = projections(self)
    for expert in experts_hit:
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        up = expert_linear(self, up_name, expert, hidden_states[token_idx])
        # gated experts (Mixtral's SwiGLU, gpt-oss's clamped one) through the class's own gate; others (Nemotron-H's
        # up_proj) through the activation, as transformers' own experts forwards do
        current = expert_linear(self, down_name, expert, self._apply_gate(up) if self.has_gate else self.act_fn(up))
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, nf4_experts_forward)


# ---------------------------------------------------------------- experts that run their own forward

def read_dequantized(experts: nn.Module) -> None:
    """Make `experts.<name>` of each quantized parameter read as its full-precision weights, plus the active
    adapter's update: experts outside the NF4 forward's reach (Llama 4's and LongCat-Flash's own forwards, JetMoE's
    one weight per projection module, a family's kernel choice) then run their own forward, unchanged.

    The bytes stay registered under the parameter's name (PEFT finds its targets there, state_dict saves them); a
    property on a subclass of the module's class (as torch's parametrizations do) reads them. Within one forward of
    the module each weight is dequantized once (JetMoE reads its weight once per expert) and dropped when it ends;
    what autograd would keep of it for the backward is kept as a recipe and dequantized again there (saved_as_recipes).
    """
    experts.__class__ = dequantizing_class(type(experts), tuple(experts.nf4_layouts))
    experts.nf4_reads = None


@functools.lru_cache(maxsize=None)
def dequantizing_class(cls: type, names: tuple[str, ...]) -> type:
    def forward(self, *args, **kwargs):
        with reading_dequantized(self):
            return cls.forward(self, *args, **kwargs)

    attributes = {name: property(functools.partial(read_weight, name=name)) for name in names}
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "forward": forward, **attributes})


@contextlib.contextmanager
def reading_dequantized(experts: nn.Module):
    """While the experts' forward runs (or that of a parent reading their weights: DBRX's, finetune/modeling/
    flat_experts.py): each weight dequantized once, and saved for the backward as a recipe. Re-entered (the
    parent's forward calls the experts' own), it leaves the outer one's reads in place."""
    if experts.nf4_reads is not None:
        yield
        return
    experts.nf4_reads = {}
    try:
        with saved_as_recipes(experts):
            yield
    finally:
        experts.nf4_reads = None


def read_weight(experts: nn.Module, name: str) -> torch.Tensor:
    reads = experts.nf4_reads
    if reads is not None and name in reads:
        return reads[name][0]
    factors = experts.active_lora.get(name)
    weight = adapted_weight(experts, name, factors)
    if reads is not None:
        reads[name] = (weight, factors)
    return weight


def adapted_weight(experts: nn.Module, name: str, factors) -> torch.Tensor:
    """The dequantized parameter (E, ...) in its own layout and dtype, plus scaling * B_e A_e per expert: PEFT's
    W + delta (ParamWrapper's baddbmm), in the orientation its factors have for this parameter."""
    weight = dequantized_parameter(experts, name).to(experts.nf4_layouts[name].dtype)
    if factors is None:
        return weight
    lora_b, lora_a, scaling = factors
    # in place: the dequantized copy is this function's own, and a second one would double the layer's transient
    return weight.baddbmm_(lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scaling)


@contextlib.contextmanager
def saved_as_recipes(experts: nn.Module):
    """While the experts' own forward runs: a weight read dequantized that autograd saves for the backward (bmm and
    linear keep their operands), or a view of one, is saved as how to read it again (its name, the adapter factors it
    had, the view's geometry) and dequantized again in the backward, so training never holds the layer's experts in
    full precision between forward and backward. Where saved tensors are handled already (activation checkpointing
    keeps none of the layer's and recomputes its forward for the backward), they are left to that."""
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        yield
        return
    # One dequantization per weight in the backward too (JetMoE saves a view per expert): kept while this forward's
    # saved tensors are (autograd frees them as the layer's backward runs).
    read_again = {}

    def pack(tensor: torch.Tensor):
        for name, (weight, factors) in (experts.nf4_reads or {}).items():
            if tensor.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
                detached = None if factors is None else tuple(f.detach() if torch.is_tensor(f) else f for f in factors)
                return WeightRecipe(name, detached, tensor.size(), tensor.stride(), tensor.storage_offset())
        return tensor

    def unpack(saved):
        if not isinstance(saved, WeightRecipe):
            return saved
        if saved.name not in read_again:
            with torch.no_grad():
                read_again[saved.name] = adapted_weight(experts, saved.name, saved.factors)
        weight = read_again[saved.name]
        return weight.as_strided(saved.size, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@dataclass(frozen=True)
class WeightRecipe:
    name: str
    factors: tuple | None
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


# ---------------------------------------------------------------- LoRA on quantized experts

class QuantizedExpertsLora(ParamWrapper):
    """PEFT's LoRA wrapper of a fused expert parameter, for experts stored in NF4.

    Same weights and names as ParamWrapper (so the adapter saves and loads like any PEFT adapter), but instead of
    re-parametrizing the whole parameter to W + B A (impossible without W in full precision) the factors are handed
    to the NF4 forward, which applies them per expert.
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # The stored parameter holds packed bytes; the logical shape is (E, out, in). ParamWrapper reads a 3-D
        # parameter as (E, in, out) and swaps the two unless the family stores (E, in, out) (`is_transposed`).
        out_features, in_features = module.nf4_layouts[self.parameter_name].shape
        self.num_experts = len(packed_weight(module, self.parameter_name))
        self._param_ndim = 3
        if getattr(module, "is_transposed", False):
            return in_features, out_features
        return out_features, in_features

    def get_param(self) -> nn.Parameter:
        # the stored bytes, not a read of the dequantized weights (experts that run their own forward): PEFT asks for
        # the parameter to place the adapter (device; the dtype only of a floating-point weight) and to merge
        return packed_weight(self.get_base_layer(), self.parameter_name)

    def expert_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B (E, out, r), A (E, r, in), scaling): the layout ParamWrapper.get_delta_factors reads."""
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        lora_a = weight_a.reshape(self.num_experts, -1, weight_a.shape[-1])
        lora_b = weight_b.reshape(weight_b.shape[0], -1, self.num_experts).permute(2, 0, 1)
        return lora_b, lora_a, self.scaling[adapter]

    def _activate_lora(self, active_adapters: list[str]):
        return factors_handed_over(self, active_adapters, self.get_base_layer().active_lora, self.expert_factors,
                                   "NF4 experts")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("an adapter cannot be merged into NF4 experts (it would be rounded away); merge it into the "
                         "full-precision base: `moetune merge ADAPTER_DIR --out DIR`.")


@contextlib.contextmanager
def factors_handed_over(wrapper: ParamWrapper, active_adapters: list[str], slots: dict, factors, experts_kind: str):
    """While the wrapped experts run: the active adapter's factors (`factors(adapter)`) in `slots` under the wrapped
    parameter's name, where the experts' own forward reads them (instead of PEFT's re-parametrization)."""
    adapters = [adapter for adapter in active_adapters if adapter in wrapper.lora_A]
    if not adapters:
        yield
        return
    if len(adapters) > 1:
        raise ValueError(f"LoRA on {experts_kind} supports one active adapter at a time, not {adapters}.")
    slots[wrapper.parameter_name] = factors(adapters[0])
    try:
        yield
    finally:
        del slots[wrapper.parameter_name]


# peft recognises parameter wrappers by class name (tuners_utils._inject_parameters) when it nests the second expert
# parameter's wrapper or adds another adapter (TRL's DPO reference copy); ours must answer to that name.
QuantizedExpertsLora.__name__ = QuantizedExpertsLora.__qualname__ = "ParamWrapper"


def use_quantized_expert_lora(config: PeftLoraConfig, model: nn.Module) -> PeftLoraConfig:
    """Make PEFT wrap `model`'s NF4 experts with QuantizedExpertsLora (PEFT's custom-module dispatch)."""
    classes = {type(module) for module in model.modules() if is_quantized_experts(module)}
    if classes:
        config._register_custom_module({cls: QuantizedExpertsLora for cls in classes})
    return config


def load_adapter(model: nn.Module, adapter_dir: str, trainable: bool):
    """A saved PEFT adapter on a model with NF4 experts (PeftModel.from_pretrained with our expert wrapper)."""
    config = use_quantized_expert_lora(PeftConfig.from_pretrained(adapter_dir), model)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable, config=config)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies, with the scales bitsandbytes keeps on its quantized Linear weights (not as buffers)."""
    extra = []
    state = getattr(tensor, "quant_state", None)  # Params4bit: block scales, and their own scales (double quant)
    if state is not None:
        extra += [state.absmax, state.offset] + ([state.state2.absmax] if state.state2 is not None else [])
    extra.append(getattr(tensor, "SCB", None))  # Int8Params: one scale per row
    return sum(t.numel() * t.element_size() for t in [tensor, *extra] if isinstance(t, torch.Tensor))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model itself occupies."""
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def bitsandbytes_config(bits: int, double_quant: bool, compute_dtype: torch.dtype,
                        skip_modules: list[str] | None = None):
    """The stock bitsandbytes quantization of the Linear layers, which quantize_experts completes.

    `skip_modules`: Linear layers to keep in full precision (None: transformers' default, the output head)."""
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def linears_to_keep(skeleton: nn.Module) -> list[str] | None:
    """The Linear layers of `skeleton` (a model on the meta device) that quantized loading keeps in full precision:
    transformers' own choice (the output head), the routers' Linears, and those whose in_features is not a whole
    number of blocks, which bitsandbytes' AVX-512 CPU kernel would read back wrong (see the module docstring). None
    when there are none of the latter two: transformers' default applies."""
    from transformers.quantizers.base import get_keys_to_not_convert

    kept = get_keys_to_not_convert(skeleton)
    odd = [name for name, module in skeleton.named_modules()
           if isinstance(module, nn.Linear) and module.in_features % BLOCKSIZE and name not in kept]
    routers = router_linears(skeleton)
    if not odd and not routers:
        return None
    if odd:
        shapes = sorted({skeleton.get_submodule(name).in_features for name in odd})
        print(f"[quantization] {len(odd)} Linear layers with in_features {shapes} (not a multiple of bitsandbytes' "
              f"{BLOCKSIZE}-weight block) stay in full precision, e.g. {odd[0]}.", flush=True)
    return sorted({*kept, *odd, *routers})


def router_linears(model: nn.Module) -> list[str]:
    """The Linear layers that hold a router's weight (LongCat-Flash's `router.classifier`, JetMoE's `router.layer`,
    Llama 4's router itself): kept in full precision like the routers held as bare Parameters. Quantized, their weight
    became packed bytes, and routing, the router role and the detection of the router (a weight of one row per
    expert) were lost."""
    found = []
    for name, router in moe.routers(model).items():
        owner = moe.router_weight_name(model, name).rpartition(".")[0]
        owner = f"{name}.{owner}" if owner else name
        if isinstance(model.get_submodule(owner), nn.Linear):
            found.append(owner)
    return found


def disable_packed_cpu_path(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit Linears on the kernel path that trains.

    On a CPU with AVX512-BF16, Linear4bit repacks its weight in place for a bf16 kernel the first time it runs in
    eval mode without gradients (TRL's reference pass, evaluation). That kernel has no backward, so training after it
    fails; and the repacking itself fails for in_features below the block (`shape '[32, 0]' is invalid`)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def nf4_round_trip(matrix: torch.Tensor, double_quant: bool) -> torch.Tensor:
    """One (out, in) matrix quantized to NF4 and read back exactly as quantize_parameter stores it for training
    (rows padded to whole blocks): the weights the adapter was trained against."""
    import bitsandbytes.functional as bnb_functional

    in_features = matrix.shape[-1]
    padded = nn.functional.pad(matrix.float(), (0, padded_size(in_features) - in_features)).contiguous()
    data, state = bnb_functional.quantize_4bit(padded, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                               quant_type="nf4")
    return bnb_functional.dequantize_4bit(data, state)[:, :in_features].to(matrix.dtype)
