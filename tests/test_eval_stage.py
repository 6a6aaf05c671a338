"""The eval stage end to end: a real OpenAI-compatible HTTP judge on loopback, and the programmatic demo path."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import finetune.stages.evaluate
from finetune.config.evaluation import JudgeConfig
from eval.judge_prompts import JudgePrompt
from eval.judge_backends import OpenAICompatibleJudge, retry_after_seconds
from eval.jsonl import read_jsonl
from finetune.cli import main
from finetune.config.parsing import parse_recipe
from helpers.shared_data import mt_bench_file
from helpers.tiny import tiny_chat_model

API_KEY = "sk-test-secret-0123456789"
MARKER = re.compile(r"<<(\w+)>>")


class FakeJudgeServer(ThreadingHTTPServer):
    """Speaks OpenAI's /chat/completions. The judged answers carry markers such as <<7>> that script the reply:
    a number is the rating, bad gives no rating, fb6 uses the [6] fallback, slow times out once, busy gets one
    429, limited gets one 429 with `Retry-After: 1`, down gets 500 while `down` is set; pairwise, the higher number
    wins, pos always says A, garble no verdict. Every reply waits `delay` seconds."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.requests: list[dict] = []
        self.attempts: Counter = Counter()
        self.down = True
        self.delay = 0.0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class JudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        markers = MARKER.findall(user)
        with self.server.lock:
            self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                                         "time": time.monotonic()})
            last = markers[-1]
            self.server.attempts[last] += 1
            attempt = self.server.attempts[last]
        if last == "slow" and attempt == 1:
            time.sleep(0.6)  # longer than the client's timeout
        elif last == "busy" and attempt == 1:
            return self.send_error(429)
        elif last == "limited" and attempt == 1:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        elif last == "down" and self.server.down:
            return self.send_error(500)
        time.sleep(self.server.delay)
        pairwise = "two AI assistants" in system
        content = verdict(markers) if pairwise else rating(last)
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on the slow request


def rating(marker: str) -> str:
    scripted = {"bad": "A fine answer, but I will not give a number.", "fb6": "Rating: [6]",
                "slow": "Rating: [[5]]", "busy": "Rating: [[3]]", "limited": "Rating: [[4]]", "down": "Rating: [[9]]"}
    return scripted.get(marker, f"The answer is judged. Rating: [[{marker}]]")


def verdict(markers: list[str]) -> str:
    """Compares A's and B's last answers: the marker before the midpoint and the last one."""
    a, b = markers[len(markers) // 2 - 1], markers[-1]
    if "garble" in (a, b):
        return "Both are answers."
    if "pos" in (a, b):
        return "[[A]]"
    return "[[A]]" if int(a) > int(b) else "[[B]]" if int(b) > int(a) else "[[C]]"


@pytest.fixture
def judge_server():
    server = FakeJudgeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopper = threading.Timer(60, server.shutdown)  # stops by itself even if a test hangs
    stopper.daemon = True
    stopper.start()
    yield server
    stopper.cancel()
    server.shutdown()
    server.server_close()


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["R1 four", "R2 six"]},
    {"question_id": 3, "category": "extraction", "turns": ["Extract the names."]},
]


