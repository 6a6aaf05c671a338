"""The recipe schema: one YAML file per pipeline, one typed dataclass per section, defaults and help on each field.

A recipe has a section per concern (model, data, sft, dpo, eval, hub, ...) and a `run_dir` where every stage
writes. The `data:` and `eval:` sections are declared beside their code (finetune/config/data.py, finetune/config/evaluation.py).
finetune/config/parsing.py reads YAML into these classes; finetune/config/validation.py checks the values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config.data import DataConfig
from finetune.config.evaluation import EvalConfig
from finetune.config.section_fields import help_field, to_dict


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


@dataclass
class ModelInit:
    """A tiny MoE model built from a config, for CPU demos and tests (no download)."""

    architecture: str = help_field(
        "mixtral", help="MoE family: any MoE causal-LM model_type of the installed transformers (`python -m "
        "finetune.core.families` lists them; a multimodal one builds its text model).")
    hidden_size: int = help_field(64, help="Width of the residual stream.")
    intermediate_size: int = help_field(128, help="Width of each expert's FFN.")
    num_layers: int = help_field(2, help="Number of decoder layers.")
    num_heads: int = help_field(4, help="Attention heads.")
    num_kv_heads: int = help_field(2, help="Key/value heads (grouped-query attention).")
    num_experts: int = help_field(4, help="Experts per MoE layer.")
    experts_per_token: int = help_field(2, help="Experts each token is routed to (top-k).")
    router_aux_loss_coef: float = help_field(0.01, help="Load-balancing loss weight stored in the model config.")
    max_position_embeddings: int = help_field(512, help="Longest sequence the model accepts.")
    vocab_size: int = help_field(160, help="Target vocabulary size of the tokenizer trained on the recipe's data.")


@dataclass
class LoraConfig:
    """LoRA adapters chosen by role, so the router stays frozen unless asked for."""

    targets: list[str] = help_field(
        factory=lambda: ["attention", "experts", "shared_experts"],
        help="Roles to adapt: attention (attention, MLA, linear-attention and Mamba projections), experts (fused "
        "3-D routed-expert weights), shared_experts (the always-on experts beside them), dense_mlp (the FFN of "
        "layers without experts, e.g. DeepSeek's first layers), router, all. The router is trained only when "
        "listed (or with 'all'); e_score_correction_bias never by gradients (see balancing.bias_update_rate).",
    )
    r: int = help_field(16, help="LoRA rank (shared across the experts of one fused parameter).")
    alpha: int = help_field(32, help="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = help_field(0.0, help="LoRA dropout; forced to 0 on expert targets, which refuse dropout.")
    stages: list[str] = help_field(
        factory=lambda: ["sft", "dpo"],
        help="Stages that train adapters; the others fine-tune all weights (e.g. [dpo] after a full SFT).",
    )


@dataclass
class QuantizationConfig:
    """QLoRA: the frozen base of adapter-training stages in 4 (or 8) bits, the fused experts included."""

    bits: int = help_field(
        4, help="Linear layers (attention) through bitsandbytes: 4 (NF4) or 8 (LLM.int8). The fused expert weights "
        "are stored in NF4 by moetune in both cases; the router and lm_head stay in full precision.",
    )
    double_quant: bool = help_field(
        True, help="Quantize the 4-bit block scales again (about 0.4 bits per weight less), experts included.",
    )
    compute_dtype: str = help_field(
        "auto", help="dtype 4-bit weights are dequantized to for each matmul: auto (the model's dtype), float32, "
        "bfloat16, float16.",
    )


@dataclass
class ModelConfig:
    name_or_path: str | None = help_field(None, help="Hub id or local path of the base model.")
    revision: str | None = help_field(None, help="Hub revision (branch, tag or commit) of the base model.")
    init: ModelInit | None = help_field(
        None, help="Build a tiny model of a named MoE architecture from a config instead of loading one."
    )
    trust_remote_code: bool = help_field(
        False, help="Run Python code shipped with a hub model. Off: only turn it on for repositories you trust."
    )
    chat_template: str | None = help_field(
        None, help="Chat template for a base model whose tokenizer has none (e.g. Mixtral-8x7B-v0.1), or to replace "
        "the tokenizer's: a Jinja string, or the path of a .jinja file relative to the recipe's folder. SFT's "
        "assistant-only loss reads {% generation %} markers around assistant replies, or TRL's training version of "
        "the template (trl/chat_templates/*_training.jinja); without either it finds the replies turn by turn.",
    )
    dtype: str = help_field(
        "auto", help="Weights dtype: auto (fp32 on CPU, bf16 on GPUs that support it, else fp16), float32, bfloat16."
    )
    experts_implementation: str = help_field(
        "auto", help="Expert kernel: auto (grouped_mm), eager, grouped_mm, batched_mm (never on CPU: 30x slower). "
        "Quantized experts (model.quantization) use moetune's NF4 kernel instead (experts with a forward of their "
        "own, e.g. Llama 4's: that forward on the NF4 weights read dequantized)."
    )
    lora: LoraConfig | None = help_field(None, help="LoRA adapters; null means full fine-tuning.")
    quantization: QuantizationConfig | None = help_field(
        None, help="Load the base of the stages that train adapters quantized (QLoRA), experts included; "
        "null keeps full precision. Needs model.lora.",
    )
    expert_parallel: int = help_field(
        1, help="Expert parallelism in launches of several processes (transformers' DistributedConfig): each MoE "
        "layer's experts split across this many processes, tokens sent to them all-to-all, everything else FSDP2-"
        "sharded over all processes. 1 is off. Must divide the process count and the experts per layer; full "
        "fine-tuning or LoRA (each expert's adapter applied where the expert is; not the router role, not with "
        "model.quantization). See docs/scaling-out.md.",
    )

    def lora_for(self, stage: str) -> LoraConfig | None:
        """The adapter settings a training stage uses, or None for full fine-tuning."""
        return self.lora if self.lora is not None and stage in self.lora.stages else None


@dataclass
class SpeedConfig:
    """Levers that make training faster without changing its math (tests compare each with TRL; see `make bench`)."""

    padding_free: bool = help_field(
        True, help="SFT and DPO: batches without padding, sequences end to end in one row, attention within each.")
    share_prompt: bool = help_field(
        True, help="DPO with padding_free: each pair's prompt computed once, then chosen, then rejected "
        "(which attends to the prompt, not to chosen).")
    scored_lm_head: bool = help_field(
        True, help="SFT: the LM head only on the tokens the loss scores (the assistant turns), in small vocabulary "
        "tiles; TRL's on a CPU runs it on every position. DPO's padding-free batches always do.")
    tiled_lm_head: bool = help_field(
        True, help="Devices without Triton (CPUs): the scored LM head's log-probs (DPO's padding-free batches, SFT's "
        "scored_lm_head) in moetune's cache-sized tiles, with about half the passes of TRL's torch fallback "
        "(finetune/modeling/lm_head_tiles.py); GPUs run TRL's Triton kernel either way.")
    reference_cache: bool = help_field(
        True, help="DPO: reference log-probs computed in one pass before training (TRL's precompute_ref_log_probs, "
        "which dpo: can still set) and cached by model, tokens and batch layout, so a second epoch, a re-run, a "
        "resumed run or a sweep over beta reuses them; full fine-tuning then loads no reference copy.")


@dataclass
class BalancingConfig:
    """Expert load balancing beyond the family's own aux loss (which TRL adds: sft/dpo router_aux_loss_coef)."""

    bias_update_rate: float = help_field(
        0.0, help="Aux-loss-free families (DeepSeek-V3, GLM-4.5, dots1, MiniMax-M2, ERNIE 4.5): after each optimizer "
        "step, e_score_correction_bias moves by this much towards balance, per expert, by the sign of (mean load - "
        "its load) as in DeepSeek-V3 (which used 0.001). 0 keeps the bias as loaded.")
    router_z_loss_coef: float = help_field(
        0.0, help="Router z-loss (ST-MoE) weight, any family: mean over real tokens of logsumexp(router logits)^2, "
        "averaged over MoE layers, added to the SFT/DPO loss and logged as router_z_loss. ST-MoE used 0.001; 0 is off.")


