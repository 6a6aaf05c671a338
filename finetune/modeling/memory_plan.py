"""Memory per device and FLOPs of one training stage, from the model's shapes alone (a model on the meta device).

The plan counts what a training step holds at its peak, by component:
- weights: the frozen and trained parameters, by storage (NF4 experts with their block scales, bitsandbytes
  4/8-bit Linears, the rest in the weights' dtype);
- adapter, gradients, optimizer: LoRA weights (PEFT keeps them in fp32), a gradient per trained parameter, AdamW's
  two moments (DeepSpeed adds an fp32 master copy of 16-bit weights);
- activations: what the forward keeps for the backward, per token and decoder layer, read off the layer's own
  Linear shapes (token mixers, routed experts times top-k, shared experts, dense FFNs); with activation
  checkpointing, each layer's input plus one layer recomputed; under QLoRA, where the experts run their own forward
  on weights read dequantized (Llama 4, LongCat-Flash, JetMoE), one layer's experts in the compute dtype;
- LM head: moetune's scored LM head (finetune/scored_lm_head.py) on every scored token: the logits of one
  vocabulary tile and, for a frozen head, W[target] - E_p[W] per token (finetune/lm_head_tiles.py);
- reference: DPO's reference policy, nothing when its log-probs are cached or when it is the policy with the adapter
  off, a frozen copy of the weights for full fine-tuning, a frozen copy of the SFT adapter on a quantized base;
- overhead: the framework's own (CUDA context and allocator slack, or the interpreter and libraries on a CPU).

How the parts spread over devices is a layout (`LAYOUTS`): one function per way of splitting them (DDP, ZeRO-2,
ZeRO-3, FSDP2, expert parallelism), taking the whole-model `Footprint` and the process count. Nothing here reads a
recipe: callers pass a `Setup` of plain numbers (finetune/training/stage_plan.py builds it from one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from finetune.modeling import adapters, expert_quant, moe

GiB = 1024**3
ROWS = ("weights", "adapter", "gradients", "optimizer", "activations", "lm_head", "reference", "overhead")
NF4_BLOCK = 64  # weights per NF4 block scale (finetune/expert_quant.py BLOCKSIZE)
NESTED_BLOCK = 256  # double quantization: 8-bit block scales, one fp32 scale per 256 of them
LORA_BYTES = 4  # PEFT upcasts adapter weights of 16-bit models to fp32 (autocast_adapter_dtype)
TOKEN_TILE, VOCAB_TILE = 256, 4096  # the LM head's logits tile on a CPU (lm_head_tiles) / vocabulary chunk on GPUs
GPU_OVERHEAD = 1.0 * GiB  # CUDA context, cuBLAS/NCCL workspaces: outside torch's allocator counters
GPU_SLACK = 0.05  # the caching allocator's fragmentation, as a share of the rest
CPU_OVERHEAD = 0.5 * GiB  # Python, torch, transformers, TRL, datasets imported: 486 MiB (benchmarks/plan_memory.py)


@dataclass(frozen=True)
class Setup:
    """One training stage as the plan needs it: plain numbers, no recipe."""

    stage: str  # sft or dpo
    weight_bytes: int  # bytes per weight in the model's dtype: 2 (bf16, fp16) or 4 (fp32)
    lora_roles: frozenset[str] | None  # adapted roles (finetune/adapters.ALL_ROLES); None: full fine-tuning
    lora_r: int = 16
    quant_bits: int | None = None  # QLoRA: Linears in 4 or 8 bits, routed experts in NF4 either way
    double_quant: bool = True
    batch: int = 8  # sequences (SFT) or preference pairs (DPO) per device and micro-step
    max_length: int = 1024
    activation_checkpointing: bool = False
    padding_free: bool = True
    reference: str = "none"  # none (SFT), cached, adapter_off, copy, adapter_copy
    layout: str = "ddp"
    processes: int = 1
    expert_parallel: int = 1  # the ep layout: processes each layer's experts are split over (model.expert_parallel)
    device: str = "cuda"  # cuda or cpu: the overhead and the LM head's tiles

    @property
    def sequences(self) -> int:
        """Sequences in one micro-batch: a DPO pair is its chosen and its rejected sequence."""
        return self.batch * (2 if self.stage == "dpo" else 1)

    @property
    def tokens(self) -> int:
        """Tokens of a full micro-batch (the peak: every sequence at max_length)."""
        return self.sequences * self.max_length


@dataclass(frozen=True)
class Census:
    """Parameter counts of a model by role, and the per-token activation sizes of its decoder layers."""

    total: dict[str, int]  # parameters by role
    active: dict[str, int]  # parameters one token runs through, by role (routed experts: top-k of E)
    lora: dict[str, int]  # LoRA parameters each role would get at rank 1
    nf4_elements: int  # routed-expert matrix elements (stored in NF4 under QLoRA)
    linear_elements: int  # Linear weight elements bitsandbytes quantizes under QLoRA
    layer_elements: list[int]  # per decoder layer: activation elements kept per token for the backward
    expert_lora_elements: int  # per token, whole model: what LoRA on the fused experts keeps besides (see below)
    layer_weights: list[int]  # per decoder layer: parameters (what ZeRO-3/FSDP2 gather at once)
    layer_expert_weights: list[int]  # per decoder layer: the routed experts' parameters among them
    attention_width: list[int]  # per decoder layer: query width attending over the context (0: no attention)
    hidden: int
    vocab: int
    head_frozen_elements: int  # LM head parameters
    checkpointing: bool = True  # whether transformers can checkpoint its activations (JetMoE cannot)
    # QLoRA: the experts run their own forward on weights read dequantized (Llama 4, LongCat-Flash, JetMoE:
    # expert_quant.read_dequantized), a whole layer's at once, instead of the NF4 forward's one matrix at a time
    experts_read_whole: bool = False

    @property
    def parameters(self) -> int:
        return sum(self.total.values())


@dataclass(frozen=True)
class Footprint:
    """Whole-model bytes of each part before a layout splits them over processes."""

    frozen_weights: float
    trained_weights: float  # full fine-tuning: the model's weights; LoRA: 0 (the adapter row holds them)
    adapter: float
    gradients: float
    optimizer: float  # torch AdamW: two moments in the trained weights' dtype
    master_optimizer: float  # DeepSpeed: fp32 master copy and fp32 moments of every trained weight
    activations: float
    lm_head: float
    reference: float
    largest_layer: float  # bytes of the biggest decoder layer: what a sharded layout gathers at once
    device: str
    # the ep layout: the largest layer's bytes outside its routed experts and in them, the LM head's bytes, the
    # processes each layer's experts are split across
    largest_layer_dense: float = 0.0
    largest_layer_experts: float = 0.0
    lm_head_weights: float = 0.0
    expert_parallel: int = 1
    expert_adapter: float = 0.0  # the part of `adapter` on the routed experts (split with them under ep)

    def overhead(self, rest: float) -> float:
        if self.device == "cpu":
            return CPU_OVERHEAD
        return GPU_OVERHEAD + GPU_SLACK * rest


# ---------------------------------------------------------------- the model's shapes

def census(model: nn.Module) -> Census:
    """Counts of a model built on the meta device (moetune's roles: finetune/moe.py)."""
    roles = parameter_roles(model)
    total: dict[str, int] = {}
    for name, param in model.named_parameters():
        total[roles.get(name, "other")] = total.get(roles.get(name, "other"), 0) + param.numel()
    experts, top_k = moe.routing_sizes(model) if moe.is_moe_model(model) else (1, 1)
    active = {role: count * top_k // experts if role == "experts" else count for role, count in total.items()}
    active.pop("embeddings", None)  # a lookup, not a matmul
    layers = decoder_layers(model)
    text = model.config.get_text_config()
    return Census(
        total=total, active=active, lora=lora_per_rank(model), nf4_elements=expert_matrix_elements(model),
        linear_elements=quantizable_linear_elements(model),
        layer_elements=[layer_activation_elements(model, layer, top_k) for layer in layers],
        expert_lora_elements=sum(top_k * (2 * expert_width(m) + text.hidden_size)
                                 for m in moe.experts_modules(model).values()),
        layer_weights=[sum(p.numel() for p in layer.parameters()) for layer in layers],
        layer_expert_weights=[sum(p.numel() for m in layer.modules() if moe.is_experts(m) for p in m.parameters())
                              for layer in layers],
        attention_width=[attention_width(model, layer) for layer in layers],
        hidden=text.hidden_size, vocab=text.vocab_size,
        head_frozen_elements=model.get_output_embeddings().weight.numel(),
        checkpointing=getattr(model, "supports_gradient_checkpointing", True),
        experts_read_whole=not expert_quant.runs_nf4_forward(model, list(moe.experts_modules(model).values())))


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> role: attention, experts, shared_experts, dense_mlp, router, embeddings, lm_head."""
    roles = {}
    module_roles = [("attention", adapters.attention_linear_targets(model)),
                    ("shared_experts", adapters.shared_expert_targets(model)), ("dense_mlp", adapters.dense_mlp_targets(model))]
    for role, names in module_roles:
        for name in names:
            for param_name, _ in model.get_submodule(name).named_parameters():
                roles[f"{name}.{param_name}"] = role
    for name, module in model.named_modules():
        if moe.is_experts(module, moe.config_expert_count(model)):
            roles.update({f"{name}.{p}": "experts" for p, _ in module.named_parameters()})
    for name, router in moe.routers(model).items():
        roles.update({f"{name}.{p}": "router" for p, _ in router.named_parameters()})
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for name, param in model.named_parameters():
        if param is head:
            roles[name] = "lm_head"
        elif param is embeddings:
            roles[name] = "embeddings"
    return roles


def lora_per_rank(model: nn.Module) -> dict[str, int]:
    """LoRA parameters per unit of rank, by role: r x (in + out) per Linear; E x r x (in + out) per fused expert
    tensor (PEFT's target_parameters layout); r x (E + hidden) for a router weight."""
    per_rank = {}
    for role, names in (("attention", adapters.attention_linear_targets(model)),
                        ("shared_experts", adapters.shared_expert_targets(model)),
                        ("dense_mlp", adapters.dense_mlp_targets(model))):
        linears = [model.get_submodule(name) for name in names]
        per_rank[role] = sum(linear.in_features + linear.out_features for linear in linears)
    per_rank["experts"] = sum(shape[0] * (shape[1] + shape[2]) for shape in expert_shapes(model))
    per_rank["router"] = sum(sum(moe.shape_of(moe.router_weight(model, name, router)))
                             for name, router in moe.routers(model).items())
    return per_rank


def expert_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    count = moe.config_expert_count(model)
    return [moe.shape_of(getattr(module, name)) for module in moe.experts_modules(model).values()
            for name in moe.expert_parameter_names(module, count)]


def expert_matrix_elements(model: nn.Module) -> int:
    return sum(shape[0] * shape[1] * shape[2] for shape in expert_shapes(model))


def quantizable_linear_elements(model: nn.Module) -> int:
    """Linear weights bitsandbytes quantizes: all but the LM head, the routers' and those whose input is not whole
    blocks (expert_quant.linears_to_keep)."""
    head = model.get_output_embeddings()
    routers = {id(model.get_submodule(name)) for name in expert_quant.router_linears(model)}
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear)
               and module is not head and id(module) not in routers and module.in_features % NF4_BLOCK == 0)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, found as moe.py finds them (Llama 4's get_decoder() is the whole model: its
    base_model_prefix names no attribute, and a plan with no layers divided by zero)."""
    return [model.get_submodule(name) for name in moe.decoder_layers(model)]


def attention_width(model: nn.Module, layer: nn.Module) -> int:
    """The query width (heads x head dim) of a layer's attention: what the attention FLOPs scale with."""
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "q_b_proj") and isinstance(module, nn.Linear):
            return module.out_features
    return 0