def write_questions_and_answers(run_dir: Path, answers: dict[str, dict[int, list[str]]], questions=QUESTIONS) -> Path:
    """Questions, plus answers already saved in the work folder, as a crashed earlier run would have left them."""
    question_file = run_dir / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    for model, by_question in answers.items():
        lines = [{"question_id": qid, "answer_id": f"{model}-{qid}", "model_id": model,
                  "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0} for qid, turns in by_question.items()]
        answer_file = run_dir / ".eval.partial" / "model_answer" / f"{model}.jsonl"
        answer_file.parent.mkdir(parents=True, exist_ok=True)
        answer_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return question_file


def openai_recipe(run_dir: Path, server: FakeJudgeServer, question_file: Path, prompt_file: Path, **judge):
    return parse_recipe({
        "run_dir": str(run_dir),
        "model": {"init": {}},
        "eval": {
            "models": ["a", "b"],
            "question_file": str(question_file),
            "judge": {"type": "openai", "model": "gpt-4", "base_url": server.base_url, "api_key_env": "TEST_JUDGE_KEY",
                      "prompt_file": str(prompt_file), "timeout_seconds": 0.3, "max_retries": 2,
                      "backoff_seconds": 0.01, "max_concurrency": 4, **judge},
        },
    }, "test")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Answers are already saved: loading a model would be a bug."""
    def refuse(source, name, of_this_run):
        raise AssertionError(f"model {name} loaded although its answers were saved")
    monkeypatch.setattr(finetune.stages.evaluate, "load_for_inference", refuse)


def test_single_judge_over_http_retries_records_failures_and_resumes(tmp_path, judge_server, monkeypatch, capsys, no_model_loading):

    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    question_file = write_questions_and_answers(tmp_path, {
        "a": {1: ["<<8>>", "<<6>>"], 2: ["<<bad>>", "<<4>>"], 3: ["<<fb6>>"]},
        "b": {1: ["<<slow>>", "<<busy>>"], 2: ["<<10>>", "<<down>>"], 3: ["<<2>>"]},
    })
    recipe = openai_recipe(tmp_path, judge_server, question_file, mt_bench_file("judge_prompts.jsonl"))

    # First run: b's second math turn keeps failing (HTTP 500): recorded, not fatal, stage left unfinished.
    assert finetune.stages.evaluate.run(recipe) == tmp_path / ".eval.partial"
    assert not (tmp_path / "eval").exists()
    attempts = judge_server.attempts
    assert [attempts["slow"], attempts["busy"], attempts["down"]] == [2, 2, 3]  # timeout, 429 retried; 500 twice
    assert len(judge_server.requests) == 5 + 5 + 1 + 1 + 2
    errors = read_jsonl(tmp_path / ".eval.partial" / "judge_errors.jsonl")
    assert [(e["model"], e["question_id"], e["turn"]) for e in errors] == [("b", 2, 2)]
    first = json.loads((tmp_path / ".eval.partial" / "scores.json").read_text())["models"]
    assert first["b"]["errors"] == 1 and first["b"]["judged"] == 4
    assert first["b"]["turn2"] == 3.0 and first["b"]["overall"] == pytest.approx((5 + 10 + 2 + 3) / 4)

    # Second run, judge healthy again: only the missing judgment is asked for, then the stage commits.
    judge_server.down = False
    requests_before = len(judge_server.requests)
    assert finetune.stages.evaluate.run(recipe) == tmp_path / "eval"
    assert len(judge_server.requests) == requests_before + 1

    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["models"]
    # a: 8, [bad] -1, fallback 6 on turn 1; 6, 4 on turn 2. The -1 is counted and left out of every mean.
    assert scores["a"] == {
        "turn1": 7.0, "turn2": 5.0, "overall": 6.0, "judged": 4, "failed": 1, "errors": 0,
        "categories": {"writing": 7.0, "math": 4.0, "extraction": 6.0},
    }
    # b: 5 (after a timeout), 10, 2 on turn 1; 3 (after a 429), 9 (after the outage) on turn 2.
    assert scores["b"] == {
        "turn1": pytest.approx(17 / 3), "turn2": 6.0, "overall": pytest.approx(29 / 5), "judged": 5, "failed": 0,
        "errors": 0, "categories": {"writing": 4.0, "math": 9.5, "extraction": 2.0},
    }

    # Every request: temperature 0, the judge model, the key from the named environment variable.
    bodies = [r["body"] for r in judge_server.requests]
    assert {(b["model"], b["temperature"], b["max_tokens"]) for b in bodies} == {("gpt-4", 0, 2048)}
    assert {(r["path"], r["auth"]) for r in judge_server.requests} == {("/v1/chat/completions", f"Bearer {API_KEY}")}
    # The math question is judged with the reference-guided prompts and the question's own reference.
    judgments = read_jsonl(tmp_path / "eval" / "model_judgment" / "gpt-4_single.jsonl")
    math_b = {j["turn"]: j for j in judgments if j["model"] == "b" and j["question_id"] == 2}
    assert math_b[1]["judge"] == ["gpt-4", "single-math-v1"] and math_b[2]["judge"] == ["gpt-4", "single-math-v1-multi-turn"]
    assert "[The Start of Reference Answer]\nR1 four\n[The End of Reference Answer]" in math_b[1]["user_prompt"]
    assert set(judgments[0]) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    # The key is never written anywhere, nor printed.
    assert all(API_KEY not in path.read_bytes().decode("latin-1") for path in tmp_path.rglob("*") if path.is_file())
    out = capsys.readouterr().out
    assert API_KEY not in out and "| score | a | b |" in out
    assert (tmp_path / "eval" / "radar.png").stat().st_size > 0
    assert "| overall | 6.00 | 5.80 |" in (tmp_path / "eval" / "scores.md").read_text()


def test_pairwise_against_baseline_counts_inconsistent_verdicts_as_ties(tmp_path, judge_server, no_model_loading):

    question_file = write_questions_and_answers(tmp_path, {
        "a": {1: ["<<3>>", "<<5>>"], 2: ["<<4>>", "<<7>>"], 3: ["<<1>>"]},
        "b": {1: ["<<9>>", "<<2>>"], 2: ["<<pos>>", "<<7>>"], 3: ["<<garble>>"]},
    })
    recipe = openai_recipe(tmp_path, judge_server, question_file, mt_bench_file("judge_prompts.jsonl"),
                           mode="pairwise", baseline="a")
    judge_server.down = False
    assert finetune.stages.evaluate.run(recipe) == tmp_path / "eval"

    assert len(judge_server.requests) == 5 * 2  # five comparisons, both orders each
    # win (q1 t1), loss (q1 t2), tie by inconsistency (q2 t1), tie by [[C]] (q2 t2), unreadable verdict (q3).
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["models"]
    assert scores == {"b": {"win": 1, "loss": 1, "tie": 2, "win_rate": 0.25, "loss_rate": 0.25,
                            "win_rate_adjusted": 0.5, "failed": 1, "errors": 0}}
    records = {(r["question_id"], r["turn"]): r for r in read_jsonl(tmp_path / "eval" / "model_judgment" / "gpt-4_pair.jsonl")}
    assert (records[(1, 1)]["g1_winner"], records[(1, 1)]["g2_winner"]) == ("model_1", "model_1")
    assert (records[(2, 1)]["g1_winner"], records[(2, 1)]["g2_winner"]) == ("model_1", "model_2")
    assert records[(2, 2)]["judge"] == ["gpt-4", "pair-math-v1-multi-turn"]
    assert (records[(1, 1)]["model_1"], records[(1, 1)]["model_2"]) == ("b", "a")


def test_judge_waits_as_long_as_retry_after_says(judge_server):
    judge = OpenAICompatibleJudge(JudgeConfig(type="openai", model="gpt-4", base_url=judge_server.base_url,
                                              api_key_env=None, backoff_seconds=0.01))
    assert judge.complete(JudgePrompt("single-v1", "You judge.", "Rate this: <<limited>>")) == "Rating: [[4]]"
    first, second = (request["time"] for request in judge_server.requests)
    assert second - first >= 1.0  # the 429's `Retry-After: 1`, not the 0.01 s backoff
    # The other form is an HTTP date; a date in the past means now, and a garbled header falls back to the backoff.
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == 5.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412490.0) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


@pytest.mark.slow
def test_eval_killed_while_judging_resumes_without_asking_twice(tmp_path, judge_server):
    """kill -9 in the middle of judging, then the same command: finished judgments are never asked for again,
    and the scores equal those of an uninterrupted run."""

    questions = [{"question_id": qid, "category": "writing", "turns": [f"Write {qid}.", f"Shorten {qid}."]}
                 for qid in range(1, 13)]
    answers = {model: {qid: [f"<<{(qid + shift) % 10 + 1}>>", f"<<{qid * shift % 10 + 1}>>"] for qid in range(1, 13)}
               for model, shift in (("a", 1), ("b", 7))}

    def recipe_in(folder: Path) -> str:
        folder.mkdir()
        question_file = write_questions_and_answers(folder, answers, questions)
        judge = {"type": "openai", "model": "gpt-4", "base_url": judge_server.base_url, "api_key_env": None,
                 "prompt_file": str(mt_bench_file("judge_prompts.jsonl")), "max_concurrency": 2}
        recipe = folder / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"run_dir": str(folder), "model": {"init": {}},
                                          "eval": {"models": ["a", "b"], "question_file": str(question_file),
                                                   "judge": judge}}))
        return str(recipe)

    judge_server.delay = 0.02
    reference = recipe_in(tmp_path / "reference")
    assert main(["eval", reference]) == 0
    total = 12 * 2 * 2

    killed = recipe_in(tmp_path / "killed")
    judgment_file = tmp_path / "killed" / ".eval.partial" / "model_judgment" / "gpt-4_single.jsonl"
    with open(tmp_path / "eval.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "finetune", "eval", killed], stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while len(read_jsonl(judgment_file)) < 10:
            assert process.poll() is None, (tmp_path / "eval.log").read_text()
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"eval judged fewer than 10 items in 300 s; see {tmp_path / 'eval.log'}")
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finished = {record["user_prompt"] for record in read_jsonl(judgment_file)}
    assert 10 <= len(finished) < total  # killed in the middle of judging
    with open(judgment_file, "a") as handle:  # and, as after a power cut, the last record was only half written
        handle.write('{"question_id": 1, "model": "a", "jud')

    before = len(judge_server.requests)
    assert main(["eval", killed]) == 0
    asked = [request["body"]["messages"][1]["content"] for request in judge_server.requests[before:]]
    assert not finished & set(asked)  # nothing finished was asked for again ...
    assert len(asked) == len(set(asked)) == total - len(finished)  # ... and everything else exactly once
    assert len(read_jsonl(tmp_path / "killed" / "eval" / "model_judgment" / "gpt-4_single.jsonl")) == total
    scores = json.loads((tmp_path / "killed" / "eval" / "scores.json").read_text())
    assert scores == json.loads((tmp_path / "reference" / "eval" / "scores.json").read_text())


def synthetic_recipe(run_dir: Path, **eval_section):
    from finetune.core.synthetic_task import questions

    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions(6, seed=3)))
    return parse_recipe({"run_dir": str(run_dir), "model": {"init": {}},
                         "eval": {"max_new_tokens": 4, "batch_size": 4, **eval_section}}, "test")


@pytest.fixture
def tiny_models(monkeypatch):
    """finetune.modeling.loading.load_for_inference stand-in: a tiny random MoE per name; counts loads."""
    loads = Counter()

    def load_for_inference(source, name, of_this_run):
        loads[name] += 1
        return tiny_chat_model(seed=len(name))

    monkeypatch.setattr(finetune.stages.evaluate, "load_for_inference", load_for_inference)
    return loads


def test_programmatic_stage_answers_judges_reports_and_resumes(tmp_path, tiny_models, capsys):
    recipe = synthetic_recipe(tmp_path)
    assert finetune.stages.evaluate.run(recipe) == tmp_path / "eval"
    assert tiny_models == {"base": 1, "sft": 1, "dpo": 1}

    answers = read_jsonl(tmp_path / "eval" / "model_answer" / "sft.jsonl")
    assert len(answers) == 6 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    judgments = read_jsonl(tmp_path / "eval" / "model_judgment" / "programmatic_single.jsonl")
    assert len(judgments) == 3 * 6 * 2
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["models"]
    base = [j["score"] for j in judgments if j["model"] == "base"]
    assert scores["base"]["overall"] == pytest.approx(sum(base) / len(base))
    assert scores["base"]["judged"] == 12 and set(scores) == {"base", "sft", "dpo"}
    assert "| score | base | sft | dpo |" in capsys.readouterr().out

    # Same inputs: skipped, nothing loaded.
    assert finetune.stages.evaluate.run(recipe) == tmp_path / "eval"
    assert sum(tiny_models.values()) == 3


def test_rerun_after_crash_reuses_saved_answers_and_judgments(tmp_path, tiny_models):
    recipe = synthetic_recipe(tmp_path, models=["base", "sft"])
    work = tmp_path / ".eval.partial"
    finetune.stages.evaluate.run(recipe)
    # Make it look like a crash: the work folder is back, with sft's answers and all judgments for sft gone.
    (tmp_path / "eval").rename(work)
    (work / "moetune_stage.json").unlink()
    (work / "model_answer" / "sft.jsonl").unlink()
    judgment_file = work / "model_judgment" / "programmatic_single.jsonl"
    kept = [j for j in read_jsonl(judgment_file) if j["model"] == "base"]
    judgment_file.write_text("".join(json.dumps(j) + "\n" for j in kept))

    finetune.stages.evaluate.run(recipe)
    assert tiny_models == {"base": 1, "sft": 2}  # base was not loaded again
    after = read_jsonl(tmp_path / "eval" / "model_judgment" / "programmatic_single.jsonl")
    assert [j["tstamp"] for j in after if j["model"] == "base"] == [j["tstamp"] for j in kept]
    assert len(after) == 2 * 6 * 2


@pytest.mark.slow
def test_local_judge_model_grades_with_the_same_prompts(tmp_path, tiny_models):

    recipe = synthetic_recipe(tmp_path, models=["base"], judge={
        "type": "local", "model": "judge", "prompt_file": str(mt_bench_file("judge_prompts.jsonl")), "max_tokens": 4})
    assert finetune.stages.evaluate.run(recipe) == tmp_path / "eval"
    assert tiny_models == {"base": 1, "judge": 1}
    judgments = read_jsonl(tmp_path / "eval" / "model_judgment" / "judge_single.jsonl")
    assert len(judgments) == 6 * 2
    assert {tuple(j["judge"]) for j in judgments} == {("judge", "single-v1"), ("judge", "single-v1-multi-turn")}
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["models"]
    # A random judge model writes no rating: every judgment is counted as failed, none is averaged.
    assert (scores["base"]["judged"], scores["base"]["failed"], scores["base"]["overall"]) == (0, 12, None)


@pytest.mark.parametrize("categories, bars", [(["math"], True), (["math", "coding"], True),
                                               (["math", "coding", "writing"], False)])
def test_fewer_than_three_categories_are_drawn_as_bars_not_an_empty_radar(tmp_path, monkeypatch, categories, bars):
    from PIL import Image

    import eval.scores

    drawn = []
    real_bar_plot = eval.scores.bar_plot
    monkeypatch.setattr(eval.scores, "bar_plot", lambda *args: drawn.append(args) or real_bar_plot(*args))
    scores = {model: {"categories": {c: 3.0 + i for i, c in enumerate(categories)}} for model in ("sft", "dpo")}
    eval.scores.radar_plot(scores, tmp_path / "radar.png")
    assert bool(drawn) == bars
    with Image.open(tmp_path / "radar.png") as png:
        assert png.format == "PNG" and png.width > 200
