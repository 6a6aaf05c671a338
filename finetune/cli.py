"""The command line: `moetune <stage> RECIPE [key=value ...]`. The only module that knows about argv.

It answers at once: parsing the arguments, --help and reading the recipe need only the recipe schema and the stage
registry. The training stack (torch, transformers, peft, trl), which takes seconds to import, comes in with the
modules that run stages, imported by the functions below once the arguments and the recipe are known to be good.
(TRL's config classes, against which the sft: and dpo: sections are checked, are the exception: reading a recipe
with those sections imports them.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import textwrap
from pathlib import Path

from finetune import launch
from finetune.config.parsing import MANAGED_TRAINER_KEYS, load_recipe, trainer_config_class, trainer_config_name
from finetune.config.recipe import EXPORT_FORMATS, TRAINING_STAGES, Recipe, RecipeError
from finetune.config.secrets import is_credential_key
from finetune.config.section_fields import describe_fields
from finetune.core import distributed
from finetune.core.run_lock import run_dir_lock
from finetune.core.rundir import Interrupted, MissingStageOutput, StageError, changed_keys, fingerprint, read_manifest
from finetune.registry import BY_NAME, COMMANDS, STAGES, command_writing

FOLDER_COMMANDS = ("merge", "export", "push", "report")  # commands on folders, without a recipe


def section_help(sections: tuple[str, ...]) -> str:
    """Every recipe key a stage reads, with its help text, for the stage's --help."""
    hints = {f.name: f for f in dataclasses.fields(Recipe)}
    lines = ["recipe keys (set in the YAML file or as dotted key=value overrides):",
             key_help("run_dir", hints["run_dir"].metadata["help"]), key_help("seed", hints["seed"].metadata["help"])]
    for section in sections:
        if section in TRAINING_STAGES:
            name = trainer_config_name(section)
            lines.append(key_help(f"{section}.*", f"Any field of TRL's {name}; list them with "
                         f"`moetune {section} [RECIPE] --trl-fields`. moetune's defaults: fp32 and use_cpu on CPU, "
                         f"bf16 on GPUs that support it, activation checkpointing on GPU only, report_to none, "
                         f"logging_steps 10, save_total_limit 2 (checkpoints: see checkpoints.every_minutes)."))
            continue
        section_type = Recipe.__dataclass_fields__[section].default_factory
        lines += [key_help(key, text) for key, _, text in describe_fields(section_type, section + ".")]
    return "\n".join(lines)


KEY_COLUMN = 34
HELP_WIDTH = 100


def key_help(key: str, text: str) -> str:
    """`  key   help` with the help wrapped in its own column, every line within HELP_WIDTH characters."""
    indent = " " * (KEY_COLUMN + 3)
    wrapped = textwrap.wrap(text, HELP_WIDTH - len(indent)) or [""]
    first = f"  {key:<{KEY_COLUMN}} {wrapped[0]}" if len(key) <= KEY_COLUMN else f"  {key}\n{indent}{wrapped[0]}"
    return "\n".join([first, *(indent + line for line in wrapped[1:])])


