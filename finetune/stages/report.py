"""`run_dir/report.md`: a run as pictures. Training curves, expert load and routing of each training stage, and
the eval.

Everything here is read from files the stages leave behind (metrics.json, expert_load.json, routing_drift.json,
eval/scores.md and its chart), so the report can be rebuilt at any time (`moetune report RUN_DIR`), and each stage
rebuilds it as it finishes. Plots are PNGs drawn with matplotlib's Agg canvas into `run_dir/report/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.config.recipe import TRAINING_STAGES

# Panels of the training-curve figure: a title and the trainer-log keys drawn in it (those a stage logged).
CURVE_PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("DPO rewards", ("rewards/chosen", "rewards/rejected")),
    ("DPO reward margin", ("rewards/margins",)),
    ("DPO reward accuracy", ("rewards/accuracies",)),
    ("router aux loss", ("aux_loss",)),
    ("expert-load imbalance (CV over experts)", ("expert_load_cv_mean", "expert_load_cv_max")),
)


def write_report(run_dir: str | Path) -> Path:
    """Draw the plots and write run_dir/report.md from whatever stages are complete; returns the report's path."""
    run_dir = Path(run_dir)
    figures = run_dir / "report"
    figures.mkdir(parents=True, exist_ok=True)
    sections = [f"# Run report: {run_dir.name}", ""]
    for stage in TRAINING_STAGES:
        sections += stage_section(run_dir, stage, figures)
    sections += eval_section(run_dir)
    report = run_dir / "report.md"
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text("\n".join(sections).rstrip() + "\n")
    os.replace(tmp, report)  # a reader never sees half a report
    return report


def stage_section(run_dir: Path, stage: str, figures: Path) -> list[str]:
    folder = run_dir / stage
    manifest = read_json(folder / "moetune_stage.json")
    history = read_json(folder / "metrics.json")
    if manifest is None or history is None:
        return []
    outputs = manifest.get("outputs", {})
    lines = [f"## {stage.upper()}", "",
             f"{outputs.get('steps')} steps, {outputs.get('kind')} on top of {outputs.get('parent')}, "
             f"global batch {outputs.get('global_batch')}, {outputs.get('runtime_s') or 0:.0f} s.", ""]
    curves = figures / f"{stage}_curves.png"
    if plot_curves(history, f"{stage.upper()} training", curves):
        lines += [f"![{stage} training curves](report/{curves.name})", ""]
    else:
        lines += ["No step was logged (fewer steps than logging_steps): no curves.", ""]
    load = read_json(folder / "expert_load.json")
    heatmap = figures / f"{stage}_expert_load.png"
    if load and load.get("history"):
        plot_expert_load(load, f"{stage.upper()}: share of routed tokens per expert", heatmap)
        lines += [f"![{stage} expert load per layer](report/{heatmap.name})", ""]
    if load:
        lines += alarm_lines(load)
    lines += routing_lines(read_json(folder / "routing_drift.json"), stage, figures)
    return lines


def alarm_lines(load: dict) -> list[str]:
    """The experts the load alarms named (expert_load.json), or a line saying none was."""
    rule = load.get("alarm_rule")
    if rule is None:
        return []
    what = (f"dead: share under {rule['dead_load']}x uniform, hot: over {rule['hot_load']}x uniform, for "
            f"{rule['alarm_logs']} logging steps in a row")
    alarms = load.get("alarms", [])
    if not alarms:
        return [f"Expert-load alarms ({what}): none.", ""]
    return [f"Expert-load alarms ({what}):", ""] + [
        f"- step {a['step']}: {a['kind']} expert {a['expert']} in {short_layer_name(a['layer'])} ({a['layer']}), "
        f"share {a['share']:.4f}" for a in alarms] + [""]