def expert_width(experts: nn.Module) -> int:
    """One expert's FFN width: down_proj is (E, hidden, I) or (E, I, hidden), the smaller of the two (read from the
    last 3-D parameter: Nemotron-H's up_proj/down_proj, JetMoE's one weight per projection module)."""
    return min(moe.shape_of(getattr(experts, moe.expert_parameter_names(experts, None)[-1]))[1:])


def layer_activation_elements(model: nn.Module, layer: nn.Module, top_k: int) -> int:
    """Elements one token keeps in one decoder layer for the backward.

    Every Linear keeps its input; its output is kept by what follows (rotary embedding, attention, the SwiGLU
    product): about twice the outputs of the Linears outside the routed experts. Routed experts run on top-k copies of
    the token: its gathered input, the gate/up output, the activation and the product, the down output and its
    weighted copy (3 x hidden + 4 x expert width each). Norms and residuals add a few hidden-size vectors.
    """
    hidden = model.config.get_text_config().hidden_size
    count = moe.config_expert_count(model)
    experts = [m for m in layer.modules() if moe.is_experts(m, count)]
    routed = {id(p) for m in experts for p in m.parameters()}
    linear_outputs = sum(m.out_features for m in layer.modules()
                         if isinstance(m, nn.Linear) and id(m.weight) not in routed)
    elements = 2 * linear_outputs + 6 * hidden
    for module in experts:
        width = expert_width(module)
        routed_experts = moe.shape_of(getattr(module, moe.expert_parameter_names(module, count)[0]))[0]
        elements += top_k * (3 * hidden + 4 * width) + 2 * routed_experts  # + router scores
    return elements