def trl_fields_help(section: str, recipe: Recipe) -> str:
    """Every field of TRL's config for `section`, with the default moetune applies for `recipe` on this machine."""
    from finetune.training.trainer_config import moetune_defaults  # the training stack: see the module's docstring

    ours = moetune_defaults(recipe.trainer_settings(section))
    every = recipe.checkpoints.every_minutes
    rows = [f"Defaults are moetune's for this recipe on this machine (use_cpu, bf16 and gradient_checkpointing follow "
            f"the device). Checkpoints: every {every} minutes (checkpoints.every_minutes) and on SIGTERM/Ctrl-C, plus "
            f"TRL's step schedule when save_strategy is set."]
    for f in dataclasses.fields(trainer_config_class(section)):
        if f.init and f.name not in MANAGED_TRAINER_KEYS and not is_credential_key(f.name):
            text = " ".join(str(f.metadata.get("help", "")).split())
            default = (f"moetune default {ours[f.name]!r}; TRL's {f.default!r}" if f.name in ours
                       else f"default {f.default!r}")
            if f.name in getattr(recipe, section):
                default = f"recipe sets {getattr(recipe, section)[f.name]!r}; {default}"
            rows.append(f"  {section}.{f.name} ({default}): {text}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune",
        description="Preference fine-tuning of Mixture-of-Experts language models, driven by a YAML recipe.\n\n"
                    "A recipe names a model (a Hub model or a tiny one built from a config), training data, and\n"
                    "settings per stage. moetune prepares the data (prep), fine-tunes with SFT then DPO, LoRA\n"
                    "adapters reaching the fused expert weights (sft, dpo), and has each model answer held-out\n"
                    "questions for a judge (eval); each stage writes a folder of the recipe's run_dir, and a stage\n"
                    "whose inputs did not change is skipped. merge, push and report work on a run's folders.\n"
                    "Documentation: README.md and docs/ (make docs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  moetune run recipes/tiny-moe.yaml\n"
               "  moetune sft recipes/tiny-moe.yaml sft.learning_rate=5e-4 sft.max_steps=50\n"
               "  moetune dpo --help\n"
               "every recipe key, with its help: moetune run --help (a stage's own keys: moetune STAGE --help)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help=f"Run the recipe's stages in order: {', '.join(COMMANDS)}.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=section_help(tuple(dict.fromkeys(s for spec in STAGES for s in spec.sections))))
    add_recipe_arguments(run)
    run.add_argument("--stages", default=",".join(COMMANDS),
                     help="Comma-separated stages to run, in pipeline order (default: %(default)s).")
    add_accelerate_argument(run)
    add_memory_argument(run)
    for name in COMMANDS:
        spec = BY_NAME[name]
        stage = commands.add_parser(name, help=spec.description, description=spec.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog=section_help(spec.sections))
        add_recipe_arguments(stage)
        if name in TRAINING_STAGES:
            stage.add_argument("--trl-fields", action="store_true",
                               help=f"List every TRL field the {name}: section accepts, with its help and moetune's "
                                    f"default (for RECIPE when given), and exit.")
            add_accelerate_argument(stage)
            add_memory_argument(stage)
    add_hub_commands(commands)
    add_plan_command(commands)
    return parser


def add_plan_command(commands) -> None:
    plan = commands.add_parser(
        "plan", help="Memory per GPU and time per epoch of the recipe's training stages, from the model's config.",
        description="Plan the recipe's training stages from the model's config alone (a model on the meta device: "
                    "no weights read): parameters by role, memory per GPU by component for the layout, time per "
                    "epoch from the prepared data's tokens, and the cheapest change where it does not fit. Without "
                    "--gpus or --gpu-memory it plans for this machine (its GPU, or on a CPU the host's RAM). The "
                    "same plan runs before sft and dpo, which refuse a run that does not fit (plan.refuse).")
    add_recipe_arguments(plan)
    plan.add_argument("--gpus", metavar="NxKIND", help="GPUs, e.g. 8xH100-80GB; kinds: H100-80GB, H200, A100-80GB, A100-40GB, "
                                                           "L40S, RTX4090, A10G.")
    plan.add_argument("--gpu-memory", metavar="SIZE", help="Memory per GPU, e.g. 24GiB (with --num-processes).")
    plan.add_argument("--num-processes", type=int, metavar="N", help="Processes (GPUs) the run uses (default 1).")
    plan.add_argument("--accelerate", metavar="CONFIG", help="Layout of the launch: ddp, zero2, zero3, fsdp2, ep "
                                                             "(with model.expert_parallel; recipes/accelerate/) or a "
                                                             "config file's path.")
    plan.add_argument("--json", action="store_true", help="Print the same figures as JSON.")


def run_plan(args) -> None:
    from finetune.training import stage_plan  # the training stack: see the module's docstring

    recipe = load_recipe(args.recipe, args.overrides)
    if args.gpus and (args.gpu_memory or args.num_processes):
        raise RecipeError("--gpus names the GPUs and their count: give it, or --gpu-memory with --num-processes.")
    layout = launch.layout_of(args.accelerate) if args.accelerate else "ddp"
    target = stage_plan.make_target(recipe, args.gpus, args.gpu_memory, args.num_processes, layout)
    stage_plan.plan_command(recipe, target, args.json)


def add_hub_commands(commands) -> None:
    merge = commands.add_parser("merge", help="Merge an adapter into its full-precision base and save plain weights.",
                                description="Merge an adapter (a moetune stage folder or any PEFT adapter folder) into "
                                            "its full-precision base model; save the weights and tokenizer to --out.")
    merge.add_argument("adapter_dir", help="Adapter folder, e.g. runs/tiny/dpo.")
    merge.add_argument("--out", required=True, help="New (or empty) folder for the merged model.")
    exporter = commands.add_parser("export", help="Write an adapter as vLLM, SGLang or PEFT load it, or merged.",
                                   description="Write a trained adapter (a chain sft -> dpo as one adapter) as a "
                                               "server loads it: peft, vllm, sglang, or merged full weights.")
    exporter.add_argument("stage_dir", help="Adapter stage folder, e.g. runs/tiny/dpo (a chain sft -> dpo exports as "
                                            "one adapter on the base).")
    exporter.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="What to write (see the README's "
                                                                                 "Serving section).")
    exporter.add_argument("--out", required=True, help="New (or empty) folder for the export.")
    push = commands.add_parser("push", help="Upload stage outputs with model cards to the Hugging Face Hub.",
                               description="Upload stage folders (weights or adapter, tokenizer, recipe.yaml, "
                                           "README.md model card), parents first; an uploaded adapter names its "
                                           "base by Hub id. The token comes from HF_TOKEN or `hf auth login`.")
    push.add_argument("stage_dir", nargs="+", help="Stage folders, e.g. runs/tiny/dpo, or a chain: runs/tiny/sft "
                                                   "runs/tiny/dpo.")
    push.add_argument("--repo-id", required=True, help="Hub repository, e.g. my-org/mixtral-dpo-lora; with several "
                                                       "stages it holds {stage}, e.g. my-org/mixtral-{stage}.")
    push.add_argument("--parent-repo-id", help="Hub id the first stage's parent was pushed to earlier (an adapter's "
                                               "base), e.g. my-org/mixtral-sft.")
    push.add_argument("--format", choices=EXPORT_FORMATS, help="Upload the stage as this servable export (moetune "
                                                               "export) instead of as trained; the card's Serving "
                                                               "section gives the vllm/sglang command.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--revision", help="Branch to upload to (created when missing).")
    push.add_argument("--dry-run", metavar="FOLDER", help="Only write the upload into FOLDER (with several stages, "
                                                          "one subfolder each); upload nothing.")
    report = commands.add_parser("report", help="Rebuild run_dir/report.md and its plots from a run's files.",
                                 description="Rebuild RUN_DIR/report.md: SFT and DPO curves (loss, rewards, margins, "
                                             "accuracies, aux loss), expert load per layer over steps, eval scores.")
    report.add_argument("run_dir", help="A run folder, e.g. runs/tiny-moe.")


