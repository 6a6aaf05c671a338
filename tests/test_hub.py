"""merge and push on a tiny run: merged logits match the adapter's, the upload folder and card, no token leaks."""

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from finetune.stages import hub
from finetune import pipeline
from finetune.cli import main
from finetune.modeling.loading import load_for_inference, load_stage_model
from finetune.config.parsing import load_recipe
from finetune.core.rundir import read_manifest

pytestmark = pytest.mark.slow  # every test here reads the session's finished tiny run (tests/conftest.py)


@pytest.fixture(scope="module")
def run(tiny_run):
    """The finished tiny run (base, sft with full weights, dpo an adapter on it, eval): only read here."""
    return tiny_run[1]


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_merge_reproduces_the_adapter_model(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(run / "dpo"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(out.glob("adapter_*"))
    recipe = load_recipe(run / "dpo" / "recipe.yaml")
    sft = load_stage_model(recipe.model_source, "sft")
    ids = torch.arange(3, 19).reshape(2, 8)
    sft_logits = logits(sft, ids)
    adapter_logits = logits(PeftModel.from_pretrained(sft, str(run / "dpo")), ids)
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(out), ids)
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, sft_logits, atol=1e-5)  # the adapter did change the model


def test_evaluating_a_stage_of_a_moved_run_loads_its_whole_chain(run, tmp_path):
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    other_run = load_recipe(run / "dpo" / "recipe.yaml", [f"run_dir={tmp_path / 'other'}"])
    model, _ = load_for_inference(other_run.model_source, str(moved / "dpo"), of_this_run=False)
    expected = load_stage_model(load_recipe(run / "dpo" / "recipe.yaml").model_source, "dpo")
    ids = torch.arange(3, 19).reshape(2, 8)
    assert torch.allclose(logits(model, ids), logits(expected, ids), atol=1e-5)


def test_merge_refuses_non_empty_out_and_folders_without_adapter(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["merge", str(run / "dpo"), "--out", str(taken)]) == 2
    assert f"--out {taken} exists and is not empty" in capsys.readouterr().err
    assert main(["merge", str(run / "sft"), "--out", str(tmp_path / "new")]) == 2
    assert f"{run / 'sft'} holds no adapter" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_dry_run_writes_the_upload_with_a_model_card(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    folder = tmp_path / "upload"
    assert main(["push", str(run / "dpo"), "--repo-id", "me/tiny-dpo", "--parent-repo-id", "me/tiny-sft",
                 "--dry-run", str(folder)]) == 0
    names = {path.name for path in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "README.md"} <= names
    assert not names & {"moetune_stage.json", "metrics.json"}
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.tags == ["moetune", "moe", "dpo", "trl", "lora"]
    assert card.data.base_model == "me/tiny-sft"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny-sft"
    manifest = read_manifest(run / "dpo")["outputs"]
    assert f"first {manifest['first_loss']:.4g}, last {manifest['last_loss']:.4g}" in card.text
    scores = (run / "eval" / "scores.md").read_text().splitlines()
    overall = next(line for line in scores if line.startswith("| overall |"))
    assert overall in card.text and "```yaml" in card.text  # the run's eval table, each model's overall score
    captured = capsys.readouterr()
    for path in folder.iterdir():
        assert b"hf_secretTOKEN123" not in path.read_bytes()
    assert "hf_secretTOKEN123" not in captured.out + captured.err


def test_card_names_the_base_model_and_datasets(run):
    recipe = load_recipe(run / "dpo" / "recipe.yaml")
    source = dataclasses.replace(recipe.data.sources[0], dataset="org/pairs")
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path="org/base", init=None),
                                 data=dataclasses.replace(recipe.data, sources=[source]))
    on_base = {"stage": "sft", "outputs": {"kind": "adapter", "parent": "base"}}
    base_id, _ = hub.hub_parent(run / "sft", recipe, on_base, None)
    card = ModelCard(hub.model_card(recipe, on_base, run, base_id))
    assert card.data.base_model == "org/base" and card.data.datasets == ["org/pairs"]
    local = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=str(run / "base")))
    assert hub.hub_parent(run / "sft", local, on_base, None) == (None, f"the local folder {run / 'base'}, which is "
                                                                        f"not on the Hub")
    assert "### MT-Bench" in card.text and "\n# MT" not in card.text  # scores.md's H1 nests under ## Evaluation


