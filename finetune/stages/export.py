"""`moetune export STAGE_DIR --format {peft,vllm,sglang,merged} --out DIR`: a trained adapter as servers load it.

- peft: PEFT's current layout (an adapter saved by PEFT 0.18 is converted; a chain sft -> dpo becomes one adapter
  on the base, ranks concatenated); unchanged files when the stage is one adapter already in that layout.
- vllm: for the families whose vLLM model class loads PEFT's 3-D expert layout natively (`is_3d_moe_weight = True`
  in vLLM's source: GptOssForCausalLM, Qwen3_5MoeForConditionalGeneration) that layout; for every other family
  per-expert 2-D keys named as the base checkpoint names its expert weights (what vLLM's `get_expert_mapping`
  packs), or, where the checkpoint stores the experts fused (no per-expert names), PEFT's 3-D layout for vLLM's
  mixed-format loader (`--enable-mixed-moe-lora-format`, the adapter declared `is_3d_lora_weight`; the README's
  command says so). Read from vLLM's main branch (vllm/lora/model_manager.py at 01533aa, vllm/lora/lora_model.py
  at 0306474; vLLM >= 0.26).
- sglang: vLLM's per-expert 2-D keys with each expert's projections named gate_proj/up_proj/down_proj (SGLang's
  loader renames w1/w3/w2 to those names, stacks gate_proj + up_proj per expert, and applies expert LoRA only when
  the targets include gate_up_proj and down_proj); for families whose checkpoint stores the experts fused, SGLang's
  stacked 3-D keys `...experts.gate_up_proj` / `...experts.down_proj` (export_layouts' docstring). Read from
  SGLang's main branch (SGLANG_READ).
- merged: full-precision weights with the adapter folded in, as from_pretrained loads them; for an adapter trained
  on NF4 experts (model.quantization) the experts are first rounded through NF4 exactly as training stored them,
  and delta_report.md says, per matrix, how large the LoRA update is against the NF4 step and how much of it a
  re-quantization of the merged weights would keep.
For vllm/sglang the base's `architectures` are looked up in the classes each server registers (server_classes):
where it has none, or one without LoRA, the files are still written (the layout is the loader's) and the export
warns on one line, in the README's Serving section and in export.json (`server_class`, `server_warning`).
Everything is written to `OUT.partial` and renamed when complete: a refusal or a crash leaves no OUT behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from finetune.config.parsing import load_recipe
from finetune.config.recipe import EXPORT_FORMATS as FORMATS
from finetune.core import families
from finetune.core.rundir import read_manifest, require_empty
from finetune.modeling import adapters, expert_quant, server_classes
from finetune.modeling import export_layouts as layouts
from finetune.modeling.loading import load_adapter_base

VLLM_READ = "vLLM main (vllm/lora/model_manager.py 01533aa, vllm/lora/lora_model.py 0306474; >= 0.26)"
# model_type -> vLLM class with `is_3d_moe_weight = True`: PEFT's 3-D expert layout loads natively there.
VLLM_3D = {"gpt_oss": "GptOssForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForConditionalGeneration"}
SGLANG_READ = ("SGLang main (python/sglang/srt/lora/mem_pool.py and layers.py at 00639c4d: per-expert keys "
               "`experts.{e}.`, or a 3-D `experts.gate_up_proj`/`experts.down_proj` tensor, in "
               "LoRAMemoryPool.load_lora_weight_to_buffer, gate/up as [gate; up] in FusedMoEWithLoRA; lora.py "
               "LoRAAdapter.normalize_gate_up_proj; lora_config.py at 0ceb81fe)")
LAYOUTS = {("vllm", False): "per-expert 2-D keys (experts.{e}.<projection> as the checkpoint names them)",
           ("vllm", True): "PEFT 3-D layout in each expert's (out, in) orientation, for vLLM's mixed-format loader "
                           "(--enable-mixed-moe-lora-format, is_3d_lora_weight), the checkpoint storing the experts "
                           "fused",
           ("sglang", False): "per-expert 2-D keys (experts.{e}.gate_proj/up_proj/down_proj, as SGLang's loader "
                              "names them)",
           ("sglang", True): "SGLang's stacked experts keys (experts.gate_up_proj / experts.down_proj: A (E, r, in), "
                             "B (E, out, r), gate_up's B rows [gate; up]), the checkpoint storing the experts fused"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


def adapter_chain(stage_dir: Path) -> list[Path]:
    """The adapters from the first one on full weights up to `stage_dir` (sft, dpo for a LoRA SFT -> LoRA DPO run)."""
    chain, manifest = [stage_dir], read_manifest(stage_dir)
    while manifest is not None and manifest["outputs"]["parent"] != "base":
        parent = stage_dir.parent / manifest["outputs"]["parent"]
        manifest = read_manifest(parent)
        if manifest is None or manifest["outputs"]["kind"] != "adapter":
            break
        chain.insert(0, parent)
    return chain


def read_adapter(folder: Path, experts: dict, servable: bool = True) -> dict[str, layouts.Factors]:
    config = json.loads((folder / CONFIG_FILE).read_text())
    return layouts.read_peft(load_file(folder / ADAPTER_FILE), config, experts, servable)


def base_name(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / CONFIG_FILE).read_text())["base_model_name_or_path"]


def export(stage_dir: str | Path, fmt: str, out: str | Path) -> Path:
    stage_dir, out = Path(stage_dir), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
    if not (stage_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{stage_dir} holds no adapter (no {CONFIG_FILE}); a full fine-tune is already servable "
                         f"as it is: `vllm serve {stage_dir}`.")
    require_empty(out, "--out")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        record = write_format(stage_dir, fmt, work)
        (work / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        (work / "README.md").write_text(readme(record, out))
    except layouts.LayoutError as error:
        shutil.rmtree(work)
        raise ValueError(f"--format {fmt} cannot express {stage_dir}: {error}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (require_empty)
    work.rename(out)
    print(f"[export] {stage_dir} as {fmt} ({record['layout']}) in {out}")
    if record.get("server_warning"):
        print(f"[export] warning: {record['server_warning']}")
    return out


def write_format(stage_dir: Path, fmt: str, work: Path) -> dict:
    chain = adapter_chain(stage_dir)
    # merged: the stage's parents merged in (load_adapter_base); the re-layouts: the full weights under the chain
    base, tokenizer = load_adapter_base(stage_dir if fmt == "merged" else chain[0])
    model_type = families.text_config(base.config).model_type
    record = {"format": fmt, "stage": str(stage_dir), "adapters": [str(d) for d in chain], "model_type": model_type,
              "base": base_name(chain[0]), "peft_versions": [peft_version(d) for d in chain]}
    if fmt == "merged":
        record.update(write_merged(stage_dir, base, work))
    else:
        experts = layouts.experts_info(base)
        factors = layouts.combine([read_adapter(d, experts) for d in chain])
        record.update(write_adapter(stage_dir, chain, fmt, factors, experts, base, model_type, work))
        record.update(server_record(fmt, base.config, model_type))
    tokenizer.save_pretrained(work)
    return record


def server_record(fmt: str, config, model_type: str) -> dict:
    """The server's model class for the base's architectures as read from its source (server_classes), and the
    warning when it has none, or one without LoRA: the files are still what its LoRA loader reads."""
    if fmt not in server_classes.SERVER_CLASSES:
        return {}
    names = server_classes.architectures(config, model_type)
    found = server_classes.server_class(fmt, names)
    server_class = None if found is None else {"architecture": found[0], "class": found[1].name,
                                               "lora": found[1].lora, "read": found[1].source}
    return {"architectures": list(names), "server_class": server_class,
            "server_warning": server_classes.warning(fmt, names)}


def peft_version(adapter_dir: Path) -> str | None:
    return json.loads((adapter_dir / CONFIG_FILE).read_text()).get("peft_version")


def as_trained(chain: list[Path]) -> bool:
    """One adapter, saved in PEFT's current layout: the peft export is its files."""
    return len(chain) == 1 and not layouts.is_old_layout(json.loads((chain[0] / CONFIG_FILE).read_text()))