def run_folder_command(args) -> None:
    # The stage modules that do the work, imported once the arguments are good: see the module's docstring.
    from finetune.stages import export, hub
    from finetune.stages.report import write_report

    if args.command == "report":
        if not Path(args.run_dir).is_dir():
            raise ValueError(f"{args.run_dir}: no such run folder (the run_dir of a recipe, e.g. runs/tiny-moe).")
        print(f"[report] wrote {write_report(args.run_dir)}")
    elif args.command == "merge":
        hub.merge(args.adapter_dir, args.out)
    elif args.command == "export":
        export.export(args.stage_dir, args.format, args.out)
    else:
        exporter = functools.partial(export.export_for_hub, fmt=args.format) if args.format else None
        hub.push(args.stage_dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
                 parent_repo_id=args.parent_repo_id, exporter=exporter)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="Path to a YAML recipe, e.g. recipes/tiny-moe.yaml.")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Dotted overrides of recipe keys, e.g. sft.max_steps=50 model.lora.r=8.")
    parser.add_argument("--force", action="store_true",
                        help="Redo stages whose outputs are already complete (replaces those outputs).")


def add_accelerate_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accelerate", metavar="CONFIG",
                        help="Run the training stages on several GPUs under `accelerate launch` with this config: "
                             "ddp, ep, zero2, zero3, fsdp2 (recipes/accelerate/) or a path. Options after it go to "
                             "accelerate, e.g. --num-processes 8, --num-machines 2 --machine-rank 0 "
                             "--main-process-ip HOST. `run` keeps prep and eval in one process.")


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="Memory per device the training stages' plan is checked against, e.g. 24GiB (sets "
                             "plan.memory; default: this GPU's, or the host's RAM). A run planned over it stops "
                             "before loading the model; `moetune plan RECIPE` shows the plan.")


