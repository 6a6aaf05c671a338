"""The base stage, for `model.init` recipes only: a tokenizer trained on the prepared data and a tiny MoE model
built from a config (no download), saved into run_dir/base for the training stages to start from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from finetune.core import distributed
from finetune.modeling.loading import seed_everything
from finetune.modeling.tiny import init_config, train_tokenizer
from finetune.config.recipe import Recipe
from finetune.core.rundir import Stage


def run(recipe: Recipe, needed: dict[str, dict], force: bool | str = False) -> Path:
    """Train a tokenizer on the prepared data, build the tiny model and save both into run_dir/base."""
    stage = Stage(recipe.run_path, "base", inputs=stage_inputs(recipe, needed))
    if not stage.begin(force):
        return stage.final
    # One process builds and saves the model; in a multi-process run the others wait in commit, then load it.
    outputs = write_base_model(recipe, stage.work) if distributed.is_main_process() else {}
    return stage.commit(outputs)


def stage_inputs(recipe: Recipe, needed: dict[str, dict]) -> dict:
    """What the output depends on: the model.init settings, the seed, the prepared data (the tokenizer's texts)."""
    return {"init": recipe.section_dict("model")["init"], "seed": recipe.seed, "data": needed["prep"]["fingerprint"]}


def write_base_model(recipe: Recipe, folder: Path) -> dict:
    init = recipe.model.init
    tokenizer = train_tokenizer(training_texts(recipe.run_path / "data"), init.vocab_size)
    seed_everything(recipe.seed)
    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[base] built a {init.architecture} model with {n_params:,} parameters and a {len(tokenizer)}-token tokenizer.")
    return {"kind": "full", "parameters": n_params}


def training_texts(data_dir: Path):
    """Every message text of the prepared training files: what the tiny model's tokenizer learns from."""
    for name in ("sft/train.jsonl", "preference/train.jsonl"):
        path = Path(data_dir) / name
        if not path.is_file():
            continue
        with open(path) as handle:
            for line in handle:
                row = json.loads(line)
                for key in ("messages", "prompt", "chosen", "rejected"):
                    for message in row.get(key) or []:
                        yield message["content"]
