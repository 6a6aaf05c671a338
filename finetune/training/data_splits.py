"""The prepared training data a stage reads: run_dir/data/<kind>/<split>.jsonl as datasets."""

from __future__ import annotations

from datasets import load_dataset

from finetune.config.recipe import Recipe


def load_split(recipe: Recipe, kind: str, split: str):
    """A prepared split (`run_dir/data/<kind>/<split>.jsonl`), or None when it is absent or empty."""
    path = recipe.run_path / "data" / kind / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return load_dataset("json", data_files=str(path), split="train")


def require_train_split(recipe: Recipe, kind: str, stage: str):
    train = load_split(recipe, kind, "train")
    if train is None:
        raise ValueError(f"[{stage}] {recipe.run_path}/data/{kind}/train.jsonl is empty: the recipe's data has no "
                         f"{'SFT conversations' if kind == 'sft' else 'preference pairs'}. Add a source that makes them.")
    return train
