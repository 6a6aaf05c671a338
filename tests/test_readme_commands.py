"""Every command in the shell blocks of the README and of the docs/ pages either runs here (on small versions of the
shipped recipes, uploads caught before the network) and ends as the page implies, or is listed below with the reason
it cannot run here. A command added to a page without either fails this test."""

import shlex
from pathlib import Path

import pytest

from finetune.cli import main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The shipped recipes, shrunk: overrides appended to every command that names one (a later override wins).
SMALL = {
    "recipes/tiny-moe.yaml": [
        "model.init.hidden_size=64", "model.init.intermediate_size=64", "model.init.num_layers=1",
        "data.sources=[{format: synthetic, options: {sft: 200, pairs: 80, questions: 6}}]",
        "sft.max_steps=4", "sft.logging_steps=2", "sft.per_device_train_batch_size=8", "dpo.max_steps=2",
        "dpo.logging_steps=1", "dpo.per_device_train_batch_size=4", "eval.max_new_tokens=8", "eval.batch_size=8"],
    "recipes/first.yaml": ["model.init.num_layers=1", "sft.max_steps=3", "dpo.max_steps=2"],
}
NOT_RUN_HERE = {
    "make install": "sets up .venv: the suite runs inside it",
    "make docs": "builds the documentation site (CI runs it, .ci/run)",
    "make test-quick": "the test suite itself, without the slow tests",
    "make demo": "the full demo: minutes of training (its stages run below on the small recipe)",
    "make test": "the test suite itself",
    "make bench": "benchmarks: tens of minutes",
    "make gpu-check": "needs a GPU (its --cpu mode is tests/test_gpu_check.py's)",
    "python -m finetune ...": "a placeholder for any command",
    "accelerate launch": "needs GPUs (launch configs are parsed by tests/test_distributed.py)",
    "--accelerate": "needs GPUs (launch configs are parsed by tests/test_distributed.py)",
    "python -m pytest": "the test runner",
    "recipes/plans/": "the real models' recipes read config.json from the Hub (tests/test_plan.py plans each on "
                      "the published config kept in tests/model_configs)",
    "finetune.docs --write": "rewrites the pages' tables (tests/test_docs.py checks the pages equal its output)",
    "conformance_matrix": "runs the conformance tests (tests/test_families.py) and rewrites a page",
}
# What a command ends with when it is not 0, in README order, and why the README implies it.
EXIT_CODES = {
    # After `run`, SFT is complete with other inputs: the one-stage example is refused, naming the changed keys.
    "moetune sft recipes/tiny-moe.yaml sft.learning_rate=5e-4 sft.max_steps=50": 2,
}


PROGRAMS = ("moetune", "make", "python", ".venv/", "accelerate", "source", "hf ")


def readme_commands() -> list[str]:
    """Commands of the shell blocks of the README and the docs/ pages, in that order (plain ``` blocks starting with
    a command; not yaml, not the layout diagram), comments removed, `a / b` alternatives split."""
    return [command for page in PAGES for command in page_commands(page)]


def page_commands(page: Path) -> list[str]:
    blocks, block, language = [], None, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, language = [], line[3:].strip()
            else:
                if not language and block and block[0].startswith(PROGRAMS):  # a shell block, not a diagram
                    blocks.append("\n".join(block))
                block = None
        elif block is not None:
            block.append(line)
    commands = []
    for text in blocks:
        for line in text.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].split(" # ")[0].strip()
            commands += [part.strip() for part in command.split(" / ") if part.strip()]
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for key, why in NOT_RUN_HERE.items() if key in command), None)


def argv_for(command: str, tmp_path: Path) -> list[str]:
    """The README command as moetune's argv here: the repo's recipe shrunk, /tmp folders in tmp_path, optional
    [--flags] given."""
    words = shlex.split(command.replace("[", "").replace("]", "").replace("/tmp/", f"{tmp_path}/"))
    assert words[0] == "moetune", f"not a moetune command: {command}"
    argv = [str(REPO / word) if word.startswith("recipes/") else word for word in words[1:]]
    for word in words:
        argv += SMALL.get(word, [])
    return argv


def test_readme_commands_are_classified():
    commands = readme_commands()
    assert len(commands) > 15 and "moetune run recipes/tiny-moe.yaml" in commands
    assert "make gpu-check" in commands and any(command.startswith("accelerate launch") for command in commands)
    for command in commands:
        assert skip_reason(command) or command.startswith("moetune "), f"README command not covered: {command}"


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo recipe's run_dir (runs/tiny-moe) is relative to where moetune runs
    monkeypatch.delenv("RANK", raising=False)
    uploads = []
    for method in ("create_repo", "create_branch", "upload_folder"):  # the Hub, caught before the network
        monkeypatch.setattr(f"huggingface_hub.HfApi.{method}",
                            lambda self, *args, _method=method, **kwargs: uploads.append((_method, args, kwargs)))
    ran = []
    for command in readme_commands():
        if skip_reason(command):
            continue
        try:
            code = main(argv_for(command, tmp_path))
        except SystemExit as exit_:  # --help
            code = exit_.code
        output = capsys.readouterr()
        assert code == EXIT_CODES.get(command, 0), f"{command}\n{output.out[-2000:]}\n{output.err[-2000:]}"
        ran.append(command)
    assert len(ran) >= 12
    assert (tmp_path / "runs" / "first" / "dpo" / "adapter_model.safetensors").is_file()
    run = tmp_path / "runs" / "tiny-moe"
    assert (run / "report.md").is_file() and (run / "dpo-merged" / "model.safetensors").is_file()
    assert (tmp_path / "upload" / "dpo" / "README.md").is_file()
    assert [kwargs["repo_id"] for method, _, kwargs in uploads if method == "upload_folder"] == \
        ["me/tiny-sft", "me/tiny-dpo", "me/tiny-dpo"]


@pytest.mark.parametrize("command", ["moetune sft recipes/tiny-moe.yaml sft.learning_rate=5e-4 sft.max_steps=50"])
def test_the_expected_failures_are_still_in_the_readme(command):
    assert command in readme_commands()
