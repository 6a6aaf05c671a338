"""The command line: `moetune <stage> RECIPE [key=value ...]`. The only module that knows about argv."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

from finetune import hub, launch
from finetune.fields import describe_fields
from finetune.pipeline import run_stage, wait_for_uploads
from finetune.preflight import check_before_running
from finetune.recipe import TRAINING_STAGES, Recipe, RecipeError
from finetune.recipe_parsing import load_recipe, trainer_config_class
from finetune.registry import BY_NAME, COMMANDS, STAGES, command_writing
from finetune.rundir import MissingStageOutput, StageError

HUB_COMMANDS = ("merge", "push")


def section_help(sections: tuple[str, ...]) -> str:
    """Every recipe key a stage reads, with its help text, for the stage's --help."""
    hints = {f.name: f for f in dataclasses.fields(Recipe)}
    lines = ["recipe keys (set in the YAML file or as dotted key=value overrides):",
             f"  {'run_dir':<34} {hints['run_dir'].metadata['help']}",
             f"  {'seed':<34} {hints['seed'].metadata['help']}"]
    for section in sections:
        if section in TRAINING_STAGES:
            name = trainer_config_class(section).__name__
            lines.append(f"  {section + '.*':<34} Any field of TRL's {name}; list them with "
                         f"`moetune {section} --trl-fields`. moetune's defaults: fp32 and use_cpu on CPU, bf16 on "
                         f"GPUs that support it, activation checkpointing on GPU only, report_to none, logging_steps 10.")
            continue
        section_type = Recipe.__dataclass_fields__[section].default_factory
        for key, _, text in describe_fields(section_type, section + "."):
            wrapped = textwrap.fill(text, 80, subsequent_indent=" " * 37)
            lines.append(f"  {key:<34} {wrapped}")
    return "\n".join(lines)


def trl_fields_help(section: str) -> str:
    config_class = trainer_config_class(section)
    rows = []
    for f in dataclasses.fields(config_class):
        if f.init and f.name not in ("output_dir", "seed"):
            text = " ".join(str(f.metadata.get("help", "")).split())
            rows.append(f"  {section}.{f.name} (default {f.default!r}): {text}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune",
        description="Preference fine-tuning (SFT then DPO) for Mixture-of-Experts models, driven by YAML recipes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  moetune run recipes/tiny-moe.yaml\n"
               "  moetune sft recipes/tiny-moe.yaml sft.learning_rate=5e-4 sft.max_steps=50\n"
               "  moetune dpo --help",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help=f"Run the recipe's stages in order: {', '.join(COMMANDS)}.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=section_help(tuple(dict.fromkeys(s for spec in STAGES for s in spec.sections))))
    add_recipe_arguments(run)
    run.add_argument("--stages", default=",".join(COMMANDS),
                     help="Comma-separated stages to run, in pipeline order (default: %(default)s).")
    add_accelerate_argument(run)
    for name in COMMANDS:
        spec = BY_NAME[name]
        stage = commands.add_parser(name, help=spec.description, description=spec.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog=section_help(spec.sections))
        add_recipe_arguments(stage)
        if name in TRAINING_STAGES:
            stage.add_argument("--trl-fields", action="store_true",
                               help=f"List every TRL field the {name}: section accepts, with its help, and exit.")
            add_accelerate_argument(stage)
    add_hub_commands(commands)
    return parser


def add_hub_commands(commands) -> None:
    merge = commands.add_parser("merge", help="Merge an adapter into its full-precision base and save plain weights.",
                                description="Merge an adapter (a moetune stage folder or any PEFT adapter folder) into "
                                            "its full-precision base model; save the weights and tokenizer to --out.")
    merge.add_argument("adapter_dir", help="Adapter folder, e.g. runs/tiny/dpo.")
    merge.add_argument("--out", required=True, help="New (or empty) folder for the merged model.")
    push = commands.add_parser("push", help="Upload a stage's output with a model card to the Hugging Face Hub.",
                               description="Upload a stage folder (weights or adapter, tokenizer, recipe.yaml, "
                                           "README.md model card). The token comes from HF_TOKEN or `hf auth login`.")
    push.add_argument("stage_dir", help="Stage folder, e.g. runs/tiny/dpo.")
    push.add_argument("--repo-id", required=True, help="Hub repository, e.g. my-org/mixtral-dpo-lora.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--revision", help="Branch to upload to (created when missing).")
    push.add_argument("--dry-run", metavar="FOLDER", help="Only write the upload into FOLDER; upload nothing.")


def run_hub_command(args) -> None:
    if args.command == "merge":
        hub.merge(args.adapter_dir, args.out)
    else:
        hub.push(args.stage_dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="Path to a YAML recipe, e.g. recipes/tiny-moe.yaml.")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Dotted overrides of recipe keys, e.g. sft.max_steps=50 model.lora.r=8.")
    parser.add_argument("--force", action="store_true",
                        help="Redo stages whose outputs are already complete (replaces those outputs).")


def add_accelerate_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accelerate", metavar="CONFIG",
                        help="Run the training stages on several GPUs under `accelerate launch` with this config: "
                             "ddp, zero2, zero3, fsdp2 (recipes/accelerate/) or a path. Options after it go to "
                             "accelerate, e.g. --num-processes 8, --num-machines 2 --machine-rank 0 "
                             "--main-process-ip HOST. `run` keeps prep and eval in one process.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow flags (`moetune sft r.yaml --force sft.max_steps=5`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if args.command in HUB_COMMANDS:
        # These take no recipe: parse strictly.
        args = parser.parse_args(argv)
        return report_errors(lambda: run_hub_command(args))
    args.accelerate_options = []
    if getattr(args, "accelerate", None):
        args.accelerate_options, extra = launch.split_options(extra)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = (getattr(args, "overrides", None) or []) + extra
    if getattr(args, "trl_fields", False):
        print(trl_fields_help(args.command))
        return 0
    if args.recipe is None:
        parser.parse_args([args.command, "--help"])
    return report_errors(lambda: run_stages(args))


def run_stages(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    stages = parse_stages(args.stages) if args.command == "run" else [args.command]
    check_before_running(recipe, stages)
    try:
        if getattr(args, "accelerate", None):
            launch.run_with_accelerate(stages, args, lambda name: run_stage(name, recipe, args.force))
            return
        launch.refuse_single_process_stages(stages)
        for name in stages:
            run_stage(name, recipe, args.force)
    finally:
        wait_for_uploads()  # `hub.push` uploads run beside the later stages; a failed stage keeps them too


def report_errors(command) -> int:
    """Run a command; expected failures print one `moetune: error:` line and exit 2 instead of a traceback."""
    try:
        command()
    except MissingStageOutput as error:
        print(f"moetune: error: {error.message(command_writing(error.folder.name))}", file=sys.stderr)
        return 2
    except (RecipeError, StageError, ValueError, OSError) as error:  # OSError: a file or model a library could not open
        print(f"moetune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the stages that keep work (training, eval) say where; the rest start over
        print("moetune: error: interrupted. Run the same command again: finished stages are kept and skipped.",
              file=sys.stderr)
        return 2
    return 0


def parse_stages(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMMANDS]
    if unknown:
        raise RecipeError(f"--stages: unknown stage {unknown[0]!r}; stages are {', '.join(COMMANDS)}.")
    return [name for name in COMMANDS if name in names]


if __name__ == "__main__":
    sys.exit(main())
