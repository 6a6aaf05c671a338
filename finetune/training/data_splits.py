"""The prepared training data a stage reads: <data_dir>/<kind>/<split>.jsonl (run_dir/data) as datasets."""

from __future__ import annotations

from pathlib import Path

from datasets import load_dataset


def load_split(data_dir: Path, kind: str, split: str):
    """A prepared split (`data_dir/<kind>/<split>.jsonl`), or None when it is absent or empty."""
    path = data_dir / kind / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return load_dataset("json", data_files=str(path), split="train")


def require_train_split(data_dir: Path, kind: str, stage: str):
    train = load_split(data_dir, kind, "train")
    if train is None:
        raise ValueError(f"[{stage}] {data_dir}/{kind}/train.jsonl is empty: the recipe's data has no "
                         f"{'SFT conversations' if kind == 'sft' else 'preference pairs'}. Add a source that makes them.")
    return train
