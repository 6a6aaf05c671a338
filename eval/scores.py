"""Turning judgments into scores, as MT-Bench aggregates them, and presenting them side by side.

Single mode (FastChat show_result): judgments scored -1 (unparseable) are counted as failed and left out; turn 1
and turn 2 are the mean scores of each turn's judgments, overall is the mean of all of them, and a category's
score is the mean over both turns of its questions. Pairwise mode: an inconsistent pair of verdicts (the two
orders disagree) counts as a tie; adjusted win rate = (wins + ties / 2) / comparisons.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Any

from eval.judge_prompts import UNPARSEABLE


def mean_or_none(values: list[float]) -> float | None:
    return float(mean(values)) if values else None


def single_scores(
    judgments: list[dict[str, Any]], questions: list[dict[str, Any]], models: list[str], errors: Counter
) -> dict[str, dict[str, Any]]:
    """Per model: turn1, turn2, overall, categories {name: mean}, judged, failed (-1) and errors (calls failed)."""
    category_of = {question["question_id"]: question["category"] for question in questions}
    categories = list(dict.fromkeys(category_of.values()))
    scores = {}
    for model in models:
        mine = [j for j in judgments if j["model"] == model and j["question_id"] in category_of]
        valid = [j for j in mine if j["score"] != UNPARSEABLE]
        scores[model] = {
            "turn1": mean_or_none([j["score"] for j in valid if j["turn"] == 1]),
            "turn2": mean_or_none([j["score"] for j in valid if j["turn"] == 2]),
            "overall": mean_or_none([j["score"] for j in valid]),
            "categories": {c: mean_or_none([j["score"] for j in valid if category_of[j["question_id"]] == c])
                           for c in categories},
            "judged": len(valid),
            "failed": len(mine) - len(valid),
            "errors": errors.get(model, 0),
        }
    return scores


def pairwise_scores(judgments: list[dict[str, Any]], models: list[str], baseline: str, errors: Counter) -> dict[str, dict[str, Any]]:
    """Per model against the baseline: win, loss, tie, the three rates, failed (a verdict unreadable) and errors."""
    scores = {}
    for model in models:
        if model == baseline:
            continue
        mine = [j for j in judgments if j["model_1"] == model and j["model_2"] == baseline]
        readable = [j for j in mine if "error" not in (j["g1_winner"], j["g2_winner"])]
        outcome = Counter(
            "tie" if j["g1_winner"] == "tie" or j["g1_winner"] != j["g2_winner"]
            else "win" if j["g1_winner"] == "model_1" else "loss"
            for j in readable
        )
        total = len(readable)
        scores[model] = {
            "win": outcome["win"], "loss": outcome["loss"], "tie": outcome["tie"],
            "win_rate": outcome["win"] / total if total else None,
            "loss_rate": outcome["loss"] / total if total else None,
            "win_rate_adjusted": (outcome["win"] + 0.5 * outcome["tie"]) / total if total else None,
            "failed": len(mine) - total,
            "errors": errors.get(model, 0),
        }
    return scores


def single_rows(scores: dict[str, dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    models = list(scores)
    rows = [(label, [scores[m][key] for m in models]) for label, key in
            (("turn 1", "turn1"), ("turn 2", "turn2"), ("overall", "overall"))]
    categories = list(next(iter(scores.values()))["categories"]) if scores else []
    rows += [(f"  {c}", [scores[m]["categories"][c] for m in models]) for c in categories]
    rows += [(label, [scores[m][key] for m in models]) for label, key in
             (("judged", "judged"), ("failed (-1)", "failed"), ("judge errors", "errors"))]
    return rows


def pairwise_rows(scores: dict[str, dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    keys = ("win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted", "failed", "errors")
    return [(key.replace("_", " "), [scores[m][key] for m in scores]) for key in keys]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(first_header: str, models: list[str], rows: list[tuple[str, list[Any]]]) -> str:
    """Models side by side; the same text is printed and written to scores.md."""
    lines = ["| " + " | ".join([first_header, *models]) + " |", "|" + "---|" * (len(models) + 1)]
    lines += ["| " + " | ".join([label, *map(cell, values)]) + " |" for label, values in rows]
    return "\n".join(lines)


def radar_plot(scores: dict[str, dict[str, Any]], path: Path) -> None:
    """Per-category scores (0-10), one outline per model, written as a PNG with matplotlib's Agg canvas.
    Fewer than 3 categories make no polygon: those are drawn as grouped bars."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone

    categories = list(next(iter(scores.values()))["categories"])
    if len(categories) < 3:
        bar_plot(scores, categories, path)
        return
    angles = [2 * math.pi * i / len(categories) for i in range(len(categories))]
    figure = Figure(figsize=(6, 6))
    axes = figure.add_subplot(projection="polar")
    for model, stats in scores.items():
        values = [stats["categories"][c] or 0.0 for c in categories]
        axes.plot(angles + angles[:1], values + values[:1], label=model)
        axes.fill(angles + angles[:1], values + values[:1], alpha=0.1)
    axes.set_xticks(angles, categories)
    axes.set_ylim(0, 10)
    axes.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1))
    figure.savefig(path, dpi=100, bbox_inches="tight")


def bar_plot(scores: dict[str, dict[str, Any]], categories: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2 + 1.5 * len(categories) * len(scores) / 2, 4))
    axes = figure.add_subplot()
    width = 0.8 / len(scores)
    for index, (model, stats) in enumerate(scores.items()):
        positions = [c + (index - (len(scores) - 1) / 2) * width for c in range(len(categories))]
        axes.bar(positions, [stats["categories"][c] or 0.0 for c in categories], width, label=model)
    axes.set_xticks(range(len(categories)), categories)
    axes.set_ylim(0, 10)
    axes.set_ylabel("score (1-10)")
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