@dataclass
class RoutingConfig:
    """Routing telemetry of SFT and DPO (MoE models): drift from the reference, chosen vs rejected, expert alarms.

    None of it changes the loss or the gradients; it is not an input of a stage's result."""

    probe_sequences: int = help_field(
        256, help="Held-out sequences (the test split, drawn once per run with the recipe's seed) on which, every "
        "logging_steps, the routing of the model being trained is compared with the reference's (DPO: the SFT "
        "model; SFT: the base): per layer, mean Jaccard overlap of the top-k expert sets, KL(policy || reference) "
        "of the router distributions, share of tokens whose top-1 expert changed (routing_drift.json). 0 is off.")
    max_overhead: float | None = help_field(
        0.05, help="Largest share of training time the drift probe may take: at the first log, fewer of the probe "
        "sequences are kept if all of them would cost more (never fewer than 8). null probes them all.")
    pair_sample: int = help_field(
        256, help="DPO: training pairs (drawn once with the recipe's seed) whose chosen and rejected completions' "
        "expert load is compared per layer (Jensen-Shannon divergence) before and after training. 0 is off.")
    dead_load: float = help_field(
        0.1, help="An expert is dead when its share of a layer's routed tokens stays under this fraction of the "
        "uniform share (1 / experts).")
    hot_load: float = help_field(
        3.0, help="An expert is hot when its share stays over this many times the uniform share (an expert takes at "
        "most 1 / top_k of a layer's routed tokens, so hot needs experts / top_k above this).")
    alarm_logs: int = help_field(
        3, help="Logging steps in a row an expert must stay dead or hot before it is named (once) in the log, in "
        "expert_load.json and in report.md.")


