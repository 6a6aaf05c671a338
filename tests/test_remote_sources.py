"""Recipes that run anywhere: files named by URL are fetched once and cached, hub datasets stream, and the shipped
Mixtral recipe names nothing outside the repository. A loopback HTTP server stands in for the web and a local
dataset folder for the Hub."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from eval.judge_prompts import load_judge_prompts
from finetune.stages.evaluate import question_source, recipe_file
from finetune.core import remote_files
from finetune.cli import main
from finetune.config.parsing import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MIXTRAL = REPO / "recipes" / "hh-rlhf-mixtral.yaml"


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data {path} is absent (expected the shared data folder at ../shared/data)")
    return path


@pytest.fixture
def web(monkeypatch, tmp_path):
    """FastChat's MT-Bench files served on 127.0.0.1; yields (base URL, list of requested paths)."""
    shared("mt_bench/question.jsonl")
    monkeypatch.setenv("MOETUNE_CACHE", str(tmp_path / "cache"))
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(SHARED_DATA / "mt_bench")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()


def test_a_url_is_downloaded_once_then_read_from_the_cache(web, tmp_path):
    base, requests = web
    url = f"{base}/question.jsonl"
    first = remote_files.recipe_file(url, tmp_path)
    assert first.read_bytes() == shared("mt_bench/question.jsonl").read_bytes()
    assert remote_files.recipe_file(url, tmp_path) == first and len(requests) == 1
    assert remote_files.recipe_file("q.jsonl", tmp_path) == (tmp_path / "q.jsonl").resolve()  # paths stay paths


def test_a_missing_url_names_itself_and_leaves_nothing_behind(web):
    base, _ = web
    with pytest.raises(ValueError, match=rf"{base}/nope.jsonl: could not download it \(HTTP Error 404"):
        remote_files.fetch(f"{base}/nope.jsonl")
    assert list(remote_files.cache_dir().iterdir()) == []


def test_eval_reads_questions_judge_prompts_and_references_from_urls(web):
    base, _ = web
    recipe = load_recipe(MIXTRAL, [f"eval.question_file={base}/question.jsonl",
                                   f"eval.judge.prompt_file={base}/judge_prompts.jsonl",
                                   f"eval.judge.reference_answer_file={base}/reference_answer/gpt-4.jsonl"])
    questions = [json.loads(line) for line in Path(question_source(recipe)).read_text().splitlines()]
    assert len(questions) == 80
    prompts = load_judge_prompts(recipe_file(recipe, recipe.eval.judge.prompt_file))
    assert "single-v1" in prompts
    references = recipe_file(recipe, recipe.eval.judge.reference_answer_file)
    assert references.read_bytes() == shared("mt_bench/reference_answer/gpt-4.jsonl").read_bytes()


def test_prep_streams_a_hub_dataset_folder_and_decontaminates_against_a_url(web, tmp_path, monkeypatch):
    """The Mixtral recipe's prep with its hub source pointed at a local stand-in of Anthropic/hh-rlhf (a folder per
    subset, as on the Hub) and its MT-Bench questions served over HTTP."""
    from huggingface_hub import constants

    base, requests = web
    # No Hub here (as on CI): prep's look at Mixtral's tokenizer gives up at once instead of retrying for ~45 s.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_copy = tmp_path / "hh-rlhf" / "helpful-base"
    hub_copy.mkdir(parents=True)
    shutil.copy(shared("hh_rlhf/helpful_base_test.jsonl"), hub_copy / "train.jsonl")
    source = (f"{{format: hh_rlhf, dataset: {tmp_path / 'hh-rlhf'}, data_dir: helpful-base, split: train, "
              f"max_rows: 60, sft_from_chosen: true}}")
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.sources=[{source}]", "data.max_length=null",
                 "data.on_error=skip", f"data.decontamination.question_files=[{base}/question.jsonl]"]
    assert main(["prep", str(MIXTRAL), *overrides]) == 0
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    pairs = sum(1 for _ in open(tmp_path / "run" / "data" / "preference" / "train.jsonl"))
    assert 0 < pairs <= 60 and requests == ["/question.jsonl"]
    assert report["sources"][0]["name"].endswith(str(tmp_path / "hh-rlhf"))


def test_the_shipped_mixtral_recipe_names_nothing_outside_the_repository():
    text = MIXTRAL.read_text()
    assert "../" not in text and "shared/data" not in text
    recipe = load_recipe(MIXTRAL)
    for source in recipe.data.sources:
        assert source.path is None and source.dataset == "Anthropic/hh-rlhf"
    judge = recipe.eval.judge
    for name in (*recipe.data.decontamination.question_files, recipe.eval.question_file, judge.prompt_file,
                 judge.reference_answer_file):
        assert remote_files.is_url(name)
