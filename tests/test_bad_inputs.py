"""Bad inputs and interruptions a user can cause, through the real CLI: one case per row of issue 13.

Each case asserts the exit code (2), what the message names, that no traceback is printed, what the run dir holds
afterwards (nothing half-written committed), and that the corrected command then succeeds without --force.
Recipes are tiny and stop at the failing stage; the judge, where one is needed, is a server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from finetune.core import synthetic_task
from finetune.cli import main
from finetune.stages.base_model import write_base_model
from finetune.config.parsing import load_recipe
from finetune.core.rundir import Stage
from helpers.processes import output_lines
from helpers.recipes import logged, merged
from helpers.shared_data import mt_bench_file

ROOT = Path(__file__).resolve().parents[1]
INIT = {"hidden_size": 64, "intermediate_size": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
        "num_experts": 4, "experts_per_token": 2, "vocab_size": 120}
ROWS = [{"messages": [{"role": "user", "content": f"add {i} and {i}"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_recipe(folder: Path, **changes) -> Path:
    """A tiny recipe in `folder` (data from folder/data.jsonl); keyword arguments replace keys section by section."""
    recipe = {"run_dir": str(folder / "run"), "seed": 3, "model": {"init": INIT},
              "data": {"sources": [{"format": "sft", "path": "data.jsonl"}], "test_size": 0},
              "sft": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 64, "logging_steps": 1}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(merged(recipe, changes)))
    return path


def moetune(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in this process; (exit code, stdout + stderr). An uncaught exception fails the test."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def run_dir_state(folder: Path) -> set[str]:
    """The run dir's stage folders and work folders (the run report, rebuilt after each stage, is no state)."""
    run = folder / "run"
    return {path.name for path in run.iterdir() if path.name not in ("report", "report.md")} if run.is_dir() else set()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data.jsonl").write_text(jsonl(ROWS))
    return tmp_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real model folder (config, weights, tokenizer with a chat template), as save_pretrained writes one."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "data.jsonl").write_text(jsonl(ROWS))
    recipe = write_recipe(folder)
    assert main(["prep", str(recipe)]) == 0
    write_base_model(load_recipe(recipe), folder / "model")
    return folder / "model"


# ---------------------------------------------------------------- prep: data files

@pytest.mark.parametrize("fix", ["fix the line", "on_error skip"])
def test_malformed_row_then_the_fix_reruns_without_force(folder, capsys, fix):
    data = folder / "data.jsonl"
    data.write_text(jsonl(ROWS[:1]) + '{"messages": [{"role": "user"\n' + jsonl(ROWS[1:]))
    recipe = write_recipe(folder)
    code, output = moetune(capsys, "prep", recipe)
    assert code == 2 and f"{data}:2: not valid JSON" in output and "data.on_error: skip" in output
    assert run_dir_state(folder) == {".data.partial"}  # nothing committed
    if fix == "fix the line":
        data.write_text(jsonl(ROWS))
    else:
        recipe = write_recipe(folder, data={"on_error": "skip"})
    code, output = moetune(capsys, "prep", recipe)
    assert code == 0 and "discarding" in output
    assert run_dir_state(folder) == {"data"}


def test_empty_data_file_fails_at_prep(folder, capsys):
    (folder / "data.jsonl").write_text("")
    recipe = write_recipe(folder)
    code, output = moetune(capsys, "prep", recipe)
    assert code == 2 and "sft: data.jsonl: no rows" in output and "data.sources[0]" in output
    assert "data" not in run_dir_state(folder)
    (folder / "data.jsonl").write_text(jsonl(ROWS))
    assert moetune(capsys, "prep", recipe)[0] == 0 and "data" in run_dir_state(folder)


def test_no_training_examples_fails_at_prep(folder, capsys):
    (folder / "data.jsonl").write_text('{"messages": []}\n')
    recipe = write_recipe(folder, data={"on_error": "skip"})
    code, output = moetune(capsys, "prep", recipe)
    assert code == 2 and "gave no training examples" in output and "data" not in run_dir_state(folder)


