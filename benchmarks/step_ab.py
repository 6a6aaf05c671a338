"""Two source trees' SFT steps compared under the same machine load: the trees train in lockstep, step by step.

On a shared machine runs from different periods cannot be compared (the load changes the time of a step several
times over), and even runs started one after the other see different loads. Here both trees run `moetune sft` at
once, each in its own process with PYTHONPATH at its tree, and take turns: after each optimizer step a process hands
the turn to the other (a byte through a FIFO) and waits for it back, so steps run A B A B ... and the i-th steps of
the two are neighbours in time. A step is timed from getting the turn to the trainer's on_step_end (data, forward,
backward, optimizer, callbacks), in wall time and in this process's CPU time. The report gives each tree's median
and the median of the paired ratios B/A with a bootstrap 95% interval.

Both trees' prep and base stages run first (each tree in its own run_dir under --work), as `moetune sft` needs them.

Run: python -m benchmarks.step_ab OLD_TREE NEW_TREE [--recipe recipes/tiny-moe.yaml] [--steps 24] [--skip 2]
     [--work DIR] [key=value ...]   (a tree: a checkout or `git worktree add DIR COMMIT` of moetune)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPTIMES = "STEPTIMES "


# ---------------------------------------------------------------- in each tree's process

def child(argv: list[str]) -> None:
    """Run `moetune` with `argv` in this process, taking turns with the twin after every optimizer step."""
    import torch  # here, not at the top: only the children train, the parent process stays light
    from transformers import trainer_callback

    fd_in = os.open(os.environ["STEP_AB_IN"], os.O_RDWR)  # O_RDWR: opening never blocks, nor does a write
    fd_out = os.open(os.environ["STEP_AB_OUT"], os.O_RDWR)
    record = {"tree": os.environ["PYTHONPATH"], "wall": [], "cpu": [], "load": []}
    turn = {}

    def now() -> tuple[float, float]:
        times = os.times()
        return time.perf_counter(), times.user + times.system

    def take_turn() -> None:
        os.read(fd_in, 1)
        turn["start"] = now()

    train_begin = trainer_callback.CallbackHandler.on_train_begin
    step_end = trainer_callback.CallbackHandler.on_step_end

    def on_train_begin(self, args, state, control):
        result = train_begin(self, args, state, control)
        take_turn()  # the twin may still be loading: its first step waits for this one's
        return result

    def on_step_end(self, args, state, control):
        wall, cpu = now()
        record["wall"].append(wall - turn["start"][0])
        record["cpu"].append(cpu - turn["start"][1])
        record["load"].append(os.getloadavg()[0])
        record["threads"] = torch.get_num_threads()
        result = step_end(self, args, state, control)
        os.write(fd_out, b"x")
        if state.global_step < state.max_steps:
            take_turn()
        return result

    trainer_callback.CallbackHandler.on_train_begin = on_train_begin
    trainer_callback.CallbackHandler.on_step_end = on_step_end
    atexit.register(lambda: print(STEPTIMES + json.dumps(record), flush=True))
    sys.argv = ["moetune", *argv]
    runpy.run_module("finetune", run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------- the comparison

def moetune(tree: Path, args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A Python process running `args` on `tree`'s code (PYTHONPATH wins over the venv's editable install)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, *args], cwd=tree, env=env, text=True, **kwargs)


def prepare(tree: Path, recipe: str, run_dir: Path, overrides: list[str]) -> None:
    """The prep stage (base comes with sft) of `tree` into its run_dir."""
    process = moetune(tree, ["-m", "finetune", "prep", recipe, f"run_dir={run_dir}", *overrides],
                      stdout=subprocess.DEVNULL)
    if process.wait() != 0:
        raise SystemExit(f"prep failed in {tree}")


def lockstep(trees: list[Path], recipe: str, steps: int, work: Path, overrides: list[str]) -> list[dict]:
    """Both trees' SFT in lockstep; each one's record (steps' wall and CPU seconds, load, threads)."""
    fifos = [work / "turn-a", work / "turn-b"]
    for fifo in fifos:
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    processes, logs = [], []
    for index, tree in enumerate(trees):
        run_dir = work / f"run-{index}"
        prepare(tree, recipe, run_dir, overrides)
        turns = {"STEP_AB_IN": str(fifos[index]), "STEP_AB_OUT": str(fifos[1 - index])}
        logs.append(work / f"sft-{index}.log")
        with open(logs[-1], "w") as log:  # a file, not a pipe: a full pipe would stall both processes
            processes.append(moetune(tree, [__file__, "--child", "sft", recipe, f"run_dir={run_dir}",
                                            f"sft.max_steps={steps}", "--force", *overrides],
                                     env=turns, stdout=log, stderr=subprocess.STDOUT))
    # Tree A takes the first turn. The FIFO stays open here until the end: a FIFO no process holds open loses
    # what was written to it, and the children may not have opened theirs yet.
    first = os.open(fifos[0], os.O_RDWR)
    os.write(first, b"x")
    records = []
    for tree, process, log in zip(trees, processes, logs):
        lines = [line for line in log.read_text().splitlines() if line.startswith(STEPTIMES)] \
            if process.wait() == 0 else []
        if not lines:
            for other in processes:  # the twin would wait for its turn forever
                other.kill()
            raise SystemExit(f"sft failed in {tree} (exit {process.returncode}): see {log}")
        records.append(json.loads(lines[-1][len(STEPTIMES):]))
    os.close(first)
    return records


def interval(ratios: list[float], seed: int = 0) -> tuple[float, float]:
    """A bootstrap 95% interval of the median of `ratios`."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return medians[50], medians[1949]


def report(records: list[dict], skip: int) -> str:
    a, b = records
    count = min(len(a["wall"]), len(b["wall"]))
    lines = []
    for record in records:
        wall, cpu = record["wall"][skip:count], record["cpu"][skip:count]
        lines.append(f"{record['tree']}: {record['threads']} threads, step median {statistics.median(wall):.3f} s wall, "
                     f"{statistics.median(cpu):.3f} s CPU over {len(wall)} steps; load "
                     f"{min(record['load']):.1f}-{max(record['load']):.1f}")
    for kind in ("wall", "cpu"):
        ratios = [y / x for x, y in zip(a[kind][skip:count], b[kind][skip:count])]
        low, high = interval(ratios)
        lines.append(f"B/A {kind}: paired median {statistics.median(ratios):.3f} (95% interval {low:.3f}-{high:.3f})")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, type=Path, help="tree A (the baseline) and tree B")
    parser.add_argument("--recipe", default="recipes/tiny-moe.yaml", help="relative to each tree, or absolute")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    parser.add_argument("--work", type=Path, default=None, help="run dirs and FIFOs (default: a temporary folder)")
    args, overrides = parser.parse_known_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="step-ab-"))
    work.mkdir(parents=True, exist_ok=True)
    trees = [tree.resolve() for tree in args.trees]
    print(report(lockstep(trees, args.recipe, args.steps, work.resolve(), overrides), args.skip))


if __name__ == "__main__":
    main()