@pytest.fixture
def fake_api(monkeypatch):
    calls = []
    for method in ("create_repo", "create_branch", "upload_folder"):
        def record(self, *args, _method=method, **kwargs):
            if _method == "upload_folder":
                kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            calls.append((_method, args, kwargs))
        monkeypatch.setattr(f"huggingface_hub.HfApi.{method}", record)
    return calls


def test_push_uploads_with_repo_private_and_revision(run, fake_api, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["push", str(run / "dpo"), "--repo-id", "me/tiny", "--private", "--revision", "v1",
                 "--parent-repo-id", "me/tiny-sft"]) == 0
    assert fake_api[0] == ("create_repo", ("me/tiny",), {"private": True, "exist_ok": True})
    assert fake_api[1] == ("create_branch", ("me/tiny",), {"branch": "v1", "exist_ok": True})
    upload = fake_api[2][2]
    assert upload["repo_id"] == "me/tiny" and upload["revision"] == "v1"
    assert "README.md" in upload["files"] and "adapter_model.safetensors" in upload["files"]


def test_only_the_main_process_pushes(run, fake_api, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["push", str(run / "dpo"), "--repo-id", "me/tiny"]) == 0
    assert fake_api == []


def test_configured_push_failure_keeps_the_stage_and_says_how_to_retry(run, monkeypatch, capsys):
    def broken(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", broken)
    recipe = load_recipe(run / "dpo" / "recipe.yaml", ["hub.push=true", "hub.repo_id=me/tiny-{stage}"])
    pipeline.push_stage_if_configured(recipe, run / "dpo")
    pipeline.wait_for_uploads()
    err = capsys.readouterr().err
    assert "no network" in err and f"moetune push {run / 'dpo'} --repo-id me/tiny-dpo --private" in err
    assert (run / "dpo" / "adapter_model.safetensors").is_file()


def test_configured_push_sends_each_listed_stage_to_its_own_repository(run, fake_api, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    recipe = load_recipe(run / "dpo" / "recipe.yaml", ["hub.push=true", "hub.repo_id=me/tiny-{stage}"])
    for stage in ("sft", "dpo"):
        pipeline.push_stage_if_configured(recipe, run / stage)
    pipeline.wait_for_uploads()
    assert [kwargs["repo_id"] for method, _, kwargs in fake_api if method == "upload_folder"] == ["me/tiny-sft", "me/tiny-dpo"]

    fake_api.clear()
    only_sft = load_recipe(run / "dpo" / "recipe.yaml", ["hub.push=true", "hub.repo_id=me/tiny", "hub.stages=[sft]"])
    for stage in ("sft", "dpo"):
        pipeline.push_stage_if_configured(only_sft, run / stage)
    pipeline.wait_for_uploads()
    assert [kwargs["repo_id"] for method, _, kwargs in fake_api if method == "upload_folder"] == ["me/tiny"]


def test_an_adapter_whose_base_is_not_on_the_hub_is_refused_with_what_to_push_first(run, fake_api, monkeypatch,
                                                                                       capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["push", str(run / "dpo"), "--repo-id", "me/tiny-dpo"]) == 2
    err = capsys.readouterr().err
    assert f"moetune push {run / 'sft'} {run / 'dpo'} --repo-id me/tiny-{{stage}}" in err and "--parent-repo-id" in err
    only_dpo = load_recipe(run / "dpo" / "recipe.yaml", ["hub.push=true", "hub.repo_id=me/tiny", "hub.stages=[dpo]"])
    pipeline.push_stage_if_configured(only_dpo, run / "dpo")
    pipeline.wait_for_uploads()
    assert fake_api == [] and "not on the Hub" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--repo-id", "bad repo id!!"], ["--repo-id", "me/ok", "--parent-repo-id", "a/b/c"],
                                  ["--repo-id", "me/no-template"]])
