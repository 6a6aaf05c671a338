"""Sharing a stage's result: merging an adapter into its base, the model card, and pushing to the Hugging Face Hub.

The Hub token is never handled here: huggingface_hub finds HF_TOKEN or the saved login itself, so it cannot
end up in a file, a log line or an error message of ours.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData, constants

from finetune import adapters
from finetune.models import load_adapter_base
from finetune.recipe import Recipe
from finetune.recipe_parsing import dump_recipe, load_recipe
from finetune.rundir import read_manifest

# What a stage folder shares: weights, configs, tokenizer, the resolved recipe. Not the run's bookkeeping
# (manifest, metrics, expert load, trainer state), which holds local paths and means nothing on the Hub.
UPLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "adapter_config.json", "config.json",
                   "generation_config.json", "tokenizer*", "special_tokens_map.json", "chat_template.*",
                   "*.model", "vocab.*", "merges.txt", "recipe.yaml")


# ---------------------------------------------------------------- merge

def merge(adapter_dir: str | Path, out: str | Path) -> Path:
    """Fold an adapter into its full-precision base and save plain weights + tokenizer into `out`."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} holds no adapter (no adapter_config.json); only adapters can be merged.")
    require_empty(out, "--out")
    base, tokenizer = load_adapter_base(adapter_dir)
    if getattr(base.config, "quantization_config", None) is not None:
        # Merging rounds the adapter into quantized weights and the result cannot be saved as plain weights.
        raise ValueError(f"the base of {adapter_dir} loads quantized; merge needs its full-precision weights. "
                         f"Point the adapter at an unquantized copy of the base model.")
    merged = adapters.merge_adapter(base, adapter_dir)
    merged.save_pretrained(out)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out)
    print(f"[merge] merged {adapter_dir} into its base; saved to {out}")
    return out


def require_empty(folder: Path, option: str) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{option} {folder} exists and is not empty; moetune will not overwrite it. Choose a new folder.")


# ---------------------------------------------------------------- model card

def model_card(recipe: Recipe, manifest: dict, run_dir: Path) -> str:
    """README.md for the Hub: metadata the Hub indexes, then what was trained, on what, how well, and how."""
    outputs, stage = manifest["outputs"], manifest["stage"]
    datasets = [source.dataset for source in recipe.data.sources if source.dataset]
    metadata = ModelCardData(
        library_name="peft" if outputs["kind"] == "adapter" else "transformers",
        base_model=recipe.model.name_or_path, tags=["moetune", "moe", stage, "trl"], datasets=datasets or None,
    )
    lines = ["---", metadata.to_yaml(), "---", "",
             f"# {stage.upper()} {outputs['kind']} trained with moetune", "",
             f"- Base model: {describe_base(recipe)}",
             f"- Training data: {', '.join(describe_source(s) for s in recipe.data.sources) or 'none listed'}",
             "", "## Training", "",
             f"- Stage: {stage} ({outputs['kind']}, on top of {outputs['parent']})",
             f"- Steps: {outputs.get('steps')}",
             f"- Loss: first {outputs.get('first_loss')}, last {outputs.get('last_loss')}"]
    scores = run_dir / "eval" / "scores.md"
    if scores.is_file():
        lines += ["", "## Evaluation", "", scores.read_text().strip()]
    lines += ["", "## Recipe", "", "```yaml", dump_recipe(recipe).strip(), "```", ""]
    return "\n".join(lines)


def describe_base(recipe: Recipe) -> str:
    if recipe.model.name_or_path:
        return recipe.model.name_or_path
    return f"a tiny {recipe.model.init.architecture} model built from a config (model.init)"


def describe_source(source) -> str:
    return f"{source.format} ({source.dataset or source.path or 'built in'})"


# ---------------------------------------------------------------- push

class HubError(ValueError):
    """An upload the Hub did not take; the message names the endpoint, the repository and what to check."""


def build_upload_folder(stage_dir: Path, folder: Path) -> Path:
    """Copy what a stage shares into `folder` and write its model card there."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise ValueError(f"{stage_dir} is not a finished moetune stage (no moetune_stage.json).")
    require_empty(folder, "--dry-run")
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(stage_dir.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in UPLOAD_PATTERNS):
            shutil.copy2(path, folder / path.name)
    recipe = load_recipe(stage_dir / "recipe.yaml")
    (folder / "README.md").write_text(model_card(recipe, manifest, stage_dir.parent))
    return folder


def push(stage_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: str | Path | None = None) -> None:
    """Upload a stage folder to `repo_id`, or with `dry_run` only write the folder that would be uploaded."""
    stage_dir = Path(stage_dir)
    if dry_run is not None:
        build_upload_folder(stage_dir, Path(dry_run))
        print(f"[push] dry run: wrote the upload for {repo_id} to {dry_run}; nothing was uploaded.")
        return
    if int(os.environ.get("RANK", "0")) != 0:
        return  # in a multi-process run every rank saves the same stage; only the main process uploads it

    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_upload_folder(stage_dir, Path(tmp) / "upload")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                              commit_message=f"moetune: upload {stage_dir.name}")
        except Exception as error:  # noqa: BLE001 - the HTTP client's errors (its module changes between releases)
            raise HubError(f"uploading {stage_dir} to {repo_id} at {constants.ENDPOINT} failed "
                           f"({type(error).__name__}: {error}). The stage is unchanged: fix the cause (network, "
                           f"HF_TOKEN or `hf auth login`, the repository name) and run the same command again.") from None
    print(f"[push] uploaded {stage_dir} to https://huggingface.co/{repo_id}")