def run_target(recipe: Recipe, args) -> "stage_plan.Target":
    """The machine the training stages will run on: this one, or the accelerate launch's processes and layout."""
    from finetune.training import stage_plan  # the training stack: see the module's docstring

    accelerate = getattr(args, "accelerate", None)
    processes = launch.process_count(accelerate, args.accelerate_options) if accelerate else None
    return stage_plan.make_target(recipe, gpu_memory=getattr(args, "gpu_memory", None), processes=processes,
                                  layout=launch.layout_of(accelerate) if accelerate else None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow flags (`moetune sft r.yaml --force sft.max_steps=5`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if args.command in FOLDER_COMMANDS:
        # These take no recipe: parse strictly.
        args = parser.parse_args(argv)
        return report_errors(lambda: run_folder_command(args))
    args.accelerate_options = []
    if getattr(args, "accelerate", None) and args.command != "plan":
        args.accelerate_options, extra = launch.split_options(extra)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = (getattr(args, "overrides", None) or []) + extra
    if getattr(args, "trl_fields", False):  # for the recipe when one is given
        return report_errors(lambda: print(trl_fields_help(args.command, load_recipe(args.recipe, args.overrides)
                                                           if args.recipe else Recipe(run_dir=""))))
    if args.recipe is None:
        parser.error(f"{args.command} needs a recipe, e.g. `moetune {args.command} recipes/tiny-moe.yaml`; "
                     f"its keys: `moetune {args.command} --help`.")
    if args.command == "plan":
        return report_errors(lambda: run_plan(args))
    code = report_errors(lambda: run_stages(args))
    if code == 0:  # a failed process is stopped by its launcher, which stops the others: no one to wait for
        distributed.leave()
    return code


def run_stages(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    # What runs the stages, imported once the recipe is good: see the module's docstring.
    from finetune.preflight import check_before_running

    stages = parse_stages(args.stages) if args.command == "run" else [args.command]
    check_before_running(recipe, stages, run_target(recipe, args))
    with writing(recipe, args):
        run_locked(stages, recipe, args)


def writing(recipe: Recipe, args):
    """The run folder's lock, held by the command that writes it: under a launcher, by rank 0's process (with
    `--accelerate`, by the launching command; on several machines, machine rank 0's)."""
    other_machine = getattr(args, "accelerate", None) and launch.machine_rank(args.accelerate_options) != 0
    if other_machine or not distributed.is_main_process():
        return contextlib.nullcontext()
    return run_dir_lock(recipe.run_path)


def run_locked(stages: list[str], recipe: Recipe, args) -> None:
    from finetune.pipeline import wait_for_uploads

    try:
        if getattr(args, "accelerate", None):
            launch.run_with_accelerate(stages, args, lambda name: run_checked(name, recipe, args.force, stages))
            return
        launch.refuse_single_process_stages(stages)
        force = args.force
        if force and args.command == "run":
            print_force_plan(recipe, stages)
            force = "stale"  # `run --force` keeps the stages whose inputs did not change
        for name in stages:
            run_checked(name, recipe, force, stages)
    finally:
        wait_for_uploads()  # `hub.push` uploads run beside the later stages; a failed stage keeps them too


def run_checked(name: str, recipe: Recipe, force: bool | str, stages: list[str]) -> None:
    from finetune.pipeline import run_stage
    from finetune.preflight import check_prepared

    run_stage(name, recipe, force)
    if name == "prep":
        check_prepared(recipe, stages)  # what the later stages need of prep's output, before any of them trains


def force_plan(recipe: Recipe, stages: list[str]) -> list[tuple[str, str]]:
    """(stage, why) for each stage `run --force` redoes: those whose inputs changed, and every stage after one."""
    plan, redone = [], None
    for name in stages:
        spec = BY_NAME[name]
        manifest = read_manifest(recipe.run_path / spec.folder)
        if manifest is None:
            continue  # not done yet: it runs anyway, and is no redo
        if redone is not None:
            plan.append((name, f"after {redone}"))
            continue
        try:
            inputs = spec.inputs(recipe)
        except StageError:
            continue  # an earlier stage is missing; it runs first and this one is checked then
        if fingerprint(inputs) != manifest["fingerprint"]:
            changed = changed_keys(manifest.get("inputs", {}), inputs)
            plan.append((name, f"changed: {', '.join(changed) or 'unknown'}"))
            redone = name
    return plan


def print_force_plan(recipe: Recipe, stages: list[str]) -> None:
    plan = force_plan(recipe, stages)
    kept = [name for name in stages if name not in dict(plan)
            and read_manifest(recipe.run_path / BY_NAME[name].folder) is not None]
    redo = "; ".join(f"{name} ({why})" for name, why in plan) or "nothing (no stage's inputs changed)"
    print(f"--force: redoing {redo}" + (f"; keeping {', '.join(kept)} (same inputs)" if kept else "") + ".",
          flush=True)


def report_errors(command) -> int:
    """Run a command; expected failures print one `moetune: error:` line and exit 2 instead of a traceback."""
    try:
        command()
    except MissingStageOutput as error:
        print(f"moetune: error: {error.message(command_writing(error.folder.name))}", file=sys.stderr)
        return 2
    except Interrupted as error:  # training and eval saved their work and say where
        print(f"moetune: error: {error}", file=sys.stderr)
        return 128 + error.signum
    except (RecipeError, StageError, ValueError, OSError) as error:  # OSError: a file or model a library could not open
        print(f"moetune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the other stages start over; 130 = 128 + SIGINT, what shells expect of Ctrl-C
        print("moetune: error: interrupted. Run the same command again: finished stages are kept and skipped.",
              file=sys.stderr)
        return 130
    return 0


def parse_stages(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMMANDS]
    if unknown:
        raise RecipeError(f"--stages: unknown stage {unknown[0]!r}; stages are {', '.join(COMMANDS)}.")
    return [name for name in COMMANDS if name in names]


if __name__ == "__main__":
    sys.exit(main())