def routing_lines(drift: dict | None, stage: str, figures: Path) -> list[str]:
    """The routing-drift plot and probe cost, and the chosen-vs-rejected table (routing_drift.json)."""
    if not drift:
        return []
    lines = []
    name = "the SFT model" if stage == "dpo" else "the base model"
    if drift.get("history"):
        path = figures / f"{stage}_routing_drift.png"
        plot_routing_drift(drift, f"{stage.upper()}: routing against {name} (held-out probe)", path)
        lines += [f"![{stage} routing drift per layer](report/{path.name})", ""]
        probe = drift.get("probe") or {}
        if probe.get("overhead") is not None:
            lines += [f"Routing probe: {probe['kept']} of {probe['sequences']} held-out sequences every log, "
                      f"{probe['seconds']:.1f} s of {probe['training_seconds']:.1f} s training "
                      f"({100 * probe['overhead']:.1f}%).", ""]
    pairs = drift.get("chosen_vs_rejected") or {}
    if pairs.get("before"):
        after = pairs.get("after", {})
        lines += ["Chosen vs rejected routing: Jensen-Shannon divergence between the expert load of chosen and of "
                  "rejected completion tokens (sampled training pairs).", "",
                  "| layer | before | after |", "|---|---|---|"]
        for layer, before in pairs["before"].items():
            later = after.get(layer, {}).get("js")
            lines.append(f"| {short_layer_name(layer)} | {before['js']:.4g} | "
                         f"{'-' if later is None else format(later, '.4g')} |")
        lines.append("")
    return lines


def eval_section(run_dir: Path) -> list[str]:
    scores = run_dir / "eval" / "scores.md"
    if not scores.is_file():
        return []
    lines = ["## Evaluation", ""]
    for line in scores.read_text().strip().splitlines():
        # scores.md starts with its own H1; under this H2 it becomes an H3.
        lines.append("##" + line if line.startswith("# ") else line)
    if (run_dir / "eval" / "radar.png").is_file():
        lines += ["", "![scores per category](eval/radar.png)"]
    return lines + [""]


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def plot_curves(history: list[dict], title: str, path: Path) -> bool:
    """One panel per metric group the stage logged, against the step. False when nothing was logged."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone

    panels = [(name, [key for key in keys if any(key in entry for entry in history)]) for name, keys in CURVE_PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return False
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(6 * columns, 3.2 * rows), layout="constrained")
    figure.suptitle(title)
    for index, (name, keys) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for key in keys:
            points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            axes.plot(*zip(*points), marker="o" if len(points) < 20 else None, markersize=3, label=key)
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(keys) > 1:
            axes.legend()
    figure.savefig(path, dpi=100)
    return True


def plot_expert_load(load: dict, title: str, path: Path) -> None:
    """One heatmap per MoE layer: experts down, logged steps across, colour = share of that layer's routed tokens."""
    from matplotlib.figure import Figure

    layers, history = load["layers"], load["history"]
    steps = [entry["step"] for entry in history]
    figure = Figure(figsize=(max(6.0, 0.25 * len(steps) + 3), 1.2 + 1.1 * len(layers)), layout="constrained")
    figure.suptitle(title)
    grid = figure.subplots(len(layers), 1, squeeze=False, sharex=True)[:, 0]
    highest = max(max(entry["share"][layer]) for entry in history for layer in layers)  # one colour scale for all
    for axes, layer in zip(grid, layers):
        shares = [[entry["share"][layer][expert] for entry in history] for expert in range(len(history[0]["share"][layer]))]
        image = axes.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=highest, interpolation="nearest",
                            extent=(-0.5, len(steps) - 0.5, len(shares) - 0.5, -0.5))
        axes.set_ylabel(f"{short_layer_name(layer)}\nexpert")
        axes.set_yticks(range(len(shares)))
        figure.colorbar(image, ax=axes, label="share")
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    grid[-1].set_xticks(ticks, [str(steps[i]) for i in ticks])
    grid[-1].set_xlabel("step")
    figure.savefig(path, dpi=100)


ROUTING_PANELS = (("overlap", "top-k overlap with the reference (mean Jaccard)"),
                  ("kl", "KL(policy || reference) of router distributions"),
                  ("top1_changed", "share of tokens whose top-1 expert changed"))


def plot_routing_drift(drift: dict, title: str, path: Path) -> None:
    """One panel per drift measure, one line per MoE layer, against the step."""
    from matplotlib.figure import Figure

    history = drift["history"]
    steps = [entry["step"] for entry in history]
    figure = Figure(figsize=(15, 3.4), layout="constrained")
    figure.suptitle(title)
    for axes, (key, name) in zip(figure.subplots(1, len(ROUTING_PANELS)), ROUTING_PANELS):
        for layer in drift["layers"]:
            axes.plot(steps, [entry["layers"][layer][key] for entry in history],
                      marker="o" if len(steps) < 20 else None, markersize=3, label=short_layer_name(layer))
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    if len(drift["layers"]) <= 12:
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)


def short_layer_name(layer: str) -> str:
    """`model.layers.3.mlp.gate` -> `layer 3`."""
    numbers = [part for part in layer.split(".") if part.isdigit()]
    return f"layer {numbers[0]}" if numbers else layer
