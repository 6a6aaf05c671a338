"""Reference log-probs computed once and reused by every run whose reference pass would give the same numbers.

TRL's `precompute_ref_log_probs` stores the reference pass next to the dataset's cache files, named by a hash of the
model and the dataset's fingerprint. That fingerprint covers the whole DPOConfig (TRL's length filter closes over
it), so a new output_dir, beta or learning rate computes the pass again. Here the data part of the key is what the
reference log-probs depend on: the tokenized pairs' content and the batch layout (the collator's settings:
max_length, truncation, prompt sharing), `ld_alpha` and the mixed precision. A re-run, a run resumed after a crash,
a second epoch and a sweep over beta or learning rate all reuse the pass; TRL's model hash stays in the key.
"""

from __future__ import annotations

import hashlib

import pyarrow.compute as pc
from datasets import Dataset
from trl import DPOTrainer

from finetune.training.saving import CheckpointLayoutSaves
from finetune.training.split_checkpoints import SplitModelCheckpoints

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class ReferenceCachedDPOTrainer(SplitModelCheckpoints, CheckpointLayoutSaves, DPOTrainer):
    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        key = reference_key(dataset, self.data_collator, self.ld_alpha, self.args.bf16, self.args.fp16)
        # A contiguous select is a view of the same files: only the fingerprint TRL names the cache by changes.
        keyed = dataset.select(range(len(dataset)), new_fingerprint=key)
        return super()._precompute_ref_logps(keyed, name, batch_size)


def reference_key(dataset: Dataset, collator, *settings) -> str:
    digest = hashlib.sha256(repr((collator, settings)).encode())
    digest.update(token_digest(dataset))
    return digest.hexdigest()[:16]


def token_digest(dataset: Dataset) -> bytes:
    """A hash of the tokenized pairs: every sequence's length and tokens, column by column."""
    digest = hashlib.sha256()
    columns = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")
    for batch in columns.iter(batch_size=10_000):
        for column in batch.columns:
            digest.update(pc.list_value_length(column).to_numpy().tobytes())
            digest.update(pc.list_flatten(column).to_numpy().tobytes())
    return digest.digest()
