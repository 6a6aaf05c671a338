"""The GPU check's serving part: `moetune export` adapters served by vLLM and by SGLang give transformers' log-probs.

A tiny Qwen3-MoE with a seeded random LoRA on attention and experts is saved and exported through `moetune export`
(--format vllm: per-expert 2-D keys as the checkpoint names them; --format sglang: per-expert gate_proj/up_proj/
down_proj keys). Each server loads the base with the exported adapter (`vllm.LLM(enable_lora=True)` with a
LoRARequest; `sglang.Engine(enable_lora=True, lora_paths=...)` with `lora_path`), and the prompt log-probs of a few
texts are compared with the PEFT model's in transformers, in bf16 on the GPU. A server whose package is not
importable here, or a machine without a GPU, makes that server's half say it was skipped (the part is SKIPPED when
both are). Neither half has been run yet: the sessions that wrote them had no GPU and neither package installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TEXTS = ["user: sort 3 1 2\nassistant: 1 2 3", "user: reverse abc\nassistant: cba", "user: hello there"]
TOLERANCE = 0.05  # max |log p| difference in bf16 (two kernels' rounding), per prompt token
SERVERS = {"vllm": "vLLM", "sglang": "SGLang"}
RANK = 16  # the adapter's rank, within both servers' --max-lora-rank


def skipped(why: str) -> dict:
    return {"ok": None, "skipped": True, "verdict": f"skipped: {why}", "figures": {}}


def check(work: Path) -> dict:
    """Both servers in turn; SKIPPED only when neither could run."""
    halves = {server: serve_and_compare(server, work) for server in SERVERS}
    verdict = "; ".join(f"{SERVERS[server]}: {half['verdict']}" for server, half in halves.items())
    ran = {server: half for server, half in halves.items() if not half.get("skipped")}
    if not ran:
        return {"ok": None, "skipped": True, "verdict": f"skipped: {verdict}", "figures": {}}
    return {"ok": all(half["ok"] for half in ran.values()), "verdict": verdict,
            "figures": {server: half["figures"] for server, half in ran.items()}}


def serve_and_compare(server: str, work: Path) -> dict:
    import torch

    if importlib.util.find_spec(server) is None:
        return skipped(f"{server} is not importable here")
    if not torch.cuda.is_available():
        return skipped(f"{SERVERS[server]} serves on a GPU; none here")
    base, adapter, tokenizer = tiny_adapter(work)
    from finetune.stages import export

    exported = export.export(adapter, server, work / f"adapter-{server}")
    expected = transformers_logprobs(base, adapter, tokenizer)
    served = (vllm_logprobs if server == "vllm" else sglang_logprobs)(base, exported, tokenizer)
    worst = max(max(abs(a - b) for a, b in zip(row, served_row)) for row, served_row in zip(expected, served))
    return {"ok": worst <= TOLERANCE,
            "verdict": f"serving the exported per-expert adapter: prompt log-probs within {worst:.3f} of "
                       f"transformers + PEFT (tolerance {TOLERANCE}, bf16)",
            "figures": {"max_abs_logprob_difference": worst, "texts": len(TEXTS)}}


def tiny_adapter(work: Path):
    """(base folder, adapter folder, tokenizer): built once, shared by both servers' halves."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config.recipe import LoraConfig, ModelInit
    from finetune.modeling import adapters
    from finetune.modeling.tiny import init_config, train_tokenizer

    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=300)
    base, adapter = work / "serving-base", work / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter, tokenizer
    init = ModelInit(architecture="qwen3_moe", hidden_size=256, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, num_experts=8, experts_per_token=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = LoraConfig(targets=["attention", "experts"], r=RANK)
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(adapter)
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(base)}))
    return base, adapter, tokenizer


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

    llm = LLM(model=str(base), dtype="bfloat16", enable_lora=True, max_lora_rank=RANK, max_loras=1,
              gpu_memory_utilization=0.3, enforce_eager=True)
    prompts = [{"prompt_token_ids": tokenizer(text)["input_ids"]} for text in TEXTS]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1),
                           lora_request=LoRARequest("moetune", 1, str(exported)))
    rows = []
    for prompt, output in zip(prompts, outputs):
        ids = prompt["prompt_token_ids"]
        rows.append([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    return rows


def sglang_logprobs(base: Path, exported: Path, tokenizer) -> list[list[float]]:
    import sglang

    engine = sglang.Engine(model_path=str(base), dtype="bfloat16", enable_lora=True,
                           lora_paths=[f"moetune={exported}"], max_lora_rank=RANK, max_loras_per_batch=1,
                           mem_fraction_static=0.3, disable_cuda_graph=True)
    try:
        ids = [tokenizer(text)["input_ids"] for text in TEXTS]
        outputs = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                                  return_logprob=True, logprob_start_len=0, lora_path=["moetune"] * len(ids))
    finally:
        engine.shutdown()
    # input_token_logprobs: (log p, token id, text) per prompt token, None for the first
    return [[logprob for logprob, _, _ in output["meta_info"]["input_token_logprobs"][1:]] for output in outputs]