def test_a_whole_file_on_one_line_is_a_malformed_row(folder, capsys):
    huge = {"messages": [{"role": "user", "content": "x" * (3 << 20)}, {"role": "assistant", "content": "y"}]}
    (folder / "data.jsonl").write_text(jsonl(ROWS[:2] + [huge] + ROWS[2:]))
    recipe = write_recipe(folder)
    code, output = moetune(capsys, "prep", recipe)
    assert code == 2 and f"{folder / 'data.jsonl'}:3: a 3.1 MB line, over the 2 MiB a row may hold" in output
    assert "data" not in run_dir_state(folder)
    code, output = moetune(capsys, "prep", recipe, "data.on_error=skip")
    assert code == 0 and "dropped 1 malformed" in output


def test_ctrl_c_during_prep_then_the_same_command(folder, capsys, monkeypatch):
    import finetune.stages.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    recipe = write_recipe(folder)
    with monkeypatch.context() as patch:
        patch.setattr(finetune.stages.prepare, "prepare", interrupted)
        code, output = moetune(capsys, "prep", recipe)
    assert code == 130 and "interrupted. Run the same command again" in output and "data" not in run_dir_state(folder)
    assert moetune(capsys, "prep", recipe)[0] == 0 and "data" in run_dir_state(folder)


# ---------------------------------------------------------------- recipe values a library would reject later

@pytest.mark.parametrize("override, message", [
    ("model.lora={r: -4}", "model.lora.r is -4; it must be a positive integer"),
    ("model.lora={alpha: 0}", "model.lora.alpha is 0; it must be a positive integer"),
    ("model.lora={dropout: 1.5}", "model.lora.dropout is 1.5; it must be in [0, 1)"),
    ("model.init.num_heads=3", "model.init.hidden_size (64) must be a multiple of num_heads (3)"),
    ("model.quantization={bits: 3}", "model.quantization.bits is 3; choose 4 or 8"),
    ("data.max_length=64", "data.max_length filters rows by the model's token count, but a model.init recipe"),
    ("data.dedup=prompts", "data.dedup is 'prompts'; choose one of exact, prompt, none. Did you mean 'prompt'?"),
    ("eval.judge.type=opnai", "eval.judge.type is 'opnai'; choose one of programmatic, openai, local."),
    ("sft.push_to_hub=true", "sft.push_to_hub is TRL's, but moetune does that itself: remove it and use the "
                             "recipe's hub: section"),
    ("dpo.resume_from_checkpoint=true", "moetune does that itself: remove it and use re-running the same command"),
    ("sft.output_dir=elsewhere", "sft.output_dir is TRL's, but moetune does that itself: remove it and use run_dir"),
    ("sft.hub_token=hf_" + "Planted0Secret1Value2For3Tests4", "sft.hub_token would hold a credential"),
])
def test_values_a_library_would_reject_fail_before_any_stage(folder, capsys, override, message):
    recipe = write_recipe(folder)
    code, output = moetune(capsys, "run", recipe, override)
    assert code == 2 and message in output and str(recipe) in output
    assert run_dir_state(folder) == set()  # no stage ran
    assert moetune(capsys, "prep", recipe)[0] == 0  # the recipe without the override works


# ---------------------------------------------------------------- one writer per run folder

