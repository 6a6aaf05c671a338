"""`moetune sft|dpo|run RECIPE --accelerate CONFIG [accelerate options]`: the training stages on many GPUs.

The shorthand re-runs moetune under `accelerate launch --config_file CONFIG ... -m finetune`, exactly the command
a TRL user would type (it is printed first). `run` keeps prep and eval in this one process, before and after the
launch, so they run once and not once per GPU.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from finetune.core import distributed
from finetune.registry import STAGES
from finetune.core.rundir import StageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
EVERY_PROCESS_STAGES = tuple(spec.name for spec in STAGES if spec.every_process)  # training: one launch runs them
SINGLE_PROCESS_STAGES = tuple(spec.name for spec in STAGES if not spec.every_process)


def config_path(name: str) -> Path:
    """A config named after a file in recipes/accelerate (ddp, zero2, zero3, fsdp2), or a path to one."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise StageError(f"--accelerate {name}: no such config file, and not one of the shipped configs ({names}) "
                     f"in {CONFIG_DIR}. Name one of those or give the path of an accelerate config file.")


def layout_of(name: str) -> str:
    """The memory layout (finetune/modeling/memory_plan.py LAYOUTS) of an accelerate config: ddp, zero2, zero3,
    fsdp2, read off a shipped config's name or a config file's distributed type and ZeRO stage; ep for the shipped
    ep config (a plain launch: the plan splits the experts where the recipe sets model.expert_parallel)."""
    if name == "ep":
        return "ep"
    config = yaml.safe_load(config_path(name).read_text()) or {}
    if config.get("distributed_type") == "DEEPSPEED":
        return "zero3" if config.get("deepspeed_config", {}).get("zero_stage") == 3 else "zero2"
    return "fsdp2" if config.get("distributed_type") == "FSDP" else "ddp"


def split_options(extra: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate options, recipe overrides) from what moetune's own parser left over.

    Options start with '-'; a following word that is neither an option nor a key=value override is its value
    (`--num-processes 8`, `--main_process_ip 10.0.0.1`). accelerate itself rejects options it does not know.
    """
    options, overrides = [], []
    for index, arg in enumerate(extra):
        follows_option = index > 0 and extra[index - 1].startswith("-") and "=" not in extra[index - 1]
        if arg.startswith("-") or (follows_option and "=" not in arg):
            options.append(arg)
        else:
            overrides.append(arg)
    return options, overrides


def launch_command(config: Path, options: list[str], recipe: str, stages: list[str], overrides: list[str],
                   force: bool) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *options,
            "-m", "finetune", "run", recipe, "--stages", ",".join(stages), *overrides, *(["--force"] if force else [])]


def launch_training(stages: list[str], args) -> None:
    command = launch_command(config_path(args.accelerate), args.accelerate_options, args.recipe, stages,
                             args.overrides, args.force)
    print("[launch] " + shlex.join(["accelerate", "launch", *command[3:]]), flush=True)
    returncode = subprocess.call(command)
    if returncode != 0:
        raise StageError(f"[{','.join(stages)}] accelerate launch exited with code {returncode}; the processes' "
                         f"messages above say why.")


def option_value(options: list[str], wanted: str) -> str | None:
    """The value of an accelerate option (`--num-machines 2`, `--num_machines=2`), or None."""
    for index, option in enumerate(options):
        name, _, value = option.partition("=")
        if name.replace("_", "-") == wanted:
            return value or options[index + 1]
    return None


def machine_count(options: list[str]) -> int:
    """The --num-machines (or --num_machines) given to accelerate; the shipped configs say 1."""
    return int(option_value(options, "--num-machines") or 1)


def machine_rank(options: list[str]) -> int:
    """The --machine-rank (or --machine_rank) given to accelerate: 0 unless this is another node's command."""
    return int(option_value(options, "--machine-rank") or 0)


def process_count(config: str, options: list[str]) -> int:
    """The processes an accelerate launch starts: --num-processes, else the config file's num_processes."""
    given = option_value(options, "--num-processes")
    if given is not None:
        return int(given)
    return int((yaml.safe_load(config_path(config).read_text()) or {}).get("num_processes", 1))


def run_with_accelerate(stages: list[str], args, run_here) -> None:
    """Prep here, the training stages in one accelerate launch, eval here: in pipeline order."""
    training = [name for name in stages if name in EVERY_PROCESS_STAGES]
    single = [name for name in stages if name in SINGLE_PROCESS_STAGES]
    if single and machine_count(args.accelerate_options) > 1:
        raise StageError(f"{', '.join(single)} would run once on every node: run `moetune prep RECIPE` once before "
                         f"and `moetune eval RECIPE` once after, and `--stages sft,dpo` on the nodes.")
    for name in stages:
        if name not in EVERY_PROCESS_STAGES:
            run_here(name)
        elif name == training[0]:
            launch_training(training, args)


def refuse_single_process_stages(stages: list[str]) -> None:
    """prep and eval are not distributed: under a launcher every process would redo them, racing on the files."""
    repeated = [name for name in stages if name in SINGLE_PROCESS_STAGES]
    if distributed.world_size() > 1 and repeated:
        raise StageError(
            f"{', '.join(repeated)} run in one process, but this is one of {distributed.world_size()} processes "
            f"(accelerate launch or torchrun). Run `moetune {repeated[0]} RECIPE` without a launcher, launch only the "
            f"training stages (`... -m finetune run RECIPE --stages sft,dpo`), or use `moetune run RECIPE "
            f"--accelerate CONFIG`, which runs prep and eval once and the training stages on every process.")