@dataclass
class HubConfig:
    push: bool = help_field(False, help="Push each of `stages` to the Hub as soon as it completes (the upload runs "
                            "while the next stages train; the command ends once it is done).")
    repo_id: str | None = help_field(
        None, help="Hub repository, e.g. my-org/mixtral-hh-{stage}-lora; {stage} becomes the stage name, so "
        "that each stage gets its own repository (needed when more than one stage is pushed).")
    stages: list[str] = help_field(factory=lambda: ["sft", "dpo"], help="Training stages pushed when push is true.")
    private: bool = help_field(True, help="Create the repository as private.")

    def repo_for(self, stage: str) -> str:
        return self.repo_id.replace("{stage}", stage)


@dataclass
class CheckpointConfig:
    """When SFT and DPO save checkpoints to resume from, on top of TRL's save_strategy/save_steps."""

    every_minutes: float | None = help_field(
        30, help="Save a checkpoint whenever this many minutes have passed since the last one, so a kill loses at "
        "most that much (null or 0: only on the step schedule and on SIGTERM/Ctrl-C, which always save). Steps come "
        "from sft:/dpo: save_strategy and save_steps (off by default); their save_total_limit (default 2) keeps the "
        "last N checkpoints of either kind. Not an input of the result: change it freely between interruption and "
        "resume.",
    )


def trainer_field(config_name: str) -> Any:
    """A section of any fields of a TRL trainer config: the section of the training stage of the same name."""
    return field(default_factory=dict, metadata={"help": f"Any field of TRL's {config_name}.", "trl_config": config_name})


@dataclass(frozen=True)
class ModelSource:
    """What the models layer reads of a recipe: the model section, and the run folder holding its stages' models."""

    model: ModelConfig
    run_path: Path


@dataclass(frozen=True)
class TrainerSettings:
    """What a training stage's TRL config is made of: the recipe's section of TRL fields for that stage and the
    three recipe keys moetune's defaults read. The training layer gets this, not the whole recipe."""

    stage: str  # sft or dpo
    fields: dict[str, Any]  # the recipe's sft: or dpo: section (TRL's field names)
    seed: int
    dtype: str  # model.dtype: mixed precision on a GPU follows it
    reference_cache: bool  # speed.reference_cache: DPO's precompute_ref_log_probs


