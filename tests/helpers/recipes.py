"""Tiny recipes: the YAML recipe of the end-to-end tests and in-memory recipes for the prep stage; running them
through the CLI and reading what a stage logged."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import yaml

from finetune.cli import main
from finetune.config.parsing import parse_recipe

RECIPE = """
run_dir: {run_dir}
seed: 7
model:
  init: {{architecture: {architecture}, hidden_size: 32, intermediate_size: 32, num_layers: 1, num_experts: 4,
          experts_per_token: 2, vocab_size: 280}}
  lora: {{targets: [attention, experts], r: 4, alpha: 8, stages: [dpo]}}
data:
  sources: [{{format: synthetic, options: {{sft: 200, pairs: 80, questions: 6}}}}]
  dedup: exact
sft: {{max_steps: 6, per_device_train_batch_size: 8, learning_rate: 1.0e-3, logging_steps: 2, max_length: 128}}
dpo: {{max_steps: 3, per_device_train_batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1, max_length: 128}}
eval: {{models: [base, sft, dpo], max_new_tokens: 8, batch_size: 8}}
"""

# The router's load-balancing loss is computed per forward pass (per process, or per accumulation step) and is not
# linear in the batch, so a run whose forward passes see other batches trains differently (measured: 2e-3 max
# difference, 2% of the SFT weights' norm, 20% of the young DPO adapter's), exactly as a 1-process run with
# accumulation would. Multi-process runs compared with one process therefore run without it.
NO_AUX_LOSS = ["sft.router_aux_loss_coef=0", "dpo.router_aux_loss_coef=0"]


def write_recipe(tmp_path, architecture="mixtral"):
    """tiny.yaml in `tmp_path`: a model.init MoE, synthetic data, a few SFT and DPO steps; its run dir is tmp_path/run."""
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(run_dir=tmp_path / "run", architecture=architecture))
    return path


def make_recipe(tmp_path, sources, **data):
    """A model.init recipe whose data section has these sources (and data settings), for the prep stage."""
    raw = {"run_dir": str(tmp_path / "run"), "model": {"init": {}}, "data": {"sources": sources, **data}}
    return parse_recipe(raw, str(tmp_path / "recipe.yaml"))


LOOKALIKE_RECIPE = """
run_dir: {run_dir}
seed: 7
model:
  name_or_path: {folder}
  lora: {{r: 4, alpha: 8}}
{template}data:
  sources: [{{format: synthetic, options: {{sft: 24, pairs: 12, questions: 2}}}}]
  dedup: exact
  test_size: 0
sft: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1, max_length: 320}}
dpo: {{max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-3, logging_steps: 1, max_length: 320}}
eval: {{models: [dpo], max_new_tokens: 4, batch_size: 2}}
"""


def write_lookalike_recipe(tmp_path: Path, folder: Path, template: Path | None = None,
                           targets: tuple[str, ...] | None = ("attention", "experts"), **sections) -> Path:
    """recipe.yaml in `tmp_path` for a look-alike checkpoint folder (helpers.lookalike): LoRA on `targets` (None: the
    default roles), a few steps of each stage; `template`: a chat template file for a model without one; `sections`:
    what to change (see `update_recipe`)."""
    path = tmp_path / "recipe.yaml"
    line = f"  chat_template: {template}\n" if template else ""
    path.write_text(LOOKALIKE_RECIPE.format(run_dir=tmp_path / "run", folder=folder, template=line))
    lora = {"lora": {"targets": list(targets)}} if targets else {}
    return update_recipe(path, **merged({"model": lora}, sections))


# LoRA SFT -> LoRA DPO with the default roles on a 4-layer model.init of any family (dense-then-MoE layouts and
# hybrid layers appear): tests/test_lora_chain.py, tests/test_every_family.py (through write_lora_chain_recipe),
# tests/test_packed_hybrids.py.
LORA_CHAIN_RECIPE = """
run_dir: {run_dir}
seed: 7
model:
  init: {{architecture: {architecture}, hidden_size: 64, intermediate_size: 64, num_layers: 4, num_heads: 4,
          num_kv_heads: 2, num_experts: 4, experts_per_token: 2, vocab_size: 280}}
  lora: {{r: 4, alpha: 8, stages: [sft, dpo]}}
data:
  sources: [{{format: synthetic, options: {{sft: 24, pairs: 12, questions: 2}}}}]
  test_size: 0
sft: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-2, logging_steps: 1, max_length: 128}}
dpo: {{max_steps: 1, per_device_train_batch_size: 2, learning_rate: 1.0e-3, logging_steps: 1, max_length: 128}}
"""


def write_lora_chain_recipe(tmp_path: Path, architecture: str, num_layers: int = 4, **sections) -> Path:
    """recipe.yaml in `tmp_path`: a model.init MoE of `num_layers` layers (more than 2, so dense-then-MoE layouts and
    shared experts appear), LoRA in SFT and DPO with the default roles, a few steps; `sections`: what to change (see
    `update_recipe`). Its run dir is tmp_path/run."""
    path = tmp_path / "recipe.yaml"
    path.write_text(LORA_CHAIN_RECIPE.format(run_dir=tmp_path / "run", architecture=architecture))
    return update_recipe(path, **merged({"model": {"init": {"num_layers": num_layers}}}, sections))


def update_recipe(path: Path, **sections) -> Path:
    """The recipe at `path` with `sections` merged in: a mapping into the section's mapping (key by key, nested
    mappings too), anything else in place of the value."""
    if sections:
        path.write_text(yaml.safe_dump(merged(yaml.safe_load(path.read_text()), sections), sort_keys=False))
    return path


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` on top, mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def logged(stage_dir: Path, key: str = "loss") -> list[float]:
    """The values of `key` a stage logged step by step (its metrics.json), in order."""
    return [entry[key] for entry in json.loads((stage_dir / "metrics.json").read_text()) if key in entry]


def run_cli(argv: list[str], expect: int = 0) -> str:
    """`moetune ARGV` in this process; what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == expect, f"moetune {' '.join(argv)} exited {code}:\n{err.getvalue()[-3000:]}"
    return out.getvalue() + err.getvalue()
