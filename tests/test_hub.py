"""merge and push on a tiny run: merged logits match the adapter's, the upload folder and card, no token leaks."""

import dataclasses
import shutil
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from finetune import hub, pipeline
from finetune.cli import main
from finetune.models import load_for_inference, load_stage_model
from finetune.recipe_parsing import load_recipe
from finetune.rundir import read_manifest
from helpers.recipes import write_recipe

pytestmark = pytest.mark.slow  # every test here uses the tiny run the module trains first

SCORES = "| model | overall |\n|---|---|\n| dpo | 7.5 |\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hub")
    recipe = write_recipe(tmp_path)
    assert main(["run", str(recipe), "--stages", "prep,sft,dpo", "sft.max_steps=2"]) == 0
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "scores.md").write_text(SCORES)
    return tmp_path / "run"


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
    sft = load_stage_model(recipe, "sft")
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
    model, _ = load_for_inference(other_run, str(moved / "dpo"))
    expected = load_stage_model(load_recipe(run / "dpo" / "recipe.yaml"), "dpo")
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
    assert main(["push", str(run / "dpo"), "--repo-id", "me/tiny-dpo", "--dry-run", str(folder)]) == 0
    names = {path.name for path in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "README.md"} <= names
    assert not names & {"moetune_stage.json", "metrics.json"}
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.tags == ["moetune", "moe", "dpo", "trl"]
    manifest = read_manifest(run / "dpo")["outputs"]
    assert f"first {manifest['first_loss']}, last {manifest['last_loss']}" in card.text
    assert "| dpo | 7.5 |" in card.text and "```yaml" in card.text
    captured = capsys.readouterr()
    for path in folder.iterdir():
        assert b"hf_secretTOKEN123" not in path.read_bytes()
    assert "hf_secretTOKEN123" not in captured.out + captured.err


def test_card_names_the_base_model_and_datasets(run):
    recipe = load_recipe(run / "dpo" / "recipe.yaml")
    source = dataclasses.replace(recipe.data.sources[0], dataset="org/pairs")
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path="org/base"),
                                 data=dataclasses.replace(recipe.data, sources=[source]))
    card = ModelCard(hub.model_card(recipe, read_manifest(run / "dpo"), run))
    assert card.data.base_model == "org/base" and card.data.datasets == ["org/pairs"]


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
    assert main(["push", str(run / "dpo"), "--repo-id", "me/tiny", "--private", "--revision", "v1"]) == 0
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
    only_dpo = load_recipe(run / "dpo" / "recipe.yaml", ["hub.push=true", "hub.repo_id=me/tiny", "hub.stages=[dpo]"])
    for stage in ("sft", "dpo"):
        pipeline.push_stage_if_configured(only_dpo, run / stage)
    pipeline.wait_for_uploads()
    assert [kwargs["repo_id"] for method, _, kwargs in fake_api if method == "upload_folder"] == ["me/tiny"]


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
