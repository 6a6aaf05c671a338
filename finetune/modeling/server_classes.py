"""Which model classes vLLM and SGLang register for an architecture, read from their source as the code index holds
it (2026-12-06), and the warning an export gives when the server it is written for has none (or one without LoRA).

A server picks its model class by the base checkpoint's `architectures` (config.json), so the check is on those
strings (and on the names real checkpoints of a family carry where they differ from transformers' class,
CHECKPOINT_ARCHITECTURES). The layouts themselves come from the servers' LoRA loaders (export_layouts): a missing
class does not change what the files hold, only whether that server can serve them today, hence a warning, not a
refusal.

vLLM: `_TEXT_GENERATION_MODELS`, `_MULTIMODAL_MODELS` and `_TRANSFORMERS_SUPPORTED_MODELS` of
vllm/model_executor/models/registry.py at VLLM_COMMIT, the newest stored copy (it holds every entry of the copy at
055e47c2 plus Kolibri1, Glm5Next, K2Horizon, DeepseekV41, and moves Mellum to the Transformers backend). LoRA:
`SupportsLoRA` among the class's bases (or its parents'), read in the model files at 055e47c2 (AXK1 at 69f87df3);
None where the class lives in the `vllm.models.<name>` packages or the Transformers backend, whose LoRA coverage of
fused experts was not read. Not registered at VLLM_COMMIT although a model file was once stored: Zaya
(zaya.py at 5f7feb25), SolarOpen (solar_open.py at 87e9273d); Dots1 and MiniMax-Text-01 are in
`_PREVIOUSLY_SUPPORTED_MODELS` (until vLLM 0.23.0).

SGLang: `EntryClass` of python/sglang/srt/models/<file>.py. The index holds no one commit with every model file, so
each entry names the file and the commit it was read at (5d2c83e6: the compiled module stored under
models/__pycache__ at that commit). SGLang has no per-class LoRA opt-in: its LoRA manager wraps the modules of any
class by name (lora_manager.init_lora_modules), and what it cannot wrap is refused by export_layouts already
(SGLANG_NO_QKV, SGLANG_SHARED_LINEAR, SGLANG_NO_INKLING2), so every registered class counts as taking LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

VLLM_COMMIT = "685269b95260cfb5c425f7649befc8f76870b976"
SGLANG_READ = "EntryClass of python/sglang/srt/models/*.py as the code index holds them"


@dataclass(frozen=True)
class ServerClass:
    name: str  # the server's class the architecture resolves to
    lora: bool | None  # takes a LoRA adapter (vLLM: SupportsLoRA); None: not read
    source: str  # where it was read: path at commit


def _vllm(module: str, name: str, lora: bool | None, read_at: str = "055e47c2") -> ServerClass:
    path = module if module.startswith("vllm.") else f"vllm/model_executor/models/{module}.py"
    return ServerClass(name, lora, f"{path} (registry.py at {VLLM_COMMIT[:8]}; class read at {read_at})")


_TRANSFORMERS_MOE = "vllm's Transformers backend"
# architecture -> vLLM class, as registry.py at VLLM_COMMIT maps it (MoE families moetune trains only)
VLLM_CLASSES = {
    "AfmoeForCausalLM": _vllm("afmoe", "AfmoeForCausalLM", True),
    "AriaForConditionalGeneration": _vllm("aria", "AriaForConditionalGeneration", False),
    "AXK1ForCausalLM": _vllm("AXK1", "AXK1ForCausalLM", True, "69f87df3"),
    "Cohere2MoeForCausalLM": _vllm("cohere2_moe", "Cohere2MoeForCausalLM", False),
    "DbrxForCausalLM": _vllm("dbrx", "DbrxForCausalLM", False),
    "DeepseekV2ForCausalLM": _vllm("deepseek_v2", "DeepseekV2ForCausalLM", True),
    "DeepseekV3ForCausalLM": _vllm("deepseek_v2", "DeepseekV3ForCausalLM", True),
    "DeepseekV32ForCausalLM": _vllm("vllm.models.deepseek_v32", "DeepseekV32ForCausalLM", None, "-"),
    "DeepseekV4ForCausalLM": _vllm("vllm.models.deepseek_v4", "DeepseekV4ForCausalLM", None, "-"),
    "Dots3NoteForCausalLM": _vllm("vllm.models.dots3_note", "Dots3NoteForCausalLM", None, "-"),
    "Ernie4_5_MoeForCausalLM": _vllm("ernie45_moe", "Ernie4_5_MoeForCausalLM", True),
    "ExaoneMoeForCausalLM": _vllm("exaone_moe", "ExaoneMoeForCausalLM", True),
    "FlexOlmoForCausalLM": ServerClass("TransformersMoEForCausalLM", None, _TRANSFORMERS_MOE),
    "Gemma4ForCausalLM": _vllm("gemma4", "Gemma4ForCausalLM", True),
    "Gemma4ForConditionalGeneration": _vllm("gemma4_mm", "Gemma4ForConditionalGeneration", True),
    "Glm4MoeForCausalLM": _vllm("glm4_moe", "Glm4MoeForCausalLM", True),
    "Glm4MoeLiteForCausalLM": _vllm("glm4_moe_lite", "Glm4MoeLiteForCausalLM", True),
    "GlmMoeDsaForCausalLM": _vllm("vllm.models.deepseek_v32", "GlmMoeDsaForCausalLM", None, "-"),
    "GptOssForCausalLM": _vllm("gpt_oss", "GptOssForCausalLM", True),
    "GraniteMoeForCausalLM": _vllm("granitemoe", "GraniteMoeForCausalLM", True),
    "GraniteMoeHybridForCausalLM": _vllm("granitemoehybrid", "GraniteMoeHybridForCausalLM", True),
    "GraniteMoeSharedForCausalLM": _vllm("granitemoeshared", "GraniteMoeSharedForCausalLM", True),
    "GraniteMoeSWAForCausalLM": _vllm("granitemoeshared", "GraniteMoeSharedForCausalLM", True),
    "HunYuanMoEV1ForCausalLM": ServerClass("TransformersMoEForCausalLM", None, _TRANSFORMERS_MOE),
    "HYV3ForCausalLM": _vllm("hy_v3", "HYV3ForCausalLM", True),
    "HYV4ForCausalLM": _vllm("vllm.models.hy_v4", "HYV4ForCausalLM", None, "-"),
    "InklingForCausalLM": _vllm("vllm.models.inkling", "InklingForCausalLM", None, "-"),
    "InklingForConditionalGeneration": _vllm("vllm.models.inkling", "InklingForConditionalGeneration", None, "-"),
    "JambaForCausalLM": _vllm("jamba", "JambaForCausalLM", True),
    "KimiLinearForCausalLM": _vllm("vllm.models.kimi_k3", "KimiLinearForCausalLM", None, "-"),
    "Kolibri1ForCausalLM": _vllm("kolibri1", "Kolibri1ForCausalLM", True, "685269b9 (a Qwen3MoeForCausalLM)"),
    "LagunaForCausalLM": _vllm("laguna", "LagunaForCausalLM", True),
    "Lfm2MoeForCausalLM": _vllm("lfm2_moe", "Lfm2MoeForCausalLM", True),
    "Llama4ForCausalLM": _vllm("llama4", "Llama4ForCausalLM", True, "055e47c2 (a LlamaForCausalLM)"),
    "Llama4ForConditionalGeneration": _vllm("mllama4", "Llama4ForConditionalGeneration", None, "-"),
    "LongcatFlashForCausalLM": _vllm("longcat_flash", "LongcatFlashForCausalLM", True),
    "MellumForCausalLM": ServerClass("TransformersMoEForCausalLM", None, _TRANSFORMERS_MOE),
    "MiMoV2FlashForCausalLM": _vllm("mimo_v2", "MiMoV2FlashForCausalLM", False),
    "MiniMaxM2ForCausalLM": _vllm("minimax_m2", "MiniMaxM2ForCausalLM", True),
    "MixtralForCausalLM": _vllm("mixtral", "MixtralForCausalLM", True),
    "NemotronHForCausalLM": _vllm("nemotron_h", "NemotronHForCausalLM", True),
    "OlmoeForCausalLM": _vllm("olmoe", "OlmoeForCausalLM", True),
    "PhiMoEForCausalLM": _vllm("phimoe", "PhiMoEForCausalLM", True),
    "Qwen2MoeForCausalLM": _vllm("qwen2_moe", "Qwen2MoeForCausalLM", True),
    "Qwen3MoeForCausalLM": _vllm("qwen3_moe", "Qwen3MoeForCausalLM", True),
    "Qwen3NextForCausalLM": _vllm("qwen3_next", "Qwen3NextForCausalLM", True),
    "Qwen3_5MoeForCausalLM": _vllm("qwen3_5", "Qwen3_5MoeForCausalLM", True),
    "Qwen3_5MoeForConditionalGeneration": _vllm("qwen3_5", "Qwen3_5MoeForConditionalGeneration", True),
    "Qwen4ExpForCausalLM": _vllm("vllm.models.qwen4_exp", "Qwen4ExpForCausalLM", None, "-"),
    "Qwen4ExpForConditionalGeneration": _vllm("vllm.models.qwen4_exp", "Qwen4ExpForConditionalGeneration", None,
                                              "-"),
    "SarvamMLAForCausalLM": _vllm("sarvam", "SarvamMLAForCausalLM", True),
    "SarvamMoEForCausalLM": _vllm("sarvam", "SarvamMoEForCausalLM", True, "055e47c2 (a BailingMoeForCausalLM)"),
}


def _sglang(file: str, name: str, commit: str) -> ServerClass:
    return ServerClass(name, True, f"python/sglang/srt/models/{file}.py at {commit}")


_PYC = "5d2c83e6"  # compiled modules stored under models/__pycache__ at that commit
# architecture -> SGLang class (EntryClass of the file named)
SGLANG_CLASSES = {
    "AfmoeForCausalLM": _sglang("afmoe", "AfmoeForCausalLM", _PYC),
    "Cohere2MoeForCausalLM": _sglang("cohere2_moe", "Cohere2MoeForCausalLM", "0567a15f"),
    "DbrxForCausalLM": _sglang("dbrx", "DbrxForCausalLM", _PYC),
    "DeepseekV2ForCausalLM": _sglang("deepseek_v2", "DeepseekV2ForCausalLM", _PYC),
    "DeepseekV3ForCausalLM": _sglang("deepseek_v2", "DeepseekV3ForCausalLM", _PYC),
    "DeepseekV32ForCausalLM": _sglang("deepseek_v2", "DeepseekV32ForCausalLM", _PYC),
    "DeepseekV4ForCausalLM": _sglang("deepseek_v4", "DeepseekV4ForCausalLM", _PYC),
    "Dots1ForCausalLM": _sglang("dots1", "Dots1ForCausalLM", "ba97b11d"),
    "Ernie4_5_MoeForCausalLM": _sglang("ernie4", "Ernie4_5_MoeForCausalLM", _PYC),
    "ExaoneMoEForCausalLM": _sglang("exaone_moe", "ExaoneMoEForCausalLM", _PYC),
    "Gemma4ForCausalLM": _sglang("gemma4_causal", "Gemma4ForCausalLM", _PYC),
    "Gemma4ForConditionalGeneration": _sglang("gemma4_mm", "Gemma4ForConditionalGeneration", _PYC),
    "Glm4MoeForCausalLM": _sglang("glm4_moe", "Glm4MoeForCausalLM", _PYC),
    "GlmMoeDsaForCausalLM": _sglang("glm4_moe", "GlmMoeDsaForCausalLM", _PYC),
    "Glm4MoeLiteForCausalLM": _sglang("glm4_moe_lite", "Glm4MoeLiteForCausalLM", _PYC),
    "GptOssForCausalLM": _sglang("gpt_oss", "GptOssForCausalLM", _PYC),
    "GraniteMoeForCausalLM": _sglang("granitemoe", "GraniteMoeForCausalLM", _PYC),
    "GraniteMoeHybridForCausalLM": _sglang("granitemoehybrid", "GraniteMoeHybridForCausalLM", _PYC),
    "GraniteMoeSharedForCausalLM": _sglang("granitemoeshared", "GraniteMoeSharedForCausalLM", "580ea2d7"),
    "HunYuanMoEV1ForCausalLM": _sglang("hunyuan", "HunYuanMoEV1ForCausalLM", _PYC),
    "HYV3ForCausalLM": _sglang("hunyuan_v3", "HYV3ForCausalLM", _PYC),
    "InklingForConditionalGeneration": _sglang("inkling", "InklingForConditionalGeneration", "e5283137"),
    "JambaForCausalLM": _sglang("jamba", "JambaForCausalLM", "359d6a9b"),
    "KimiLinearForCausalLM": _sglang("kimi_linear", "KimiLinearForCausalLM", _PYC),
    "LagunaForCausalLM": _sglang("laguna", "LagunaForCausalLM", _PYC),
    "Lfm2MoeForCausalLM": _sglang("lfm2_moe", "Lfm2MoeForCausalLM", _PYC),
    "Llama4ForCausalLM": _sglang("llama4", "Llama4ForCausalLM", "871da34d"),
    "Llama4ForConditionalGeneration": _sglang("mllama4", "Llama4ForConditionalGeneration", "871da34d"),
    "LongcatFlashForCausalLM": _sglang("longcat_flash", "LongcatFlashForCausalLM", "bafa16ec"),
    "MellumForCausalLM": _sglang("mellum", "MellumForCausalLM", "bc47ace9"),
    "MiMoV2FlashForCausalLM": _sglang("mimo_v2_flash", "MiMoV2FlashForCausalLM", "dd6f32b0"),
    "MiniMaxM2ForCausalLM": _sglang("minimax_m2", "MiniMaxM2ForCausalLM", "7114ab5b"),
    "MixtralForCausalLM": _sglang("mixtral", "MixtralForCausalLM", "02356cee"),
    "NemotronHForCausalLM": _sglang("nemotron_h", "NemotronHForCausalLM", "06c48ca8"),
    "OlmoeForCausalLM": _sglang("olmoe", "OlmoeForCausalLM", "1905f346"),
    "PhiMoEForCausalLM": _sglang("phimoe", "PhiMoEForCausalLM", "263bc85d"),
    "Qwen2MoeForCausalLM": _sglang("qwen2_moe", "Qwen2MoeForCausalLM", "d1a8de4b"),
    "Qwen3MoeForCausalLM": _sglang("qwen3_moe", "Qwen3MoeForCausalLM", "e3d8e9ae"),
    "Qwen3NextForCausalLM": _sglang("qwen3_next", "Qwen3NextForCausalLM", "502a21a8"),
    "Qwen3_5MoeForConditionalGeneration": _sglang("qwen3_5", "Qwen3_5MoeForConditionalGeneration", "cf4465f3"),
    "Qwen4ExpForConditionalGeneration": _sglang("qwen4_exp", "Qwen4ExpForConditionalGeneration", "73a25520"),
    "SarvamMLAForCausalLM": _sglang("sarvam_moe", "SarvamMLAForCausalLM", "d7b80314"),
    "SarvamMoEForCausalLM": _sglang("sarvam_moe", "SarvamMoEForCausalLM", "d7b80314"),
    "ZayaForCausalLM": _sglang("zaya", "ZayaForCausalLM", "40c68241"),
}
SERVER_CLASSES = {"vllm": VLLM_CLASSES, "sglang": SGLANG_CLASSES}
SERVERS = {"vllm": "vLLM", "sglang": "SGLang"}
READ_AT = {"vllm": f"main at {VLLM_COMMIT[:8]}", "sglang": SGLANG_READ}

# model_type -> the `architectures` its released checkpoints carry where transformers names the class otherwise
# (transformers maps sarvam_moe to Glm4MoeForCausalLM and sarvam_mla to DeepseekV3ForCausalLM; both servers key
# Sarvam by the checkpoints' names, as Megatron-Bridge's registry does; Phi-3.5-MoE's config says PhiMoEForCausalLM;
# EXAONE-MoE's is ExaoneMoEForCausalLM in SGLang's and TensorRT-LLM's registrations).
CHECKPOINT_ARCHITECTURES = {"phimoe": ("PhiMoEForCausalLM",), "sarvam_moe": ("SarvamMoEForCausalLM",),
                            "sarvam_mla": ("SarvamMLAForCausalLM",), "exaone_moe": ("ExaoneMoEForCausalLM",)}


def architectures(config, model_type: str) -> tuple[str, ...]:
    """What a server keys its model class by: the checkpoint's `architectures`, and the names released checkpoints
    of the family carry (CHECKPOINT_ARCHITECTURES)."""
    return tuple(dict.fromkeys([*(getattr(config, "architectures", None) or ()),
                                *CHECKPOINT_ARCHITECTURES.get(model_type, ())]))


def server_class(fmt: str, names) -> tuple[str, ServerClass] | None:
    """The first of `names` the server registers, with its class; None if it registers none of them."""
    table = SERVER_CLASSES[fmt]
    return next(((name, table[name]) for name in names if name in table), None)


def warning(fmt: str, names) -> str | None:
    """One sentence where the server (as read) has no class for these architectures, or one without LoRA."""
    if fmt not in SERVER_CLASSES or not names:
        return None
    server, found = SERVERS[fmt], server_class(fmt, names)
    if found is None:
        return (f"{server} ({READ_AT[fmt]}) registers no class for {names[0]}: these files follow {server}'s LoRA "
                f"loader, but serving them needs a {server} that implements {names[0]}; or use --format merged")
    arch, cls = found
    if cls.lora is False:
        return (f"{server} ({READ_AT[fmt]}) registers {cls.name} for {arch} without LoRA support (no SupportsLoRA "
                f"in its bases, {cls.source}): these files follow {server}'s LoRA loader, but serving them needs a "
                f"{server} whose {cls.name} supports LoRA; or use --format merged")
    return None


def family_architectures(model_type: str) -> tuple[str, ...]:
    """The `architectures` a checkpoint of the family may carry: the names its released checkpoints carry
    (CHECKPOINT_ARCHITECTURES), transformers' causal-LM class of its text model, and its multimodal class."""
    from finetune.core import families
    from transformers.models.auto import modeling_auto

    names = [*CHECKPOINT_ARCHITECTURES.get(model_type, ()),
             modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(families.text_model_type(model_type)),
             modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)]
    return tuple(dict.fromkeys(name for name in names if name))


def cell(fmt: str, names) -> str:
    """A server's class for these architectures, as the docs' table shows it."""
    found = server_class(fmt, names)
    if found is None:
        return "none"
    lora = {True: "LoRA", False: "**no LoRA**", None: "LoRA not read"}[found[1].lora]
    return f"`{found[1].name}` ({lora})"