def write_adapter(stage_dir, chain, fmt, factors, experts, base, model_type, work) -> dict:
    if fmt == "peft" and as_trained(chain):
        for name in (ADAPTER_FILE, CONFIG_FILE):
            shutil.copy2(stage_dir / name, work / name)
        return {"layout": "PEFT 3-D (target_parameters), as trained", "rank": layouts.max_rank(factors),
                "loads_with": loads_with(experts)}
    mixed = False
    if fmt == "peft" or fmt == "vllm" and model_type in VLLM_3D:
        tensors, fields = layouts.to_peft(factors, experts)
        layout = "PEFT 3-D (target_parameters), PEFT >= 0.19 in/out order"
    else:
        if fmt == "sglang":
            layouts.check_sglang_model(model_type, factors, experts)  # no SGLang class sizes its Linears
            layouts.check_sglang_qkv(factors)  # a lone q_proj is named before anything fused on disk
        try:
            tensors, fields = per_expert(fmt, factors, experts, base)
        except layouts.FusedOnDisk:  # no per-expert names: the servers' 3-D keys
            tensors, fields = stacked(fmt, factors, experts, base)
            mixed = fmt == "vllm"
        layout = LAYOUTS[fmt, any(tensor.dim() == 3 for tensor in tensors.values()) or mixed]
    rank = fields.get("r") or layouts.max_rank(factors)
    config = layouts.lora_config(base_name(chain[0]), rank, fields["target_modules"], fields["target_parameters"])
    save_file(tensors, work / ADAPTER_FILE, metadata={"format": "pt"})
    (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return {"layout": layout, "rank": rank, "vllm_class_3d": VLLM_3D.get(model_type), "vllm_mixed_format": mixed,
            "loads_with": loads_with(experts) if fmt == "peft" else None}


# What loads a peft export of flat experts (DBRX): plain PEFT on transformers' class cannot apply it.
MOETUNE_LOADER = ("moetune's loader only (`moetune merge ADAPTER_DIR --out DIR`, `eval.models`): transformers' "
                  "DbrxExperts slices its experts' flat w1/v1/w2 itself, outside the module PEFT wraps, so "
                  "`PeftModel.from_pretrained` on `AutoModelForCausalLM.from_pretrained(BASE)` refuses the expert "
                  "LoRA (size mismatch); moetune views those weights as 3-D experts and reads them through the LoRA")


def loads_with(experts: dict) -> str | None:
    return MOETUNE_LOADER if any(info.flat for info in experts.values()) else None


def per_expert(fmt, factors, experts, base) -> tuple[dict, dict]:
    """vLLM's per-expert keys; for SGLang the same tensors under the projection names its loader reads."""
    tensors, modules = layouts.to_per_expert(factors, experts, base, shared_linears=fmt == "vllm")
    if fmt == "sglang":
        tensors, modules = layouts.sglang_names(tensors, modules)
    tensors, rank = layouts.pad_ranks(tensors)  # Linears sharing a tensor (Sarvam's query_key_value) sum their ranks
    return tensors, {**module_targets(modules), "r": rank}


def stacked(fmt, factors, experts, base) -> tuple[dict, dict]:
    """Experts fused on disk: SGLang's stacked 3-D keys, or PEFT's 3-D layout for vLLM's mixed-format loader."""
    if fmt == "vllm":
        return layouts.to_vllm_mixed(factors, experts)
    tensors, modules = layouts.to_sglang_stacked(factors, experts, base)
    return tensors, module_targets(modules)


def module_targets(modules: list[str]) -> dict:
    """adapter_config fields for LoRA on modules by name: the leaf names the servers match, no parameters."""
    return {"target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "target_parameters": None}


# ---------------------------------------------------------------- merged

def write_merged(stage_dir: Path, base, work: Path) -> dict:
    """`base` holds the stage's parents merged in; NF4-trained experts are rounded before the stage's adapter."""
    recipe = load_recipe(stage_dir / "recipe.yaml") if (stage_dir / "recipe.yaml").is_file() else None
    quantization = recipe.model.quantization if recipe is not None else None
    report = []
    if quantization is not None:
        updates = read_adapter(stage_dir, layouts.experts_info(base), servable=False)
        report = round_experts(base, updates, quantization.double_quant)
    merged = adapters.merge_adapter(base, stage_dir)
    merged.save_pretrained(work)
    if report:
        (work / "delta_report.json").write_text(json.dumps(report, indent=1) + "\n")
        (work / "delta_report.md").write_text(report_markdown(report))
        erased = [row["matrix"] for row in report if row["erased"]]
        if erased:
            print(f"[export] warning: re-quantizing the merged weights to NF4 would erase the LoRA update of "
                  f"{len(erased)} matrices (e.g. {erased[0]}); serve the merged weights in 16 bits (delta_report.md).")
    return {"layout": "full weights (from_pretrained)", "nf4_experts_rounded": quantization is not None,
            "erased_by_requantization": [row["matrix"] for row in report if row["erased"]]}


def round_experts(model, factors: dict[str, layouts.Factors], double_quant: bool) -> list[dict]:
    """Replace each fused expert weight by its NF4 round trip (what training multiplied by) and measure the LoRA
    update of each against the NF4 step: its RMS, the step (block absmax * 2/15, NF4's mean level spacing), and the
    share of it that survives re-quantizing the merged weights (1: all, 0: erased)."""
    report = []
    info = layouts.experts_info(model)
    with torch.no_grad():
        for owner, experts_info in info.items():
            experts = model.get_submodule(owner)
            for param in experts_info.params:
                weight = getattr(experts, param)
                logical = weight.transpose(1, 2) if experts_info.transposed else weight
                rounded = torch.stack([expert_quant.nf4_round_trip(m, double_quant) for m in logical])
                factor = factors.get(f"{owner}.{param}")
                if factor is not None:
                    report.append(delta_row(f"{owner}.{param}", rounded, factor.delta(), double_quant))
                weight.copy_(rounded.transpose(1, 2) if experts_info.transposed else rounded)
    return report


def delta_row(name: str, rounded: torch.Tensor, delta: torch.Tensor, double_quant: bool) -> dict:
    blocks = rounded.reshape(-1, expert_quant.BLOCKSIZE).abs().amax(1)
    step = float(blocks.median()) * 2 / 15
    merged = rounded + delta
    requantized = torch.stack([expert_quant.nf4_round_trip(m, double_quant) for m in merged])
    kept = float(((requantized - rounded) * delta).sum() / delta.pow(2).sum().clamp_min(1e-30))
    rms = float(delta.pow(2).mean().sqrt())
    return {"matrix": name, "delta_rms": rms, "delta_max": float(delta.abs().max()), "nf4_step": step,
            "rms_over_step": rms / step if step else float("inf"), "kept_after_requantization": kept,
            "erased": kept < 0.5}


def report_markdown(report: list[dict]) -> str:
    lines = ["# LoRA update against the NF4 step", "",
             "The experts were rounded through NF4 as in training before the merge, so the merged weights give the "
             "trained model. Re-quantizing them to NF4 keeps the share of each update shown; below 0.5 it is "
             "reported as erased: serve these weights in 16 bits, or the adapter on the NF4 base.", "",
             "| matrix | update RMS | NF4 step | RMS / step | kept after re-quantization | erased |",
             "|---|---|---|---|---|---|"]
    for row in report:
        lines.append(f"| {row['matrix']} | {row['delta_rms']:.3g} | {row['nf4_step']:.3g} | "
                     f"{row['rms_over_step']:.3g} | {row['kept_after_requantization']:.2f} | "
                     f"{'yes' if row['erased'] else 'no'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- README

def serving_commands(record: dict, out: str | Path) -> list[str]:
    base, fmt = record["base"], record["format"]
    if fmt == "merged":
        return [f"vllm serve {out}", f"python -m sglang.launch_server --model-path {out}"]
    if record.get("loads_with"):  # DBRX: no server takes its expert LoRA; merged through moetune's loader
        return [f"moetune merge {out} --out {out}-merged", f"vllm serve {out}-merged"]
    rank = record["rank"]
    if fmt == "sglang":
        return [f"python -m sglang.launch_server --model-path {base} --enable-lora --lora-paths moetune={out} "
                f"--max-lora-rank {rank}"]
    vllm_rank = next((r for r in VLLM_RANKS if r >= rank), rank)
    if record.get("vllm_mixed_format"):
        module = json.dumps({"name": "moetune", "path": str(out), "is_3d_lora_weight": True})
        return [f"vllm serve {base} --enable-lora --enable-mixed-moe-lora-format --lora-modules '{module}' "
                f"--max-lora-rank {vllm_rank}"]
    return [f"vllm serve {base} --enable-lora --lora-modules moetune={out} --max-lora-rank {vllm_rank}"]


def serving_section(record: dict, out: str | Path) -> str:
    commands = "\n".join(serving_commands(record, out))
    lines = ["## Serving", "", f"Exported as `{record['format']}`: {record['layout']}.", "", "```bash", commands, "```"]
    if record.get("loads_with"):
        lines += ["", f"This adapter applies through {record['loads_with']}."]
    if record["format"] == "vllm":
        lines += ["", "Requests name the adapter as the model: `\"model\": \"moetune\"`."]
    if record["format"] == "sglang":
        lines += ["", f"Requests name the adapter: `\"lora_path\": \"moetune\"` (/generate, or the OpenAI API's "
                      f"extra_body), or `\"model\": \"{record['base']}:moetune\"` on the OpenAI API."]
    if record["format"] == "vllm":
        lines += ["", f"Layout chosen from {VLLM_READ}."]
    if record["format"] == "sglang":
        lines += ["", f"Layout chosen from {SGLANG_READ}."]
    if record.get("server_warning"):
        lines += ["", f"**Warning:** {record['server_warning']}."]
    return "\n".join(lines) + "\n"


def export_for_hub(stage_dir: Path, out: Path, repo_id: str, base_id: str | None, fmt: str) -> str:
    """`moetune push --format`: the export written to `out`; its Serving section naming the Hub repositories."""
    export(stage_dir, fmt, out)
    record = json.loads((out / "export.json").read_text())
    return serving_section({**record, "base": base_id or record["base"]}, repo_id)


def readme(record: dict, out: Path) -> str:
    adapters_text = " -> ".join(record["adapters"])
    return "\n".join([f"# {record['model_type']} adapter exported by moetune ({record['format']})", "",
                      f"- Base model: {record['base']}", f"- Adapters (merged in order): {adapters_text}",
                      f"- PEFT versions that saved them: {', '.join(str(v) for v in record['peft_versions'])}", "",
                      serving_section(record, out)])
