"""A full disk and a read-only run dir stop a stage with a message naming the path and the fix; nothing half-written
is committed, and once there is room the same command finishes.

The training cases use real file systems (a small tmpfs, a read-only bind mount), which needs the right to mount;
prep and eval inject the OS error at their write layer, so those run anywhere.
"""

import errno
import json
import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest

import data_prep.writer
import eval.jsonl
from finetune.training.checkpoints import checkpoint_problem, checkpoints
from finetune.cli import main
from helpers.recipes import write_recipe

@contextmanager
def mounted(target, *options):
    """`mount *options target`, undone afterwards; skips the test where this process may not mount."""
    result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"needs the right to mount file systems (root with CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield target
    finally:
        # lazy: a handle left open by a failed write
        subprocess.run(["umount", "--lazy", str(target)], check=True, timeout=60)


def folder_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_full_disk_while_saving_a_checkpoint(prepared_run, tmp_path, capsys):
    recipe, run = prepared_run(tmp_path / "full", stages=("prep", "sft"))
    # The run dir on a disk with room for the data and the base model, and 200 KiB more: enough for the model
    # weights of a checkpoint (134 KiB), not for its optimizer state (twice that).
    kept = tmp_path / "kept"
    shutil.move(run, kept)
    run.mkdir()
    room = folder_bytes(kept / "data") + folder_bytes(kept / "base") + (200 << 10)
    with mounted(run, "-t", "tmpfs", "-o", f"size={room}", "tmpfs"):
        for name in ("data", "base"):
            shutil.copytree(kept / name, run / name)
        capsys.readouterr()
        overrides = ["sft.max_steps=4", "sft.save_strategy=steps", "sft.save_steps=2"]
        assert main(["sft", recipe, *overrides]) == 2
        err = capsys.readouterr().err
        assert f"[sft] no space left on the disk holding {run}" in err
        assert "Free space on that disk, or move" in err and "point run_dir there" in err
        assert "run the same command again" in err and "Traceback" not in err
        # Nothing half-written counts: no committed stage, and no checkpoint that looks complete.
        assert not (run / "sft").exists() and checkpoints(run / ".sft.partial")
        assert all(checkpoint_problem(path) is not None for _, path in checkpoints(run / ".sft.partial"))

        subprocess.run(["mount", "-o", f"remount,size={room + (8 << 20)}", str(run)], check=True, timeout=60)
        assert main(["sft", recipe, *overrides]) == 0  # room again: the same command finishes
        assert "checkpoint-2 is unusable: it was never completed" in capsys.readouterr().out
        assert json.loads((run / "sft" / "moetune_stage.json").read_text())["outputs"]["steps"] == 4


def test_read_only_run_dir(prepared_run, tmp_path, capsys):
    recipe, run = prepared_run(tmp_path / "read-only")
    with mounted(run, "--bind", str(run)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], check=True, timeout=60)
        capsys.readouterr()
        assert main(["sft", recipe]) == 2
        err = capsys.readouterr().err
        # A model.init recipe: the base stage runs first (under its own name) and is the first to write.
        assert f"[base] cannot write {run}/" in err and f"the run dir {run} is read-only" in err
        assert "Make it writable, or set run_dir to a writable folder" in err and "Traceback" not in err
    assert not (run / "base").exists() and not (run / "sft").exists() and not (run / ".sft.partial").exists()


def failing_open(fail_when):
    """`open` that fails like a full disk for paths `fail_when` picks, as the OS does when it cannot create a file."""
    def open_or_fail(file, mode="r", *args, **kwargs):
        if "r" not in mode and fail_when(str(file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return open(file, mode, *args, **kwargs)
    return open_or_fail


def test_full_disk_during_prep(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path)
    monkeypatch.setattr(data_prep.writer, "open", failing_open(lambda path: path.endswith("train.jsonl")),
                        raising=False)
    assert main(["prep", str(recipe)]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert f"[prep] no space left on the disk holding {run} (writing {run}/.data.partial/" in err
    assert "Free space on that disk" in err
    assert not (run / "data").exists()  # not committed
    monkeypatch.undo()
    assert main(["prep", str(recipe)]) == 0


def test_full_disk_while_saving_eval_judgments(tmp_path, monkeypatch, capsys):
    from finetune.core.synthetic_task import questions

    run = tmp_path / "run"
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions(3, seed=3)))
    answers = run / ".eval.partial" / "model_answer" / "a.jsonl"  # saved by an earlier run: no model is loaded
    answers.parent.mkdir(parents=True)
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "choices": [{"turns": ["1 2", "3"]}]}) + "\n"
                               for q in questions(3, seed=3)))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"run_dir: {run}\nmodel: {{init: {{}}}}\neval: {{models: [a], question_file: {question_file}}}\n")
    monkeypatch.setattr(eval.jsonl, "open", failing_open(lambda path: "model_judgment" in path), raising=False)
    assert main(["eval", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"[eval] no space left on the disk holding {run} (writing {run}/.eval.partial/model_judgment/" in err
    assert not (run / "eval").exists()
    monkeypatch.undo()
    assert main(["eval", str(recipe)]) == 0
    assert json.loads((run / "eval" / "scores.json").read_text())["models"]["a"]["judged"] == 6
