"""kill -9 and resume with experts held by several processes each: 4 gloo CPU processes, model.expert_parallel 2.

tests/test_expert_parallel.py::test_killed_split_run_resumes_to_the_same_weights runs this on 2 processes (each
expert on one process). Here each expert is FSDP-sharded over its 2 holders (processes 0 and 2 hold experts 0-1, 1 and
3 experts 2-3): full fine-tuning's weights and Adam moments are split twice (experts, then FSDP), and the experts' LoRA
factors live on both holders (each process 1,280 of the test model's 2,560 elements), their gradients summed over
them. For each stage: an uninterrupted run, and a run SIGKILLed (launcher and all 4 processes) after step 7 with a
checkpoint every step, then re-run to resume; the stage's adapter (with --layout full, its weights) must be
bit-identical and its logged losses equal. DPO starts from the same uninterrupted SFT in both run dirs. Not in the
test suite (4 processes take minutes on 2 cores); run it by hand:

    python -m benchmarks.ep_resume4 [--layout lora|full] [--stages sft,dpo] [--work DIR]

Measured on this 2-core CPU (2026-12-06), both layouts, both stages: bit-identical (max abs difference 0) with equal
losses over 12 steps, resumed from checkpoint-6; each 4-process run about 22-35 s, a layout's SFT and DPO about 4 min.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.recipes import write_recipe  # noqa: E402
from test_expert_parallel import EP, EP_LORA, history, kill_whole_run, run_subprocess  # noqa: E402

PROCESSES = 4
KILL_AFTER = 7  # logged steps; a checkpoint is sealed at every step
# what trains, on which model, and the file the stage saves: the test's two layouts
LAYOUTS = {"lora": (EP_LORA, "qwen2_moe", "adapter_model.safetensors"), "full": (EP, "qwen3_moe", "model.safetensors")}
SCHEDULE = {stage: [f"{stage}.max_steps=12", f"{stage}.logging_steps=1", "checkpoints.every_minutes=0.0005"]
            for stage in ("sft", "dpo")}


def launch(recipe: Path, stages: str, *overrides: str, port: int) -> list[str]:
    return [sys.executable, "-m", "finetune", "run", str(recipe), "--stages", stages, "--accelerate", "ep",
            "--num-processes", str(PROCESSES), "--main-process-port", str(port), *overrides]


def timed(what: str, action):
    start = time.time()
    result = action()
    print(f"  {what}: {time.time() - start:.0f} s", flush=True)
    return result


def compare_stage(work: Path, stage: str, layout: str, port: int) -> bool:
    trained, architecture, saved = LAYOUTS[layout]
    recipes = {}
    for name in ("whole", "killed"):
        (work / stage / name).mkdir(parents=True)
        recipes[name] = write_recipe(work / stage / name, architecture=architecture)
    for name, recipe in recipes.items():
        run_subprocess([sys.executable, "-m", "finetune", "prep", str(recipe)])
        if stage == "dpo":  # DPO starts from the same uninterrupted LoRA SFT in both
            timed(f"sft before dpo ({name})", lambda: run_subprocess(launch(recipe, "sft", *trained, port=port)))
    overrides = [*trained, *SCHEDULE[stage]]
    timed(f"{stage} uninterrupted", lambda: run_subprocess(launch(recipes["whole"], stage, *overrides, port=port + 1)))
    log = work / stage / "killed.log"
    timed(f"{stage} killed after step {KILL_AFTER}",
          lambda: kill_whole_run(launch(recipes["killed"], stage, *overrides, port=port + 2), KILL_AFTER, log))
    partial = work / stage / "killed" / "run" / f".{stage}.partial"
    sealed = sorted(path.name for path in partial.glob("checkpoint-*") if (path / "optimizer_shards").is_dir())
    shards = sorted(path.name for path in (partial / sealed[-1] / "optimizer_shards").iterdir()) if sealed else []
    print(f"  checkpoints with optimizer shards left by the killed run: {sealed}; the newest holds {shards}")
    out = timed(f"{stage} re-run", lambda: run_subprocess(launch(recipes["killed"], stage, *overrides, port=port + 3)))
    resumed = [line for line in out.splitlines() if "resuming from" in line]
    print(f"  {resumed[0].strip() if resumed else 'NO RESUME LINE'}")
    for line in out.splitlines():  # the layout each process reports: its experts, its part of their factors
        if f"[{stage}] process " in line and "experts" in line or "elements of the routed experts" in line:
            print(f"  {line.strip()}")
    whole = load_file(str(work / stage / "whole/run" / stage / saved))
    killed = load_file(str(work / stage / "killed/run" / stage / saved))
    difference = max((whole[name] - killed[name]).abs().max().item() for name in whole)
    equal = whole.keys() == killed.keys() and all(torch.equal(whole[name], killed[name]) for name in whole)
    losses = [history(work / stage / name / "run", stage, "loss") for name in ("whole", "killed")]
    print(f"  {stage}: {saved} max abs difference {difference:.3g} ({len(whole)} tensors, bit-identical: {equal}); "
          f"losses equal: {losses[0] == losses[1]} ({len(losses[0])} logged, {losses[0][0][1]:.4f} at step "
          f"{losses[0][0][0]} to {losses[0][-1][1]:.4f} at step {losses[0][-1][0]})")
    if losses[0] != losses[1]:
        print(f"    uninterrupted {losses[0]}\n    resumed       {losses[1]}")
    return equal and losses[0] == losses[1] and bool(resumed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="sft,dpo")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="lora",
                        help="lora: LoRA on attention, routed and shared experts (Qwen2-MoE); full: full fine-tuning")
    parser.add_argument("--work", type=Path, default=None, help="where the run dirs go (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ep_resume4-"))
    ok = True
    for index, stage in enumerate(args.stages.split(",")):
        print(f"{stage}: {PROCESSES} processes, model.expert_parallel 2, {args.layout} (work: {work / stage})",
              flush=True)
        ok &= compare_stage(work, stage, args.layout, port=29700 + 10 * index)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
