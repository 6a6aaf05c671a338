"""Sharing a stage's result: merging an adapter into its base, the model card, and pushing to the Hugging Face Hub.

The Hub token is never handled here: huggingface_hub finds HF_TOKEN or the saved login itself, so it cannot
end up in a file, a log line or an error message of ours.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData, constants

from finetune.modeling import adapters
from finetune.core import distributed
from finetune.modeling.loading import load_adapter_base
from finetune.config.recipe import Recipe
from finetune.config.parsing import dump_recipe, load_recipe
from finetune.config.validation import check_repo_id, invalid_repo_id
from finetune.core.rundir import read_manifest, require_empty

# What a stage folder shares: weights, configs, tokenizer, the resolved recipe. Not the run's bookkeeping
# (manifest, metrics, expert load, trainer state), which holds local paths and means nothing on the Hub.
UPLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "adapter_config.json", "config.json",
                   "generation_config.json", "tokenizer*", "special_tokens_map.json", "chat_template.*",
                   "*.model", "vocab.*", "merges.txt", "recipe.yaml", "delta_report.*")


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


# ---------------------------------------------------------------- model card

def model_card(recipe: Recipe, manifest: dict, run_dir: Path, base_id: str | None = None) -> str:
    """README.md for the Hub: metadata the Hub indexes, then what was trained, on what, how well, and how.

    `base_id` is the Hub id of the model the stage sits on (an adapter's base), when it has one.
    """
    outputs, stage = manifest["outputs"], manifest["stage"]
    datasets = [source.dataset for source in recipe.data.sources if source.dataset]
    metadata = ModelCardData(
        library_name="peft" if outputs["kind"] == "adapter" else "transformers", base_model=base_id,
        tags=["moetune", "moe", stage, "trl"] + (["lora"] if outputs["kind"] == "adapter" else []),
        datasets=datasets or None,
    )
    lines = ["---", metadata.to_yaml(), "---", "",
             f"# {stage.upper()} {outputs['kind']} trained with moetune", "",
             f"- Base model: {base_id or describe_base(recipe)}",
             f"- Training data: {', '.join(describe_source(s) for s in recipe.data.sources) or 'none listed'}",
             "", "## Training", "",
             f"- Stage: {stage} ({outputs['kind']}, on top of {base_id or outputs['parent']})",
             f"- Steps: {outputs.get('steps')}",
             f"- Loss: {describe_losses(outputs)}"]
    scores = run_dir / "eval" / "scores.md"
    if scores.is_file():
        lines += ["", "## Evaluation", "", nest_headings(scores.read_text().strip(), under=2)]
    lines += ["", "## Recipe", "", "```yaml", dump_recipe(recipe).strip(), "```", ""]
    return "\n".join(lines)


def describe_losses(outputs: dict) -> str:
    first, last, mean = outputs.get("first_loss"), outputs.get("last_loss"), outputs.get("mean_loss")
    if first is not None:
        return f"first {first:.4g}, last {last:.4g}"
    return f"mean {mean:.4g} (no step logged)" if mean is not None else "not logged"


def nest_headings(markdown: str, under: int) -> str:
    """Markdown headings moved below a heading of level `under` (`# Scores` under `## Evaluation` becomes `###`)."""
    lines = []
    for line in markdown.splitlines():
        level = len(line) - len(line.lstrip("#"))
        lines.append("#" * under + line if 0 < level and line[level:level + 1] == " " else line)
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




def is_hub_id(name: str) -> bool:
    """A model name that is a Hub repository id, not a local folder."""
    return not Path(name).exists() and invalid_repo_id(name) is None


def hub_parent(stage_dir: Path, recipe: Recipe, manifest: dict, parent_repo_id: str | None) -> tuple[str | None, str]:
    """(the Hub id of the model a stage sits on, or None; why not, for the refusal).

    The parent is another stage of the run (pushed in the same command or earlier: `parent_repo_id`), or the
    recipe's base model when that is a Hub id.
    """
    parent = manifest["outputs"]["parent"]
    if parent_repo_id:
        return parent_repo_id, ""
    if parent != "base":
        return None, f"the {parent} stage ({stage_dir.parent / parent}), which is not on the Hub"
    if recipe.model.init is not None:
        return None, (f"a tiny model built from model.init ({stage_dir.parent / 'base'}), which moetune does not "
                      f"upload")
    if not is_hub_id(recipe.model.name_or_path):
        return None, f"the local folder {recipe.model.name_or_path}, which is not on the Hub"
    return recipe.model.name_or_path, ""


def refuse_unreachable_base(stage_dir: Path, repo_id: str, parent: str, why: str) -> None:
    run_dir = stage_dir.parent
    if parent == "base":
        fix = (f"Upload the base model to the Hub and set model.name_or_path to its id, or merge the adapter "
               f"(`moetune merge {stage_dir} --out MERGED`) and upload the merged model.")
    else:
        chain = repo_id.replace(stage_dir.name, "{stage}") if stage_dir.name in repo_id else repo_id + "-{stage}"
        fix = (f"Push the chain together: `moetune push {run_dir / parent} {stage_dir} --repo-id {chain}`, "
               f"or push {parent} first and name it: `--parent-repo-id OWNER/NAME`.")
    raise ValueError(f"{stage_dir} is an adapter on top of {why}: nobody could load it from {repo_id}. {fix}")


def build_upload_folder(stage_dir: Path, folder: Path, repo_id: str, parent_repo_id: str | None = None,
                        exporter=None) -> Path:
    """Copy what a stage shares into `folder`, its adapter pointing at its base's Hub id, and write its model card.

    `exporter(stage_dir, out, repo_id, base_id) -> serving section`: upload the stage as that servable export
    (`moetune push --format`) instead; an exported adapter sits on the run's base model (a chain is one adapter)."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise ValueError(f"{stage_dir} is not a finished moetune stage (no moetune_stage.json).")
    recipe = load_recipe(stage_dir / "recipe.yaml")
    sits_on = manifest if exporter is None else {**manifest, "outputs": {**manifest["outputs"], "parent": "base"}}
    base_id, why = hub_parent(stage_dir, recipe, sits_on, parent_repo_id if exporter is None else None)
    is_adapter = manifest["outputs"]["kind"] == "adapter"
    require_empty(folder, "--dry-run")
    serving = ""
    if exporter is None:
        copy_shared(stage_dir, stage_dir, folder, is_adapter and base_id is None and why, repo_id, sits_on)
    else:
        source = folder.with_name(folder.name + ".export")
        shutil.rmtree(source, ignore_errors=True)
        try:
            serving = exporter(stage_dir, source, repo_id, base_id)
            is_adapter = (source / "adapter_config.json").is_file()
            copy_shared(source, stage_dir, folder, is_adapter and base_id is None and why, repo_id, sits_on)
        finally:
            shutil.rmtree(source, ignore_errors=True)
    if is_adapter:
        point_adapter_at(folder / "adapter_config.json", base_id,
                         recipe.model.revision if base_id == recipe.model.name_or_path else None)
    if base_id is None and recipe.model.name_or_path and is_hub_id(recipe.model.name_or_path):
        base_id = recipe.model.name_or_path  # full weights stand alone; the card still says where they came from
    if not is_adapter:  # a merged export is full weights, whatever the stage holds
        manifest = {**manifest, "outputs": {**manifest["outputs"], "kind": "full"}}
    card = model_card(recipe, manifest, stage_dir.parent, base_id)
    (folder / "README.md").write_text(card + (f"\n{serving}" if serving else ""))
    return folder


def copy_shared(source: Path, stage_dir: Path, folder: Path, unreachable: str | bool, repo_id: str,
                manifest: dict) -> None:
    """Copy the files of `source` (the stage, or its export) that a Hub repository shares, and the stage's recipe;
    refuse first an adapter whose base is not on the Hub (`unreachable`: why)."""
    if unreachable:
        refuse_unreachable_base(stage_dir, repo_id, manifest["outputs"]["parent"], unreachable)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted({*source.iterdir(), stage_dir / "recipe.yaml"}):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in UPLOAD_PATTERNS):
            shutil.copy2(path, folder / path.name)


