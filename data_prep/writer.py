"""Writing one kind of rows (sft or preference) into shuffled train/test files with bounded memory.

The split of a row is a seeded hash of its prompt, so every pair of one prompt lands on the same side and a row
keeps its split when other sources change. The order is a seeded shuffle done as an external sort: rows are spooled
into 16 bucket files by the first hex digit of a seeded hash, then each bucket is sorted by that hash in memory.
Peak memory is about a sixteenth of the output, not the output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

BUCKETS = "0123456789abcdef"
SPLITS = ("train", "test")


def seeded_hash(seed: int, text: str) -> str:
    return hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).hexdigest()


class SplitWriter:
    def __init__(self, folder: Path, seed: int, test_size: float):
        self.folder, self.seed, self.test_size = Path(folder), seed, test_size
        self.spool = self.folder / ".spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.handles = {}
        self.counts = {split: 0 for split in SPLITS}

    def add(self, row: dict, split_key: str) -> None:
        split_draw = int(seeded_hash(self.seed, "split\0" + split_key), 16) / 16**16
        split = "test" if split_draw < self.test_size else "train"
        line = json.dumps(row, ensure_ascii=False)
        order = seeded_hash(self.seed, line)
        self.bucket(split, order[0]).write(f"{order}\t{line}\n")
        self.counts[split] += 1

    def bucket(self, split: str, digit: str):
        key = (split, digit)
        if key not in self.handles:
            self.handles[key] = open(self.spool / f"{split}-{digit}.tsv", "w", encoding="utf-8")
        return self.handles[key]

    def finish(self) -> dict[str, int]:
        """Write train.jsonl and test.jsonl (always both, maybe empty) and remove the spool."""
        for handle in self.handles.values():
            handle.close()
        for split in SPLITS:
            with open(self.folder / f"{split}.jsonl", "w", encoding="utf-8") as out:
                for digit in BUCKETS:
                    path = self.spool / f"{split}-{digit}.tsv"
                    if path.exists():
                        lines = sorted(path.read_text(encoding="utf-8").splitlines())
                        out.writelines(line.split("\t", 1)[1] + "\n" for line in lines)
        shutil.rmtree(self.spool)
        return dict(self.counts)
