"""Compare finished runs: group them by label and give each metric's mean and spread over seeds.

A group is the runs of one method setting with different seeds. Its label is given as
`LABEL=RUN_DIR`, or taken from the run directory's name without a trailing seed suffix
(`_seed<N>` or `_s<N>`), so `runs/ilora_s1` and `runs/ilora_s2` form the group `ilora`.
Spread is the sample standard deviation over the group's runs (n - 1 in the denominator); a
metric that any run of the group lacks is reported as missing, never averaged over the rest.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from retain.errors import RetainError
from retain.eval.metrics import all_metrics
from retain.eval.report import load_metrics
from retain.io import atomic_write_bytes, atomic_write_json, atomic_write_text, make_writable_dir

#: The metrics of a comparison and their column headings.
METRIC_COLUMNS = {
    "last": "Last",
    "avg": "Avg",
    "learning_accuracy": "LA",
    "bwt": "BWT",
    "fwt": "FWT",
    "forgetting": "Forgetting",
}
METRIC_KEYS = tuple(METRIC_COLUMNS)
logger = logging.getLogger(__name__)
_SEED_SUFFIX = re.compile(r"_(?:seed|s)\d+$")


def run_label(run_dir: str | Path) -> str:
    """The group label of a run directory: its name without a trailing `_seed<N>` / `_s<N>`."""
    return _SEED_SUFFIX.sub("", Path(run_dir).name)


def mean_and_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; (None, None) if any value is missing; sd None for n < 2."""
    if not values or any(v is None or math.isnan(v) for v in values):
        return None, None
    mean = sum(values) / len(values)  # type: ignore[arg-type]
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # type: ignore[operator]
    return mean, math.sqrt(var)


def seen_average_curve(matrix: list[list[float | None]]) -> list[float | None]:
    """Entry k-1: the mean accuracy over tasks 1..k after training task k (the terms of Avg)."""
    curve: list[float | None] = []
    for k in range(1, len(matrix)):
        seen = matrix[k][:k]
        curve.append(None if any(v is None for v in seen) else sum(seen) / k)  # type: ignore[arg-type]
    return curve


def _elementwise_mean(rows: list[list[float | None]]) -> list[float | None]:
    return [mean_and_sd(list(column))[0] for column in zip(*rows, strict=True)]


