"""JSON-lines files that grow one record at a time and survive a crash: answers and judgments.

Every record is flushed and fsynced as soon as it is written, so a re-run after a crash finds all finished work
(judge calls cost money) and only does what is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file; a missing file has none. A torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = ends_mid_line(path)
    with open(path, "a", encoding="utf-8") as handle:
        if torn:  # a crash cut the last record short: end that line, or the next record would be glued to it
            handle.write("\n")
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def file_safe(name: str) -> str:
    """A model name (which may be a path or hub id) usable as a file name."""
    return name.strip("/").replace("/", "__").replace(":", "_")