# ---------------------------------------------------------------- whole-model bytes

def footprint(c: Census, s: Setup) -> Footprint:
    lora = s.lora_roles is not None
    frozen = c.parameters if lora else 0
    quantized = lora and s.quant_bits is not None
    frozen_bytes = frozen * s.weight_bytes
    if quantized:
        linear_bits = s.quant_bits
        frozen_bytes -= (c.nf4_elements + c.linear_elements) * s.weight_bytes
        frozen_bytes += nf4_bytes(c.nf4_elements, s.double_quant)
        frozen_bytes += nf4_bytes(c.linear_elements, s.double_quant) if linear_bits == 4 else c.linear_elements * 1.0
    adapter_params = sum(c.lora[role] for role in s.lora_roles) * s.lora_r if lora else 0
    trained = adapter_params if lora else c.parameters
    trained_bytes = LORA_BYTES if lora else s.weight_bytes
    return Footprint(
        frozen_weights=frozen_bytes,
        trained_weights=0 if lora else trained * s.weight_bytes,
        adapter=adapter_params * LORA_BYTES,
        gradients=trained * trained_bytes,
        optimizer=2 * trained * trained_bytes,
        master_optimizer=trained * (12 if trained_bytes < 4 else 8),
        activations=activation_bytes(c, s) + dequantized_experts_bytes(c, s, quantized),
        lm_head=lm_head_bytes(c, s),
        reference=reference_bytes(c, s, frozen_bytes, adapter_params),
        # at the model's mean bytes per weight (NF4 experts make a quantized layer about a quarter of a bf16 one)
        largest_layer=max(c.layer_weights, default=0) * (frozen_bytes / frozen if lora else s.weight_bytes),
        device=s.device,
        largest_layer_dense=max((w - e for w, e in zip(c.layer_weights, c.layer_expert_weights)), default=0)
        * s.weight_bytes,
        largest_layer_experts=max(c.layer_expert_weights, default=0) * s.weight_bytes,
        lm_head_weights=c.head_frozen_elements * s.weight_bytes, expert_parallel=s.expert_parallel,
        expert_adapter=c.lora.get("experts", 0) * s.lora_r * LORA_BYTES if lora and "experts" in s.lora_roles else 0)


