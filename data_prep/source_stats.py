"""Counting what happened to every row of a source, for report.json and the printed summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_prep.records import DataError, Problem

KEPT_ERRORS = 50  # malformed rows listed per source in report.json; all of them are counted


@dataclass
class SourceStats:
    name: str
    read: int = 0  # rows read from the file or dataset (0 for generated sources)
    kept: Counter = field(default_factory=Counter)  # by kind
    dropped: Counter = field(default_factory=Counter)  # by reason; malformed rows count as "malformed"
    errors: list[dict[str, str]] = field(default_factory=list)
    malformed: int = 0

    def problem(self, problem: Problem) -> None:
        if not problem.malformed:
            self.dropped[problem.reason] += 1
            return
        self.malformed += 1
        self.dropped["malformed"] += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append({"location": problem.location, "reason": problem.reason})

    def fail_if_malformed(self) -> None:
        if self.malformed:
            first = self.errors[0]
            reason = first["reason"] if first["reason"][-1] in ".?!" else first["reason"] + "."
            more = self.malformed - 1
            others = f" {more} more malformed row{'s' if more > 1 else ''} in {self.name}." if more else ""
            raise DataError(
                f"{first['location']}: {reason}{others} "
                f"Fix the rows, or set data.on_error: skip to drop them (they are listed in report.json)."
            )

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "read": self.read, "kept": dict(sorted(self.kept.items())),
                "dropped": dict(sorted(self.dropped.items())), "errors": self.errors}


def summary(report: dict[str, Any]) -> str:
    lines = ["[data] prepared:"]
    for source in report["sources"]:
        kept = ", ".join(f"{n} {kind}" for kind, n in source["kept"].items()) or "nothing"
        dropped = ", ".join(f"{n} {reason}" for reason, n in source["dropped"].items()) or "none"
        lines.append(f"  {source['name']}: read {source['read']}, kept {kept}; dropped {dropped}")
    for kind, splits in report["splits"].items():
        lines.append(f"  {kind}: {splits['train']} train, {splits['test']} test")
    if report["questions"]:
        lines.append(f"  questions: {report['questions']}")
    for part, points in (report["token_lengths"] or {}).items():
        lines.append(f"  tokens {part}: " + ", ".join(f"{name} {value}" for name, value in points.items()))
    return "\n".join(lines)
