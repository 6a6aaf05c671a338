"""The fields of TRL's SFTConfig and DPOConfig, against which a recipe's sft: and dpo: sections are checked, read
without importing TRL when that can be helped.

Importing TRL's config classes pulls in transformers, peft and torch: seconds on a quiet machine, tens of seconds
on a loaded one, before a typo in a recipe could be reported. Their fields' names and type annotations depend only
on the installed TRL and transformers, so they are read from the classes once per pair of versions and kept in
`$MOETUNE_CACHE/trainer-fields/` (default ~/.cache/moetune); later commands read that file instead. A cache that
cannot be written (a read-only home) only costs the import again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.core.remote_files import moetune_cache


def trainer_fields(config_name: str) -> dict[str, str]:
    """{field: its type annotation as text} of TRL's config class `config_name` (SFTConfig, DPOConfig), the fields
    its constructor takes."""
    path = cache_file(config_name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not cached yet (or a damaged file): read the class
        fields = read_fields(config_name)
    write_quietly(path, fields)
    return fields


def cache_file(config_name: str) -> Path:
    versions = f"trl-{metadata.version('trl')}-transformers-{metadata.version('transformers')}"
    return moetune_cache() / "trainer-fields" / f"{config_name}-{versions}.json"


def read_fields(config_name: str) -> dict[str, str]:
    import trl  # the slow path, once per installed TRL and transformers (see the module's docstring)

    return {f.name: annotation_text(f.type) for f in dataclasses.fields(getattr(trl, config_name)) if f.init}


def annotation_text(annotation: Any) -> str:
    """TRL annotates with strings like 'float | None'; a class annotation becomes its name."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def write_quietly(path: Path, fields: dict[str, str]) -> None:
    """Write the cache file whole (a concurrent reader sees the old state or the new one), or not at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(fields, tmp, indent=1)  # in the class's field order, as read
        os.replace(tmp.name, path)
    except OSError:
        pass  # a cache only: the next command reads the class again