def nf4_bytes(elements: int, double_quant: bool) -> float:
    """4 bits per weight, plus one scale per block: an fp32, or with double quantization a byte and an fp32 per 256."""
    scales = elements / NF4_BLOCK
    return elements / 2 + (scales + 4 * scales / NESTED_BLOCK if double_quant else 4 * scales)


def dequantized_experts_bytes(c: Census, s: Setup, quantized: bool) -> float:
    """Under QLoRA, experts that run their own forward read one layer's experts dequantized, in the compute dtype,
    while that layer runs (forward, and again in its backward); nothing of it is kept in between."""
    return max(c.layer_expert_weights, default=0) * s.weight_bytes if quantized and c.experts_read_whole else 0.0


def activation_bytes(c: Census, s: Setup) -> float:
    """What the forward keeps for the backward at a full micro-batch, in the compute dtype."""
    # The backward of a layer holds that layer's gradients beside what is kept: about one layer more. With
    # activation checkpointing, each layer's input is kept and one layer is recomputed in the backward.
    biggest = max(c.layer_elements, default=0)
    per_token = sum(c.layer_elements) + biggest
    if s.activation_checkpointing:
        per_token = len(c.layer_elements) * c.hidden + 2 * biggest
    if s.lora_roles is not None and "experts" in s.lora_roles:
        # PEFT's fused-expert wrapper keeps the expert inputs and outputs of its own path (measured on a CPU:
        # +150 MiB at 8,192 tokens on the 4-layer look-alike of benchmarks/plan_memory.py)
        per_token += c.expert_lora_elements // (len(c.layer_elements) if s.activation_checkpointing else 1)
    per_token += 4 * c.hidden  # embeddings output, final norm, the hidden states' gradient
    return s.tokens * per_token * s.weight_bytes