@dataclass
class PlanConfig:
    """The memory and time plan (`moetune plan`), which also runs before every training stage that loads a model."""

    refuse: bool = help_field(
        True, help="Refuse (exit 2, before any weight is loaded) a training stage whose planned peak memory per device "
        "exceeds plan.memory, naming the numbers and the cheapest change that fits; false runs it anyway.")
    memory: str | None = help_field(
        None, help="Memory per device to plan against, e.g. 24GiB or 80GB; null: the GPU's total memory, or on a CPU "
        "the host's RAM shared by the processes. `--gpu-memory` on the command line sets it.")
    mfu: float | None = help_field(
        None, help="Model-FLOPs utilisation the time estimate assumes (0-1); null: 0.25 on GPUs (MoE training with "
        "grouped expert kernels), 0.3 on a CPU.")


@dataclass
class Recipe:
    run_dir: str = help_field(help="Folder where every stage writes: run_dir/{data,base,sft,dpo,eval}.")
    model: ModelConfig = help_field(factory=ModelConfig, help="The base model.")
    data: DataConfig = help_field(factory=DataConfig, help="Training data sources (the prep stage).")
    sft: dict[str, Any] = trainer_field("SFTConfig")
    dpo: dict[str, Any] = trainer_field("DPOConfig")
    eval: EvalConfig = help_field(factory=EvalConfig, help="Evaluation (the eval stage).")
    hub: HubConfig = help_field(factory=HubConfig, help="Pushing results to the Hugging Face Hub.")
    speed: SpeedConfig = help_field(factory=SpeedConfig, help="Training speed levers (math unchanged).")
    balancing: BalancingConfig = help_field(factory=BalancingConfig, help="Expert load balancing in SFT and DPO.")
    routing: RoutingConfig = help_field(factory=RoutingConfig, help="Routing telemetry in SFT and DPO (MoE models).")
    checkpoints: CheckpointConfig = help_field(factory=CheckpointConfig, help="Checkpoint schedule of SFT and DPO.")
    plan: PlanConfig = help_field(factory=PlanConfig, help="Memory and time plan, checked before training stages.")
    seed: int = help_field(42, help="Seed for data mixing, splits, initialisation and training.")
    # Where the recipe came from, for error messages and resolving relative paths; not a YAML key.
    source: str = field(default="<recipe>", metadata={"internal": True})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def model_source(self) -> ModelSource:
        return ModelSource(self.model, self.run_path)

    @property
    def base_dir(self) -> Path:
        """The recipe file's folder: relative paths in `data:` and `eval:` start here, wherever moetune runs from."""
        return Path(self.source).resolve().parent

    def section_dict(self, name: str) -> dict[str, Any]:
        return to_dict(getattr(self, name))

    def trainer_inputs(self, stage: str) -> dict[str, Any]:
        """The sft:/dpo: fields a training stage's result depends on: all but when it saves and logs, so a
        checkpoint schedule or log interval can change between an interruption and its resume."""
        return {key: value for key, value in getattr(self, stage).items() if key not in NOT_RESULT_TRAINER_KEYS}

    def trainer_settings(self, stage: str) -> TrainerSettings:
        return TrainerSettings(stage, dict(getattr(self, stage)), self.seed, self.model.dtype, self.speed.reference_cache)

    def model_inputs(self, stage: str) -> dict[str, Any]:
        """The model settings a training stage depends on (its own adapter settings, not the other stage's)."""
        return {**self.section_dict("model"), "lora": to_dict(self.model.lora_for(stage))}


# TRL fields that say when to save and log, not what is trained.
NOT_RESULT_TRAINER_KEYS = frozenset({
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
    "logging_strategy", "logging_steps", "logging_first_step", "logging_dir", "report_to", "disable_tqdm", "run_name",
})

# The training stages are the recipe's trainer sections (sft:, dpo:); the stage registry runs them.
TRAINING_STAGES = tuple(f.name for f in dataclasses.fields(Recipe) if "trl_config" in f.metadata)
# What `moetune export` and `moetune push --format` write (finetune/stages/export.py).
EXPORT_FORMATS = ("peft", "vllm", "sglang", "merged")