def test_repo_ids_are_checked_by_huggingface_hub_also_in_dry_runs(run, tmp_path, argv, capsys):
    stages = [str(run / "sft"), str(run / "dpo")] if "me/no-template" in argv else [str(run / "dpo")]
    assert main(["push", *stages, *argv, "--dry-run", str(tmp_path / "up")]) == 2
    assert "moetune: error: --" in capsys.readouterr().err
    assert not (tmp_path / "up").exists()


def place_in_hub_cache(folder: Path, repo_id: str, cache: Path) -> None:
    """What `snapshot_download(repo_id)` leaves in the HF cache, so that the Hub id resolves offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


LOAD_FROM_HUB = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM
ids = torch.arange(3, 19).reshape(2, 8)
sft = AutoModelForCausalLM.from_pretrained("me/tiny-sft").eval()
dpo = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("me/tiny-sft"), "me/tiny-dpo").eval()
auto = AutoPeftModelForCausalLM.from_pretrained("me/tiny-dpo").eval()  # finds its base from adapter_config.json
with torch.no_grad():
    torch.save({"sft": sft(ids).logits, "dpo": dpo(ids).logits, "auto": auto(ids).logits}, sys.argv[1])
"""


def test_a_chain_pushed_together_loads_from_its_hub_ids_with_the_local_logits(run, tmp_path):
    """The dry-run upload of SFT then DPO, placed in an offline HF cache under its repo ids, loads with
    transformers/peft from those ids alone and gives the logits of the local stages."""
    import os
    import subprocess
    import sys

    upload = tmp_path / "upload"
    assert main(["push", str(run / "dpo"), str(run / "sft"), "--repo-id", "me/tiny-{stage}",
                 "--dry-run", str(upload)]) == 0
    cache = tmp_path / "hf-cache"
    for stage in ("sft", "dpo"):
        place_in_hub_cache(upload / stage, f"me/tiny-{stage}", cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, str(out)], env=env, cwd=tmp_path, check=True, timeout=300)
    from_hub = torch.load(out)
    recipe = load_recipe(run / "dpo" / "recipe.yaml")
    ids = torch.arange(3, 19).reshape(2, 8)
    assert torch.equal(from_hub["sft"], logits(load_stage_model(recipe.model_source, "sft"), ids))
    from peft import PeftModel

    local_dpo = logits(PeftModel.from_pretrained(load_stage_model(recipe.model_source, "sft"), str(run / "dpo")), ids)
    assert torch.equal(from_hub["dpo"], local_dpo) and torch.equal(from_hub["auto"], local_dpo)
    assert not torch.allclose(from_hub["dpo"], from_hub["sft"], atol=1e-4)  # the adapter is applied


def test_configured_push_uploads_beside_the_next_stages_and_the_command_waits_for_it(run, fake_api, monkeypatch):
    """A stage's upload does not hold up what follows (in a multi-process run the other processes would wait for it
    at their next collective and could time out); the moetune command returns only once the upload is done."""
    monkeypatch.delenv("RANK", raising=False)
    release = threading.Event()
    record_upload = huggingface_hub.HfApi.upload_folder  # fake_api's recorder

    def slow_upload(self, *args, **kwargs):
        assert release.wait(timeout=60)
        record_upload(self, *args, **kwargs)

    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", slow_upload)
    recipe = load_recipe(run / "dpo" / "recipe.yaml", ["hub.push=true", "hub.repo_id=me/tiny-{stage}"])
    pipeline.push_stage_if_configured(recipe, run / "sft")

    def uploads():
        return [kwargs["repo_id"] for method, _, kwargs in fake_api if method == "upload_folder"]

    assert uploads() == []  # returned while the upload is under way
    threading.Timer(0.5, release.set).start()
    assert main(["prep", str(run.parent / "tiny.yaml")]) == 0  # the next command's stage (complete: skipped)
    assert uploads() == ["me/tiny-sft"]