def lm_head_bytes(c: Census, s: Setup) -> float:
    """The scored LM head's working set for every token of a full micro-batch (worst case: all of them scored).

    Per token: its hidden state gathered for the head and that state's gradient, a few fp32 outputs, and for a frozen
    head W[target] - E_p[W] (fp32, hidden wide) kept for the backward; plus the logits of one tile in fp32 and the
    kernel's temporaries (three tiles): on a CPU 256 tokens x 4,096 vocabulary entries, on a GPU all scored tokens
    x 4,096 entries (TRL's chunked kernel)."""
    tokens = s.tokens
    per_token = 2 * c.hidden * s.weight_bytes + 6 * 4 + (4 * c.hidden if s.lora_roles is not None else 0)
    tile_rows = min(tokens, TOKEN_TILE) if s.device == "cpu" else tokens
    return tokens * per_token + 3 * tile_rows * min(VOCAB_TILE, c.vocab) * 4


def reference_bytes(c: Census, s: Setup, frozen_bytes: float, adapter_params: int) -> float:
    if s.reference == "copy":
        return c.parameters * s.weight_bytes
    if s.reference == "adapter_copy":
        return adapter_params * LORA_BYTES
    return 0.0  # none, cached (computed before training), adapter_off (the same weights)


# ---------------------------------------------------------------- layouts: how the parts spread over processes

def layout_rows(f: Footprint, shard_weights: bool, shard_gradients: bool, master: bool, n: int) -> dict[str, float]:
    """Per-device bytes of each row: weights (and a sharded layout's two gathered layers), adapter, gradients,
    optimizer, activations, LM head, reference, overhead."""
    weights = f.frozen_weights + f.trained_weights
    gathered = 2 * f.largest_layer if shard_weights and n > 1 else 0.0  # the layer in use and the one prefetched
    rows = {
        "weights": (weights / n if shard_weights else weights) + gathered,
        "adapter": f.adapter / n if shard_weights else f.adapter,
        "gradients": f.gradients / n if shard_gradients else f.gradients,
        "optimizer": (f.master_optimizer if master else f.optimizer) / (n if shard_gradients else 1),
        "activations": f.activations,
        "lm_head": f.lm_head,
        "reference": f.reference / n if shard_weights else f.reference,
    }
    return with_overhead(f, rows)


def with_overhead(f: Footprint, rows: dict[str, float]) -> dict[str, float]:
    rows["overhead"] = f.overhead(sum(size for name, size in rows.items() if name != "overhead"))
    return rows


def ddp(f: Footprint, n: int) -> dict[str, float]:
    """Every process holds everything (also one process alone)."""
    return layout_rows(f, shard_weights=False, shard_gradients=False, master=False, n=n)


def zero2(f: Footprint, n: int) -> dict[str, float]:
    """DeepSpeed ZeRO-2: gradients and optimizer state (fp32 master weights included) sharded, weights whole."""
    return layout_rows(f, shard_weights=False, shard_gradients=True, master=True, n=n)


def zero3(f: Footprint, n: int) -> dict[str, float]:
    """DeepSpeed ZeRO-3: weights too, each layer gathered when it runs; a full-FT DPO reference is sharded too."""
    return layout_rows(f, shard_weights=True, shard_gradients=True, master=True, n=n)