def compare(groups: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Summaries of labelled groups of (run directory, metrics.json) pairs."""
    summary: dict[str, Any] = {}
    for label, runs in groups.items():
        tasks = runs[0][1]["tasks"]
        for run_dir, metrics in runs:
            if metrics["tasks"] != tasks:
                raise RetainError(
                    f"group '{label}' mixes task sequences: {metrics['tasks']} vs {tasks}", source=run_dir
                )
        seeds = [metrics.get("seed") for _, metrics in runs]
        repeated = sorted({str(seed) for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            logger.warning(
                "note: group '%s' has seed %s in more than one run: its spread is not over seeds alone",
                label,
                ", ".join(repeated),
            )
        entry: dict[str, Any] = {
            "runs": [run_dir for run_dir, _ in runs],
            "seeds": seeds,
            "method": sorted({str(metrics.get("method")) for _, metrics in runs}),
            "tasks": tasks,
        }
        entry["per_run"] = [
            {
                "run": run_dir,
                "seed": metrics.get("seed"),
                **{key: metrics.get(key) for key in METRIC_KEYS},
                "wall_time_s": metrics.get("wall_time_s"),
            }
            for run_dir, metrics in runs
        ]
        for key in METRIC_KEYS:
            mean, sd = mean_and_sd([metrics.get(key) for _, metrics in runs])
            entry[key] = {"mean": mean, "sd": sd}
        walls = [metrics.get("wall_time_s") for _, metrics in runs]
        entry["wall_time_s"] = mean_and_sd(walls)[0]
        entry["matrix"] = [
            _elementwise_mean(list(rows)) for rows in zip(*(m["matrix"] for _, m in runs), strict=True)
        ]
        entry["seen_average"] = _elementwise_mean([seen_average_curve(m["matrix"]) for _, m in runs])
        entry["extra"] = _extra_summaries([metrics for _, metrics in runs])
        summary[label] = entry
    return summary


def _extra_summaries(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """The metrics of each extra matrix (choice accuracy, mode agreement, off-label share, router accuracy)
    that every run of the group has, read with the main matrix's definitions; mean and sd over the runs."""
    names = set.intersection(*(set(metrics.get("extra_matrices") or {}) for metrics in runs))
    extra = {}
    for name in sorted(names):
        per_run = [all_metrics(metrics["extra_matrices"][name]) for metrics in runs]
        extra[name] = {
            key: dict(zip(("mean", "sd"), mean_and_sd([values[key] for values in per_run]), strict=True))
            for key in METRIC_KEYS
        }
    return extra


def _pct(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "n/a"
    value = round(100 * mean, 1) + 0.0  # + 0.0: no "-0.0"
    return f"{value:.1f}" if sd is None else f"{value:.1f} ± {100 * sd:.1f}"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.0f}"


def _header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def comparison_markdown(summary: dict[str, Any]) -> str:
    headings = METRIC_COLUMNS.values()
    lines = _header("run", "method", "seeds", *headings, "wall (min)")
    for label, entry in summary.items():
        cells = [_pct(entry[key]["mean"], entry[key]["sd"]) for key in METRIC_KEYS]
        wall = _minutes(entry["wall_time_s"])
        seeds = ", ".join(str(s) for s in entry["seeds"])
        lines.append(f"| {label} | {', '.join(entry['method'])} | {seeds} | {' | '.join(cells)} | {wall} |")
    lines += [
        "",
        "Accuracy in %, mean ± sample standard deviation over seeds. LA: each task just after its training.",
        "",
        *_header("run", "seed", *headings, "wall (min)"),
    ]
    for entry in summary.values():
        for run in entry["per_run"]:
            cells = [_pct(run[key], None) for key in METRIC_KEYS]
            wall = _minutes(run["wall_time_s"])
            lines.append(f"| {run['run']} | {run['seed']} | {' | '.join(cells)} | {wall} |")
    missing = {"mean": None, "sd": None}
    for name in sorted({name for entry in summary.values() for name in entry["extra"]}):
        lines += ["", f"`{name}` (an extra matrix, read with the same definitions):", ""]
        lines += _header("run", *headings)
        for label, entry in summary.items():
            stats = entry["extra"].get(name, {})
            cells = [_pct(**stats.get(key, missing)) for key in METRIC_KEYS]
            lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def line_styles(count: int) -> list[dict[str, Any]]:
    """One distinct look per line: ten colours, then the same ten dashed, then dotted, ..."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    dashes = ["-", "--", ":", "-."]
    return [{"color": colours[i % 10], "linestyle": dashes[(i // 10) % len(dashes)]} for i in range(count)]


def comparison_png(summary: dict[str, Any]) -> bytes:
    """Mean accuracy over the tasks seen so far, after each task, one line per group."""
    from retain.eval.report import figure_bytes, pyplot

    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for style, (label, entry) in zip(line_styles(len(summary)), summary.items(), strict=True):
        curve = entry["seen_average"]
        xs = [k for k, v in enumerate(curve, start=1) if v is not None]
        ax.plot(xs, [100 * curve[k - 1] for k in xs], marker="o", label=label, **style)
    tasks = next(iter(summary.values()))["tasks"] if summary else []
    ax.set_xticks(range(1, len(tasks) + 1), [f"T{k}" for k in range(1, len(tasks) + 1)])
    ax.set_xlabel("after training task")
    ax.set_ylabel("mean accuracy over seen tasks (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the plot, not on it
    return figure_bytes(fig)


def _grid(count: int, panel_w: float, panel_h: float, max_cols: int):
    from retain.eval.report import pyplot

    cols = min(count, max_cols)
    rows = max(1, math.ceil(count / cols))
    fig, axes = pyplot().subplots(rows, cols, figsize=(panel_w * cols, panel_h * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def heatmaps_png(summary: dict[str, Any]) -> bytes:
    """The mean accuracy matrix of every group, one panel each."""
    from retain.eval.report import draw_heatmap, figure_bytes

    tasks = next(iter(summary.values()))["tasks"] if summary else []
    fig, axes = _grid(max(1, len(summary)), 1.6 + 0.9 * len(tasks), 1.4 + 0.55 * (len(tasks) + 1), 3)
    for ax, (label, entry) in zip(axes, summary.items(), strict=False):
        draw_heatmap(ax, entry["tasks"], entry["matrix"], f"{label} (n={len(entry['runs'])})")
    fig.tight_layout()
    return figure_bytes(fig)


def task_curves_png(summary: dict[str, Any]) -> bytes:
    """Each task's mean accuracy over the sequence, one panel per task, one line per group."""
    from retain.eval.report import figure_bytes

    tasks = next(iter(summary.values()))["tasks"] if summary else []
    fig, axes = _grid(max(1, len(tasks)), 3.4, 2.8, 4)
    steps = list(range(len(tasks) + 1))
    for i, (ax, task) in enumerate(zip(axes, tasks, strict=False)):
        for style, (label, entry) in zip(line_styles(len(summary)), summary.items(), strict=True):
            if entry["tasks"] != tasks:
                continue
            ys = [math.nan if row[i] is None else 100 * row[i] for row in entry["matrix"]]
            ax.plot(steps, ys, marker="o", markersize=3, label=label, **style)
        ax.axvline(i + 1, color="#999999", linewidth=0.8, linestyle="--", zorder=0)
        ax.set_xticks(steps, ["base", *[f"T{k}" for k in range(1, len(tasks) + 1)]], fontsize=7)
        ax.set_ylim(-2, 102)
        ax.set_title(f"{task} (trained at T{i + 1})", fontsize=9)
        ax.grid(alpha=0.3)
    if axes:
        axes[0].set_ylabel("accuracy (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return figure_bytes(fig)


def learned_and_forgotten(summary: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, LA, Forgetting) of each group with both defined, in % (means over runs)."""
    points = []
    for label, entry in summary.items():
        learned, forgotten = entry["learning_accuracy"]["mean"], entry["forgetting"]["mean"]
        if learned is not None and forgotten is not None:
            points.append((label, 100 * learned, 100 * forgotten))
    return points


def tradeoff_figure(summary: dict[str, Any]):
    """What each group learned (LA) against what it forgot afterwards (Forgetting), one point per group."""
    from retain.eval.report import label_points, pyplot

    points = learned_and_forgotten(summary)
    fig, ax = pyplot().subplots(figsize=(5.2, 4))
    for _, learned, forgotten in points:
        ax.plot(learned, forgotten, "o", color="#1f77b4")
    ax.set_xlabel("LA: accuracy just after training each task (%)")
    ax.set_ylabel("Forgetting: drop from each task's best (%)")
    ax.margins(0.15)  # room for the labels at the edges
    ax.grid(alpha=0.3)
    fig.tight_layout()
    label_points(ax, points)
    return fig


def tradeoff_png(summary: dict[str, Any]) -> bytes:
    from retain.eval.report import figure_bytes

    return figure_bytes(tradeoff_figure(summary))


def parse_run_args(items: list[str]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """`RUN_DIR` or `LABEL=RUN_DIR` items, grouped by label in order of first appearance."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    given: dict[Path, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            label, path = run_label(item), item
        if not label:
            raise RetainError(f"'{item}': the label before '=' is empty", field="RUN_DIR")
        folder = Path(path).resolve()
        if folder in given:  # counted twice, it would shrink the spread over seeds
            raise RetainError(f"the run {path} is given twice (first as '{given[folder]}')", field="RUN_DIR")
        given[folder] = item
        groups.setdefault(label, []).append((path, load_metrics(path)))
    return groups


def write_comparison(out_dir: str | Path, summary: dict[str, Any]) -> str:
    """Write comparison.json/.md/.png, heatmaps.png, task_curves.png and tradeoff.png into `out_dir`.

    Returns the Markdown table.
    """
    out = Path(out_dir)
    make_writable_dir(out, "--out")
    text = comparison_markdown(summary)
    atomic_write_json(out / "comparison.json", summary)
    atomic_write_text(out / "comparison.md", "# Comparison\n\n" + text)
    atomic_write_bytes(out / "comparison.png", comparison_png(summary))
    atomic_write_bytes(out / "heatmaps.png", heatmaps_png(summary))
    atomic_write_bytes(out / "task_curves.png", task_curves_png(summary))
    atomic_write_bytes(out / "tradeoff.png", tradeoff_png(summary))
    return text
