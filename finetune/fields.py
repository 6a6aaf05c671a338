"""The one way recipe sections declare their keys: a dataclass field whose help text is the documentation."""

from __future__ import annotations

import dataclasses
from typing import Any


def help_field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None) -> Any:
    """A dataclass field documented for `moetune <stage> --help` and the README."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