def fsdp2(f: Footprint, n: int) -> dict[str, float]:
    """PyTorch FSDP2: ZeRO-3's split with torch's AdamW (moments in the weights' dtype, no master copy)."""
    return layout_rows(f, shard_weights=True, shard_gradients=True, master=False, n=n)


def ep(f: Footprint, n: int) -> dict[str, float]:
    """Expert parallelism as transformers lays it out (finetune/modeling/expert_parallel.py:
    DistributedConfig(fsdp_size=n, ep_size=N)): each layer's experts cut into N groups, each group FSDP2-sharded over
    its n / N holders, everything else FSDP2-sharded over all n. At rest every weight is 1/n per process; in use, a
    layer's dense part is gathered (the one running and the one prefetched, as fsdp2) and its experts only up to
    this process's group (1/N of them; nothing to gather when n = N); the LM head is kept whole from the forward to
    the backward (transformers' FSDP plan: `keep_full_weight`). Full fine-tuning shards gradients and AdamW's moments
    the same way. LoRA's adapter, added after the model was sharded, is whole on every process with its gradients
    and moments (a plain replicated tensor whose gradient transformers' Trainer all-reduces:
    `_sync_replicated_trainable_parameters`), except the routed experts' factors, split with their experts (1/N of
    them per process, with their gradients and moments: finetune/modeling/split_expert_lora.py). A full-FT DPO
    reference is loaded split like the policy.

    On a CPU two more copies land in the same memory (measured on 2 gloo processes, benchmarks/plan_memory.py): the
    pages of the memory-mapped checkpoint a process read its shard from stay mapped while it trains (1/n of the
    weights), and saving a full fine-tune gathers the whole model into the main process's memory
    (transformers' gather_full_state_dict) while its optimizer state lives, and the allocator keeps the training
    step's freed memory; the plan is the main process's."""
    lora = f.adapter > 0
    rows = layout_rows(f, shard_weights=True, shard_gradients=not lora, master=False, n=n)
    if n > 1:
        groups = f.expert_parallel
        weights = f.frozen_weights + f.trained_weights
        experts_gathered = 2 * f.largest_layer_experts / groups if n > groups else 0.0
        rows["weights"] = weights / n + 2 * f.largest_layer_dense + experts_gathered + f.lm_head_weights * (1 - 1 / n)
        if f.device == "cpu":
            rows["weights"] += weights / n + f.trained_weights
    if lora:
        # the experts' factors, and so their gradients and moments, 1/N per process; the other adapters whole
        held = 1 - f.expert_adapter / f.adapter * (1 - 1 / f.expert_parallel) if n > 1 else 1.0
        rows["adapter"], rows["gradients"], rows["optimizer"] = (f.adapter * held, f.gradients * held,
                                                                 f.optimizer * held)
    return with_overhead(f, rows)


LAYOUTS: dict[str, Callable[[Footprint, int], dict[str, float]]] = {
    "ddp": ddp, "zero2": zero2, "zero3": zero3, "fsdp2": fsdp2, "ep": ep}


# ---------------------------------------------------------------- FLOPs

def flops_per_token(c: Census, s: Setup, context: float) -> float:
    """Training FLOPs per real token: 2 per active weight in the forward, attention over `context` (causal: half of
    it on average), the backward twice the forward for full fine-tuning or once (activation gradients only) for a
    frozen base, a recomputed forward with activation checkpointing, and a reference forward for an uncached DPO
    reference (cached: its one pass before training)."""
    matmul = 2 * sum(count for role, count in c.active.items() if role != "other")
    attention = sum(4 * width * context / 2 for width in c.attention_width)
    forward = matmul + attention
    passes = 1 + (2 if s.lora_roles is None else 1) + (1 if s.activation_checkpointing else 0)
    passes += 1 if s.stage == "dpo" and s.reference != "none" else 0
    return forward * passes


# ---------------------------------------------------------------- the plan of one stage

@dataclass
class StagePlan:
    stage: str
    setup: Setup
    parameters: dict[str, dict[str, int]]  # total / active / trainable, each by role
    rows: dict[str, float]  # bytes per device
    memory: float | None  # bytes available per device
    flops_per_token: float
    notes: list[str] = field(default_factory=list)
    change: str | None = None  # the cheapest change that fits, when this does not
    change_total: float | None = None
    epoch_tokens: int | None = None
    epoch_seconds: float | None = None

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.memory is None or self.total <= self.memory


