"""The GPU check's serving part: a `moetune export --format vllm` adapter served by vLLM gives transformers' log-probs.

A tiny Qwen3-MoE (per-expert 2-D layout in vLLM) with a seeded random LoRA on attention and experts is saved, exported
through `moetune export`, loaded by `vllm.LLM(enable_lora=True)`, and the prompt log-probs of a few texts under the
adapter (a LoRARequest) are compared with the PEFT model's in transformers, in bf16 on the GPU. Where vLLM is not
importable (the CPU mode, a machine without it) the part says it was skipped; it was never run in the session that
wrote it (no GPU there).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TEXTS = ["user: sort 3 1 2\nassistant: 1 2 3", "user: reverse abc\nassistant: cba", "user: hello there"]
TOLERANCE = 0.05  # max |log p| difference in bf16 (two kernels' rounding), per prompt token


def skipped(why: str) -> dict:
    return {"ok": None, "skipped": True, "verdict": f"skipped: {why}", "figures": {}}


def check(work: Path) -> dict:
    import torch

    if importlib.util.find_spec("vllm") is None:
        return skipped("vllm is not importable here")
    if not torch.cuda.is_available():
        return skipped("vLLM serves on a GPU; none here")
    base, exported, tokenizer = export_tiny_adapter(work)
    expected = transformers_logprobs(base, work / "adapter", tokenizer)
    served = vllm_logprobs(base, exported, tokenizer)
    worst = max(max(abs(a - b) for a, b in zip(row, served_row)) for row, served_row in zip(expected, served))
    return {"ok": worst <= TOLERANCE,
            "verdict": f"vLLM serving the exported per-expert adapter: prompt log-probs within {worst:.3f} of "
                       f"transformers + PEFT (tolerance {TOLERANCE}, bf16)",
            "figures": {"max_abs_logprob_difference": worst, "texts": len(TEXTS)}}


def export_tiny_adapter(work: Path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config.recipe import LoraConfig, ModelInit
    from finetune.modeling import adapters
    from finetune.modeling.tiny import init_config, train_tokenizer
    from finetune.stages import export

    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=300)
    init = ModelInit(architecture="qwen3_moe", hidden_size=256, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, num_experts=8, experts_per_token=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer))
    base = work / "serving-base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(targets=["attention", "experts"])))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(work / "adapter")
    config_file = work / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(base)}))
    exported = export.export(work / "adapter", "vllm", work / "adapter-vllm")
    return base, exported, tokenizer


def transformers_logprobs(base: Path, adapter: Path, tokenizer) -> list[list[float]]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda()
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    rows = []
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]], device="cuda")
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
        rows.append(logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
    return rows


def vllm_logprobs(base: Path, exported: Path, tokenizer) -> list[list[float]]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(base), dtype="bfloat16", enable_lora=True, max_lora_rank=16, max_loras=1,
              gpu_memory_utilization=0.3, enforce_eager=True)
    prompts = [{"prompt_token_ids": tokenizer(text)["input_ids"]} for text in TEXTS]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1),
                           lora_request=LoRARequest("moetune", 1, str(exported)))
    rows = []
    for prompt, output in zip(prompts, outputs):
        ids = prompt["prompt_token_ids"]
        rows.append([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    return rows
