"""Reading a source's rows one at a time (local jsonl/json/parquet/csv or a streamed hub dataset) and sampling them."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Iterable, Iterator

from datasets import load_dataset

from finetune.config.data import SourceConfig
from data_prep.records import DataError, Example, Problem, Row

LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A longer line is a whole file written on one line, not a row: 2 MiB is about 500k tokens, beyond any real
# conversation, while tokenizing or training a tokenizer on a 60 MB "row" takes minutes with no sign of progress.
MAX_ROW_BYTES = 2 << 20


def source_name(source: SourceConfig) -> str:
    return f"{source.format}: {source.path or source.dataset or '(generated)'}"


def resolve_path(source: SourceConfig, base_dir: Path) -> Path | None:
    if source.path is None:
        return None
    return (base_dir / source.path).resolve()


def read_rows(source: SourceConfig, base_dir: Path) -> Iterator[Row]:
    """Every row of the source in order, with `columns` renames applied. Generated sources have none."""
    path = resolve_path(source, base_dir)
    if path is not None:
        rows = read_local(path)
    elif source.dataset is not None:
        rows = read_hub(source)
    else:
        return iter(())
    return (renamed(row, source.columns) for row in rows)


def read_local(path: Path) -> Iterator[Row]:
    if not path.is_file():
        raise DataError(f"{path}: no such file. Fix the source's path (relative paths start at the recipe's folder).")
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json_array(path)
    if kind == "parquet":
        return read_with_datasets(kind, str(path), f"{path} row")
    if kind == "csv":
        return read_csv(path)
    raise DataError(f"{path}: unknown file type '{path.suffix}'; use one of {', '.join(LOCAL_FORMATS)}.")


def read_jsonl(path: Path) -> Iterator[Row]:
    """One row per line, read lazily; a line that is not a JSON object becomes a Row with an error."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_ROW_BYTES:
                yield Row(f"{path}:{number}", None, f"a {len(raw) / 1e6:.1f} MB line, over the {MAX_ROW_BYTES >> 20} MiB "
                          f"a row may hold (a whole file on one line?); write one JSON object per line")
            elif raw.strip():
                yield parse_json_row(raw, f"{path}:{number}")


def parse_json_row(raw: bytes, location: str) -> Row:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Row(location, None, f"not UTF-8 text (binary data?) at byte {error.start}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return Row(location, None, f"not valid JSON ({error.msg} at column {error.colno}); truncated line?")
    if not isinstance(data, dict):
        return Row(location, None, f"a row must be a JSON object, got {type(data).__name__}")
    return Row(location, data)


def read_json_array(path: Path) -> Iterator[Row]:
    """A .json file holding one list of objects (read whole: use jsonl for large files)."""
    try:
        items = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a valid JSON file ({error}). Large or line-oriented data belongs in .jsonl.") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json source must hold a list of row objects, got {type(items).__name__}.")
    for index, item in enumerate(items):
        location = f"{path}[{index}]"
        yield Row(location, item) if isinstance(item, dict) else Row(location, None, "a row must be a JSON object")


def read_csv(path: Path) -> Iterator[Row]:
    """One row per CSV record (header first), every cell as text: type inference would turn an answer like "42"
    into a number. Locations give the line a record starts on."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            reader.fieldnames  # reads the header
            line = reader.line_num + 1
            for record in reader:
                yield Row(f"{path}:{line}", record)
                line = reader.line_num + 1
        except (UnicodeDecodeError, csv.Error) as error:
            raise DataError(f"{path}:{reader.line_num}: not a readable UTF-8 CSV file ({error}).") from None


def read_hub(source: SourceConfig) -> Iterator[Row]:
    """Stream a hub dataset so that a large split never has to fit in memory or on disk."""
    label = f"{source.dataset}[{source.split}] row"
    try:
        return read_with_datasets(source.dataset, None, label, name=source.config, split=source.split,
                                  revision=source.revision, data_dir=source.data_dir)
    except ConnectionError as error:
        raise DataError(f"{source.dataset}: cannot reach the Hugging Face Hub ({error}). "
                        f"Download the files and point the source's path at them.") from None


def read_with_datasets(builder: str, data_files: str | None, label: str, split: str = "train", **kwargs) -> Iterator[Row]:

    stream = load_dataset(builder, data_files=data_files, split=split, streaming=True, **kwargs)
    return (Row(f"{label} {index}", dict(item)) for index, item in enumerate(stream))


def renamed(row: Row, columns: dict[str, str]) -> Row:
    if row.data is None or not columns:
        return row
    data = dict(row.data)
    for wanted, column in columns.items():
        if column in data:
            data[wanted] = data.pop(column)
    return Row(row.location, data, row.error)


def sampled(items: Iterable[Example | Problem], source: SourceConfig, seed: int, index: int) -> Iterator[Example | Problem]:
    """Keep a `weight` share of the examples (seeded per source) and stop after `max_rows`; problems pass through."""
    rng = random.Random(f"mix/{seed}/{index}")
    taken = 0
    for item in items:
        if isinstance(item, Example) and item.kind != "question":
            if source.max_rows is not None and taken >= source.max_rows:
                return
            if source.weight < 1.0 and rng.random() >= source.weight:
                yield Problem(item.location, "not_sampled", malformed=False)
                continue
            taken += 1
        yield item