def plan_stage(c: Census, s: Setup, memory: float | None = None) -> StagePlan:
    if not c.checkpointing:  # the stage turns moetune's default off for this model (a recipe asking is refused)
        s = dataclasses.replace(s, activation_checkpointing=False)
    rows = LAYOUTS[s.layout](footprint(c, s), s.processes)
    trainable = ({role: c.lora[role] * s.lora_r for role in s.lora_roles if c.lora.get(role)}
                 if s.lora_roles is not None else dict(c.total))
    return StagePlan(stage=s.stage, setup=s, rows=rows, memory=memory,
                     parameters={"total": dict(c.total), "active": dict(c.active), "trainable": trainable},
                     flops_per_token=flops_per_token(c, s, s.max_length / 2))


# The changes tried when a plan does not fit, cheapest first: those that keep the math (checkpointing, the reference
# cache, the same global batch in smaller steps, a sharded layout), then more GPUs, then NF4 experts (the frozen
# base's precision), then shorter sequences (the data). Each takes the model's census and the setup and returns the
# changed setup and what to type (or a list of them), or None where it does not apply to this model and setup.
def try_checkpointing(c: Census, s: Setup):
    if c.checkpointing and not s.activation_checkpointing:  # a class that cannot checkpoint (JetMoE) keeps its setup
        return dataclasses.replace(s, activation_checkpointing=True), f"{s.stage}.activation_checkpointing=true"


def try_reference_cache(c: Census, s: Setup):
    if s.reference == "copy":
        return dataclasses.replace(s, reference="cached"), "speed.reference_cache=true"


def try_smaller_batch(c: Census, s: Setup):
    if s.batch > 1:
        return (dataclasses.replace(s, batch=1), f"{s.stage}.per_device_train_batch_size=1 with "
                f"{s.stage}.gradient_accumulation_steps x{s.batch} (the same global batch)")


def try_sharding(c: Census, s: Setup):
    if s.processes > 1 and s.layout in ("ddp", "zero2"):
        return dataclasses.replace(s, layout="zero3"), "--accelerate zero3 (weights sharded too)"


def try_more_processes(c: Census, s: Setup):
    # a recipe that splits its experts keeps doing so (a multiple of model.expert_parallel processes)
    layout = s.layout if s.layout in ("zero3", "fsdp2") else "ep" if s.expert_parallel > 1 else "zero3"
    step = s.expert_parallel if layout == "ep" else 1
    return [(dataclasses.replace(s, processes=n, layout=layout), f"{n} GPUs under --accelerate {layout}")
            for n in (2, 4, 8, 16, 32, 64) if n > s.processes and n % step == 0]


def try_nf4_experts(c: Census, s: Setup):
    if s.lora_roles is not None and s.quant_bits is None and s.layout != "ep":  # NF4 experts cannot be split
        return dataclasses.replace(s, quant_bits=4), "model.quantization={bits: 4} (QLoRA: NF4 experts)"


def try_shorter(c: Census, s: Setup):
    lengths = [n for n in (8192, 4096, 2048, 1024, 512, 256) if n < s.max_length]
    return [(dataclasses.replace(s, max_length=n), f"{s.stage}.max_length={n}") for n in lengths]


CHANGES = (try_checkpointing, try_reference_cache, try_smaller_batch, try_sharding, try_more_processes,
           try_nf4_experts, try_shorter)


def cheapest_change(c: Census, plan: StagePlan) -> None:
    """Fill `plan.change` with the first change (in CHANGES' order) under which the stage fits."""
    if plan.fits:
        return
    for make in CHANGES:
        found = make(c, plan.setup) or []
        for setup, text in found if isinstance(found, list) else [found]:
            total = sum(LAYOUTS[setup.layout](footprint(c, setup), setup.processes).values())
            if total <= plan.memory:
                plan.change, plan.change_total = text, total
                return
    plan.change = "none of: activation checkpointing, a smaller batch, ZeRO-3, up to 64 GPUs, NF4 experts, 256 tokens"
