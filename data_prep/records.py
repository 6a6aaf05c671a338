"""What flows through the prep stage: rows as read, examples as converted, and problems found on the way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Row:
    """One row as read from a source. `location` says where it is (file:line, or dataset[split] row N)."""

    location: str
    data: dict[str, Any] | None
    error: str | None = None  # why the row could not be read (bad JSON, not UTF-8, not an object)


@dataclass
class Example:
    """A converted row in the normalized schema. kind: sft, preference or question."""

    kind: str
    row: dict[str, Any]
    location: str


@dataclass
class Problem:
    """A row that produced no example: malformed (obeys on_error) or dropped by a format's rule (e.g. a score tie)."""

    location: str
    reason: str
    malformed: bool = True


class RowError(ValueError):
    """Raised by converters and validation for a malformed row; the message says what is wrong with it."""


class Dropped(Exception):
    """Raised by converters for a well-formed row that a rule drops (the message is the reason, e.g. 'tie')."""


class DataError(ValueError):
    """The prep stage cannot go on; the message names the file, the line and what to do."""