@pytest.mark.slow  # two processes start the training stack together: ~30 s on a quiet 2-core machine
def test_two_runs_on_one_run_dir_one_runs_the_other_refuses_at_once(folder, capsys):
    recipe = write_recipe(folder, sft={"max_steps": 6})
    command = [sys.executable, "-m", "finetune", "run", str(recipe), "--stages", "prep,sft"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    deadline = time.monotonic() + 240
    while all(process.poll() is None for process in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    loser = next(process for process in processes if process.poll() is not None)
    winner = next(process for process in processes if process is not loser)
    assert winner.poll() is None  # refused while the other one works, not after it
    loser_err = loser.communicate(timeout=60)[1]
    winner_out, winner_err = winner.communicate(timeout=240)
    assert loser.returncode == 2 and winner.returncode == 0, winner_err[-2000:]
    assert f"{folder / 'run'} is in use by PID {winner.pid} (`moetune run {recipe}" in loser_err
    assert "Traceback" not in loser_err + winner_err and run_dir_state(folder) == {"data", "base", "sft"}
    # The finished run equals a lone run of the same recipe.
    lone = folder / "lone"
    lone.mkdir()
    (lone / "data.jsonl").write_text(jsonl(ROWS))
    assert moetune(capsys, "run", write_recipe(lone, sft={"max_steps": 6}), "--stages", "prep,sft")[0] == 0
    for name in ("data/sft/train.jsonl", "sft/model.safetensors"):
        assert (folder / "run" / name).read_bytes() == (lone / "run" / name).read_bytes(), name
    assert logged(folder / "run" / "sft") == logged(lone / "run" / "sft") != []


def test_the_lock_dies_with_its_process_and_reading_needs_none(folder, capsys):
    recipe = write_recipe(folder)
    assert moetune(capsys, "prep", recipe)[0] == 0
    hold = ("import sys, time; from pathlib import Path; from finetune.core.run_lock import run_dir_lock\n"
            "with run_dir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder / "run")], env={**os.environ,
                              "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert next(output_lines(holder, seconds=120)) == "held\n"
        code, output = moetune(capsys, "sft", recipe)
        assert code == 2 and f"is in use by PID {holder.pid}" in output and "sft" not in run_dir_state(folder)
        assert moetune(capsys, "report", folder / "run")[0] == 0  # reading a run takes no lock
    finally:
        holder.kill()  # as kill -9 would: no clean-up runs, the kernel drops the lock
        holder.wait(timeout=30)
    assert moetune(capsys, "sft", recipe)[0] == 0 and "sft" in run_dir_state(folder)


def test_run_dir_under_a_regular_file(folder, capsys):
    (folder / "afile").write_text("not a folder")
    recipe = write_recipe(folder, run_dir=str(folder / "afile" / "run"))
    code, output = moetune(capsys, "prep", recipe)
    assert code == 2 and f"run_dir {folder / 'afile' / 'run'} cannot be a folder: {folder / 'afile'} is a file" in output
    assert (folder / "afile").read_text() == "not a folder"
    assert moetune(capsys, "prep", write_recipe(folder))[0] == 0


# ---------------------------------------------------------------- the base model's location

@pytest.mark.parametrize("location, message", [
    ("/nonexistent/models/mixtral", "/nonexistent/models/mixtral does not exist"),
    ("./models/mixtral", "models/mixtral does not exist (relative paths start at the folder moetune runs in"),
    ("models/tiny/mixtral", "models/tiny/mixtral does not exist"),
    ("org/no-such-model", "the Hub at http://127.0.0.1:"),
])
def test_model_path_that_does_not_exist_fails_in_seconds(folder, capsys, monkeypatch, model_dir, location, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # the network is down
    recipe = write_recipe(folder, model={"init": None, "name_or_path": location})
    started = time.monotonic()
    code, output = moetune(capsys, "run", recipe, "--stages", "prep,sft")
    assert code == 2 and "model.name_or_path" in output and message in output
    assert time.monotonic() - started < 10
    assert run_dir_state(folder) == set()
    code, output = moetune(capsys, "run", recipe, "--stages", "prep,sft", f"model.name_or_path={model_dir}")
    assert code == 0 and {"data", "sft"} <= run_dir_state(folder)


def test_hub_id_offline_and_not_cached(folder, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = write_recipe(folder, model={"init": None, "name_or_path": "org/no-such-model"})
    code, output = moetune(capsys, "sft", recipe)
    assert code == 2 and "HF_HUB_OFFLINE is set" in output and "org/no-such-model" in output


# ---------------------------------------------------------------- training interrupted and re-run differently

def test_changed_recipe_on_an_interrupted_training_names_the_keys_and_offers_force(folder, capsys, model_dir):
    recipe = write_recipe(folder, model={"init": None, "name_or_path": str(model_dir)})
    assert moetune(capsys, "run", recipe, "--stages", "prep,sft", "sft.learning_rate=0.5")[0] == 0
    # What an interruption at step 1 leaves: the work folder with its inputs and a checkpoint.
    run = folder / "run"
    manifest = json.loads((run / "sft" / "moetune_stage.json").read_text())
    work = run / ".sft.partial"
    (run / "sft").rename(work)
    (work / "moetune_stage.json").unlink()
    (work / "moetune_work_inputs.json").write_text(json.dumps({k: manifest[k] for k in ("fingerprint", "inputs")}))
    (work / "checkpoint-1").mkdir()
    code, output = moetune(capsys, "sft", recipe)
    assert code == 2 and "(changed: sft.learning_rate) that saved checkpoint-1" in output and "--force" in output
    assert (work / "checkpoint-1").is_dir()
    # A checkpoint schedule or log interval is not an input: changing it never blocks a resume.
    code, output = moetune(capsys, "sft", recipe, "sft.learning_rate=0.5", "sft.save_strategy=steps",
                           "sft.save_steps=1", "sft.logging_steps=2")
    assert code == 0 and run_dir_state(folder) == {"data", "sft"}


# ---------------------------------------------------------------- eval: questions, judges, interruptions

def write_questions(folder: Path, rows) -> Path:
    path = folder / "questions.jsonl"
    path.write_text(rows if isinstance(rows, str) else jsonl(rows))
    return path


def eval_recipe(folder: Path, model_dir: Path, **judge) -> Path:
    return write_recipe(folder, model={"init": None, "name_or_path": str(model_dir)}, eval={
        "models": [str(model_dir)], "question_file": "questions.jsonl", "max_new_tokens": 4, "batch_size": 8,
        "judge": judge or {"type": "programmatic"}})


SYNTHETIC = list(synthetic_task.questions(3, seed=1))
BROKEN_QUESTIONS = [
    ("", "questions.jsonl holds no questions"),
    (jsonl(SYNTHETIC[:1]) + "{broken\n", "questions.jsonl:2: not valid JSON"),
    (jsonl([{**SYNTHETIC[0], "turns": "not a list"}]), "questions.jsonl:1: question 1: turns must be a non-empty list"),
    (jsonl([{"question_id": 9, "turns": ["hi"]}]), "questions.jsonl:1: question 9 lacks category"),
]


@pytest.mark.parametrize("content, message", BROKEN_QUESTIONS, ids=["empty", "broken-json", "turns", "category"])
def test_bad_question_files_name_the_line(folder, capsys, model_dir, content, message):
    write_questions(folder, content)
    recipe = eval_recipe(folder, model_dir)
    code, output = moetune(capsys, "eval", recipe)
    assert code == 2 and message in output
    assert run_dir_state(folder) == set()
    write_questions(folder, SYNTHETIC)
    code, output = moetune(capsys, "eval", recipe)
    assert code == 0 and run_dir_state(folder) == {"eval"}


def test_missing_question_prompt_and_reference_files(folder, capsys, model_dir):
    recipe = eval_recipe(folder, model_dir)
    code, output = moetune(capsys, "eval", recipe)
    assert code == 2 and f"eval.question_file: {folder / 'questions.jsonl'} does not exist" in output
    recipe = eval_recipe(folder, model_dir, type="openai", model="gpt-4", prompt_file="prompts.jsonl")
    code, output = moetune(capsys, "run", recipe, "--stages", "eval")
    assert code == 2 and f"eval.judge.prompt_file: {folder / 'prompts.jsonl'} does not exist" in output
    assert run_dir_state(folder) == set()


def test_eval_without_questions_says_where_to_get_some(folder, capsys):
    recipe = write_recipe(folder)
    assert moetune(capsys, "prep", recipe)[0] == 0
    code, output = moetune(capsys, "eval", recipe)
    assert code == 2 and "the prep stage made no eval questions" in output and "eval.question_file" in output
    assert run_dir_state(folder) == {"data"}


def test_eval_before_prep_says_to_run_prep(folder, capsys):
    code, output = moetune(capsys, "eval", write_recipe(folder))
    assert code == 2 and "needs the data stage's output" in output and "Run `moetune prep RECIPE` first" in output
    assert run_dir_state(folder) == set()


REFERENCE = {"question_id": 1, "choices": [{"turns": ["2"]}]}


@pytest.mark.parametrize("case", ["malformed questions", "malformed references", "unreachable eval model",
                                  "no preference pairs"])
def test_what_eval_and_dpo_read_is_checked_before_any_training(folder, capsys, monkeypatch, case):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # the network is down
    write_questions(folder, SYNTHETIC)
    (folder / "references.jsonl").write_text(jsonl([REFERENCE]))
    recipe = write_recipe(folder, eval={"models": ["sft"], "question_file": "questions.jsonl", "max_new_tokens": 4,
                                        "judge": {"reference_answer_file": "references.jsonl"}})
    stages, fix = "prep,sft,eval", []
    if case == "malformed questions":
        write_questions(folder, jsonl(SYNTHETIC[:1]) + "{broken\n")
        message = f"{folder / 'questions.jsonl'}:2: not valid JSON"
    elif case == "malformed references":
        (folder / "references.jsonl").write_text(jsonl([{"question_id": 1}]))
        message = f"{folder / 'references.jsonl'}:1: a reference answer needs question_id and choices[0].turns"
    elif case == "unreachable eval model":
        recipe = write_recipe(folder, eval={"models": ["sft", "org/no-such-model"]})
        message, fix = "eval.models[1]: org/no-such-model is not a local folder, and the Hub at", ["eval.models=[sft]"]
    else:
        stages, message = "prep,sft,dpo", f"[dpo] {folder / 'run' / 'data'} holds no preference pairs for training"
    started = time.monotonic()
    code, output = moetune(capsys, "run", recipe, "--stages", stages)
    assert code == 2 and message in output and time.monotonic() - started < 30
    assert run_dir_state(folder) == ({"data"} if case == "no preference pairs" else set())  # nothing trained
    if case == "malformed questions":
        write_questions(folder, SYNTHETIC)
    elif case == "malformed references":
        (folder / "references.jsonl").write_text(jsonl([REFERENCE]))
    elif case == "no preference pairs":
        stages = "prep,sft"
    code, output = moetune(capsys, "run", recipe, "--stages", stages.replace(",eval", ""), *fix)
    assert code == 0 and "sft" in run_dir_state(folder)


def test_a_model_with_code_of_its_own_names_trust_remote_code(folder, capsys, model_dir):
    custom = Path(shutil.copytree(model_dir, folder / "custom"))
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    recipe = write_recipe(folder, model={"init": None, "name_or_path": str(custom)})
    code, output = moetune(capsys, "run", recipe, "--stages", "prep,sft")
    assert code == 2 and "model.name_or_path" in output and "ships its own Python code" in output
    assert "the recipe sets model.trust_remote_code: true" in output and "hf.co" not in output
    assert run_dir_state(folder) == set()


@pytest.mark.slow  # a training run, then its resume in a fresh process
def test_a_resumed_full_sft_shows_no_missing_keys_warning(folder, capsys, monkeypatch):
    import finetune.training.resume

    recipe = write_recipe(folder, sft={"max_steps": 2})
    with monkeypatch.context() as patch:  # Ctrl-C during the first step: a checkpoint at step 1, exit 130
        patch.setattr(finetune.training.resume.StopOnSignal, "__init__", lambda self: vars(self).update(
            requested=True, signum=signal.SIGINT))
        code, output = moetune(capsys, "run", recipe, "--stages", "prep,sft")
    assert code == 130 and "interrupted at step 1" in output
    resumed = subprocess.run([sys.executable, "-m", "finetune", "sft", str(recipe)], env={
        **os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "resuming from" in output and "checkpoint-1" in output, output[-3000:]
    assert "missing keys" not in output and "unexpected keys" not in output


def test_ctrl_c_while_answering_keeps_the_work_and_the_same_command_continues(folder, capsys, model_dir, monkeypatch):
    import finetune.stages.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    write_questions(folder, SYNTHETIC)
    recipe = eval_recipe(folder, model_dir)
    with monkeypatch.context() as patch:
        patch.setattr(finetune.stages.evaluate, "answer_questions", interrupted)
        code, output = moetune(capsys, "eval", recipe)
    assert code == 130 and "[eval] interrupted" in output and run_dir_state(folder) == {".eval.partial"}
    assert moetune(capsys, "eval", recipe)[0] == 0 and run_dir_state(folder) == {"eval"}


def test_missing_eval_model_is_named_before_any_answer(folder, capsys, model_dir):
    write_questions(folder, SYNTHETIC)
    recipe = eval_recipe(folder, model_dir)
    code, output = moetune(capsys, "eval", recipe, f"eval.models=[{model_dir}, ./no/such-model]")
    assert code == 2 and "eval.models[1]" in output and "no/such-model does not exist" in output
    assert run_dir_state(folder) == set()


def test_programmatic_judge_refuses_questions_it_cannot_score(folder, capsys, model_dir):
    mt_bench = mt_bench_file("question.jsonl").read_text().splitlines()[:5]
    write_questions(folder, "\n".join(mt_bench) + "\n")
    recipe = eval_recipe(folder, model_dir)
    code, output = moetune(capsys, "eval", recipe)
    assert code == 2 and "the programmatic judge cannot score 5 of 5 questions" in output
    assert "eval.judge.type: openai or local" in output and run_dir_state(folder) == set()


class RatingServer(ThreadingHTTPServer):
    """An OpenAI-compatible judge on loopback that rates everything 5 after `delay` seconds; it stops by itself.
    Leaving the `with` block waits for the calls in flight (no thread outlives the test to write into another
    test's captured stderr)."""

    def __init__(self, delay: float = 0.0, port: int = 0, max_requests: int = 200):
        super().__init__(("127.0.0.1", port), RatingHandler)
        self.delay, self.max_requests, self.requests = delay, max_requests, 0
        self.authorizations = set()  # the Authorization headers the judge was sent
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(120, self.shutdown)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.shutdown()
        self.server_close()  # joins the handler threads

    def handle_error(self, request, client_address):
        # A client that went away mid-call (the Ctrl-C test stops the judge's caller): expected, nothing to report.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RatingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests += 1
        self.server.authorizations.add(self.headers.get("Authorization"))
        if self.server.requests > self.server.max_requests:
            return self.send_error(400)
        time.sleep(self.server.delay)
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Rating: [[5]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


def openai_eval_recipe(folder: Path, model_dir: Path, base_url: str, **judge) -> Path:
    prompts = mt_bench_file("judge_prompts.jsonl")
    write_questions(folder, SYNTHETIC)
    judge = {"api_key_env": None, "max_retries": 1, "backoff_seconds": 0.01, **judge}
    return eval_recipe(folder, model_dir, type="openai", model="gpt-4", base_url=base_url, prompt_file=str(prompts),
                       **judge)


def test_dead_judge_then_the_fixed_base_url_resumes_without_force_or_new_answers(folder, capsys, model_dir,
                                                                               monkeypatch):
    import finetune.stages.evaluate

    url = f"http://127.0.0.1:{closed_port()}/v1"
    recipe = openai_eval_recipe(folder, model_dir, url)
    started = time.monotonic()
    code, output = moetune(capsys, "eval", recipe)
    assert f"[preflight] warning: the judge at {url} (eval.judge.base_url) cannot be reached now" in output
    assert code == 2 and f"cannot reach the judge at {url}/chat/completions" in output
    assert "eval.judge.base_url" in output and time.monotonic() - started < 30
    answers = folder / "run" / ".eval.partial" / "model_answer"
    assert run_dir_state(folder) == {".eval.partial"} and len(list(answers.iterdir())) == 1
    saved = next(answers.iterdir()).read_text()
    monkeypatch.setenv("MOETUNE_TEST_JUDGE_KEY", "a-key")
    monkeypatch.setattr(finetune.stages.evaluate, "answer_questions", pytest.fail)  # every answer is saved already
    with RatingServer() as server:  # the judge is up elsewhere; where it is and how it is called are no inputs
        code, output = moetune(capsys, "eval", recipe, f"eval.judge.base_url={server.base_url}",
                               "eval.judge.api_key_env=MOETUNE_TEST_JUDGE_KEY", "eval.judge.max_retries=3",
                               "eval.judge.backoff_seconds=0.5", "eval.judge.max_concurrency=2")
    assert code == 0 and run_dir_state(folder) == {"eval"} and server.requests == 2 * len(SYNTHETIC)  # two turns
    assert server.authorizations == {"Bearer a-key"} and "warning" not in output
    assert next((folder / "run" / "eval" / "model_answer").iterdir()).read_text() == saved  # not answered again


def test_a_new_judge_model_judges_the_saved_answers_again(folder, capsys, model_dir, monkeypatch):
    import finetune.stages.evaluate

    with RatingServer() as server:
        recipe = openai_eval_recipe(folder, model_dir, server.base_url)
        assert moetune(capsys, "eval", recipe)[0] == 0
        eval_dir = folder / "run" / "eval"
        saved = next((eval_dir / "model_answer").iterdir()).read_text()
        monkeypatch.setattr(finetune.stages.evaluate, "answer_questions", pytest.fail)
        code, output = moetune(capsys, "eval", recipe, "eval.judge.model=gpt-4o")
        assert code == 2 and "changed: eval.judge.model" in output and "--force" in output
        code, output = moetune(capsys, "eval", recipe, "eval.judge.model=gpt-4o", "--force")
    assert code == 0 and "reusing" in output and server.requests == 4 * len(SYNTHETIC)  # judged twice, 2 turns
    assert next((eval_dir / "model_answer").iterdir()).read_text() == saved
    assert sorted(path.name for path in (eval_dir / "model_judgment").iterdir()) == ["gpt-4o_single.jsonl"]


def test_ctrl_c_while_judging_stops_in_seconds_and_keeps_what_finished(folder, model_dir):
    with RatingServer(delay=2.0) as server:
        recipe = openai_eval_recipe(folder, model_dir, server.base_url, max_concurrency=2)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # As typed in a terminal: a suite run in the background (a script's `&`, some CI runners) passes SIGINT on
        # ignored, and a child that ignores Ctrl-C would judge to the end.
        process = subprocess.Popen([sys.executable, "-m", "finetune", "eval", str(recipe)], cwd=folder, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        judgments = folder / "run" / ".eval.partial" / "model_judgment" / "gpt-4_single.jsonl"
        deadline = time.monotonic() + 240
        while not (judgments.is_file() and judgments.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            time.sleep(0.2)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
        # The stage stops at once (the message comes within 0.1 s); most of this bound is the interpreter's own
        # exit with torch loaded (2-5 s on a busy 2-core machine). Before: ~11.5 minutes, then a traceback.
        assert time.monotonic() - interrupted < 15
    assert process.returncode == 130 and "Traceback" not in output  # 128 + SIGINT, as shells expect
    assert "interrupted" in output and ".eval.partial" in output
    kept = judgments.read_text().count("\n")
    assert 2 <= kept < 2 * len(SYNTHETIC)  # what finished is saved; the rest was not waited for


def test_dns_failure_is_tried_a_few_times_not_like_a_503(monkeypatch):
    from eval import judge_backends as judges
    from finetune.config.evaluation import JudgeConfig
    from eval.judge_prompts import JudgePrompt

    attempts = []

    def no_such_host(request, timeout):
        attempts.append(request.full_url)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_such_host)
    monkeypatch.setattr(judges, "UNREACHABLE_PAUSE_SECONDS", 0.01)
    judge = judges.OpenAICompatibleJudge(JudgeConfig(type="openai", model="gpt-4", base_url="http://judge.invalid/v1",
                                                     api_key_env=None, max_retries=5, backoff_seconds=60,
                                                     max_concurrency=1))
    with pytest.raises(judges.JudgeUnreachable, match=r"cannot reach the judge at http://judge.invalid/v1/chat/"
                                                      r"completions \(\[Errno -2\] Name or service not known; 3 tries"):
        list(judge.complete_many([JudgePrompt("single-v1", "system", "user")] * 20))
    assert len(attempts) == judges.UNREACHABLE_TRIES  # the other 19 prompts were never sent


# ---------------------------------------------------------------- secrets

PLANTED = {"HF_TOKEN": "hf_" + "PlantedHubToken0123456789abcd", "MOETUNE_TEST_JUDGE_KEY": "sk-" + "PlantedJudgeKey01234567",
           "sft.hub_token": "hf_" + "PlantedRecipeToken0123456789"}


@pytest.mark.slow  # a whole run (prep, sft, eval with an API judge) in a fresh process, then a dry-run upload
def test_planted_secrets_reach_no_file_no_upload_and_no_output(folder, capsys, model_dir, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": PLANTED["HF_TOKEN"],
           "MOETUNE_TEST_JUDGE_KEY": PLANTED["MOETUNE_TEST_JUDGE_KEY"]}
    with RatingServer() as server:
        recipe = openai_eval_recipe(folder, model_dir, server.base_url, api_key_env="MOETUNE_TEST_JUDGE_KEY")
        command = [sys.executable, "-m", "finetune", "run", str(recipe), "--stages", "prep,sft,eval", "eval.models=[sft]"]
        refused = subprocess.run([*command, f"sft.hub_token={PLANTED['sft.hub_token']}"], env=env, cwd=folder,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "sft.hub_token would hold a credential" in refused.stderr
        assert "hf auth login" in refused.stderr and run_dir_state(folder) == set()
        done = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert server.authorizations == {f"Bearer {PLANTED['MOETUNE_TEST_JUDGE_KEY']}"}  # the key was used
    monkeypatch.setenv("HF_TOKEN", PLANTED["HF_TOKEN"])
    code, pushed = moetune(capsys, "push", folder / "run" / "sft", "--repo-id", "me/tiny-sft", "--dry-run",
                           folder / "upload")
    assert code == 0 and (folder / "upload" / "recipe.yaml").is_file()
    outputs = [refused.stdout, refused.stderr, done.stdout, done.stderr, pushed]
    files = [path for path in folder.rglob("*") if path.is_file()]  # the run, the upload, the recipe
    assert any(path.name == "training_args.bin" for path in files)
    for secret in PLANTED.values():
        assert not any(secret in text for text in outputs)
        assert not [path for path in files if secret.encode() in path.read_bytes()]


# ---------------------------------------------------------------- push

def finished_stage(folder: Path) -> Path:
    """A committed sft stage as `moetune push` reads it: manifest, weights, tokenizer, resolved recipe."""
    stage = Stage(folder / "run", "sft", inputs={})
    assert stage.begin()
    (stage.work / "model.safetensors").write_bytes(b"weights")
    (stage.work / "recipe.yaml").write_text(write_recipe(folder).read_text())
    return stage.commit({"kind": "full", "parent": "base", "steps": 1})


def test_push_with_the_network_down_names_the_endpoint(folder, capsys, monkeypatch):
    from huggingface_hub import HfApi, constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_0123456789")
    stage = finished_stage(folder)
    code, output = moetune(capsys, "push", stage, "--repo-id", "me/tiny")
    assert code == 2 and f"uploading {stage} to me/tiny at {endpoint} failed" in output and "ConnectError" in output
    assert "hf_secret_token" not in output
    uploads = []  # the network is back: the same command uploads
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: uploads.append(sorted(
        path.name for path in Path(kwargs["folder_path"]).iterdir())))
    assert moetune(capsys, "push", stage, "--repo-id", "me/tiny")[0] == 0
    assert uploads == [["README.md", "model.safetensors", "recipe.yaml"]]