def point_adapter_at(config_file: Path, base_id: str, revision: str | None) -> None:
    """The uploaded adapter names its base by Hub id (the local one names a folder of this machine)."""
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_id
    config["revision"] = revision
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def chain_order(stage_dirs: list[Path]) -> list[Path]:
    """Parents first, so that a chain pushed together uploads each parent before its child: a stage folder comes
    after the folders its manifest's parent chain passes through (base -> sft -> dpo, read from the run folder)."""
    return sorted(stage_dirs, key=chain_depth)


def chain_depth(stage_dir: Path) -> int:
    """How many stage folders of its run lie below this one (0 for a folder on the base model or without one)."""
    parent = (read_manifest(stage_dir) or {}).get("outputs", {}).get("parent")
    return 0 if parent is None else 1 + chain_depth(stage_dir.parent / parent)


def push(stage_dirs, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: str | Path | None = None, parent_repo_id: str | None = None, exporter=None) -> None:
    """Upload stage folders, each to `repo_id` ({stage} becomes its name), parents first, each adapter pointing at
    its parent's Hub id. With `dry_run`, only write what would be uploaded (one subfolder per stage for several)."""
    stage_dirs = chain_order([Path(d) for d in ([stage_dirs] if isinstance(stage_dirs, (str, Path)) else stage_dirs)])
    if len(stage_dirs) > 1 and "{stage}" not in repo_id:
        raise ValueError(f"--repo-id {repo_id} for {len(stage_dirs)} stages: put {{stage}} in it (e.g. "
                         f"{repo_id}-{{stage}}) so that each stage gets its own repository.")
    repos = {d: check_repo_id(repo_id.replace("{stage}", d.name), "--repo-id") for d in stage_dirs}
    if parent_repo_id:
        check_repo_id(parent_repo_id, "--parent-repo-id")
    if dry_run is None and not distributed.is_main_process():
        return  # in a multi-process run every rank saves the same stage; only the main process uploads it
    pushed: dict[str, str] = {}
    for stage_dir in stage_dirs:
        parent = (read_manifest(stage_dir) or {}).get("outputs", {}).get("parent")
        # --parent-repo-id names the parent of the first stage pushed; later ones sit on stages pushed here.
        parent_id = pushed.get(parent) or (parent_repo_id if stage_dir == stage_dirs[0] else None)
        if dry_run is not None:
            folder = Path(dry_run) / stage_dir.name if len(stage_dirs) > 1 else Path(dry_run)
            build_upload_folder(stage_dir, folder, repos[stage_dir], parent_id, exporter)
            print(f"[push] dry run: wrote the upload for {repos[stage_dir]} to {folder}; nothing was uploaded.")
        else:
            upload(stage_dir, repos[stage_dir], private, revision, parent_id, exporter)
        pushed[stage_dir.name] = repos[stage_dir]


def upload(stage_dir: Path, repo_id: str, private: bool, revision: str | None, parent_repo_id: str | None,
           exporter=None) -> None:

    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_upload_folder(stage_dir, Path(tmp) / "upload", repo_id, parent_repo_id, exporter)
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
