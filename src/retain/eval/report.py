"""Results on disk: metrics.json, the matrix as CSV, report.md and two PNG plots (all written atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from retain.errors import RetainError
from retain.eval.metrics import all_metrics
from retain.io import atomic_write_bytes, atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.json"
MATRIX_CSV = "accuracy_matrix.csv"
HEATMAP_PNG = "accuracy_matrix.png"
CURVE_PNG = "accuracy_curve.png"
REPORT_MD = "report.md"
LOSS_PNG = "loss_curve.png"
#: Per-task training logs (the Trainer's log history) live here, as `train_task_<id>.json`.
LOG_DIR = "logs"
#: The metrics a run's summary shows (report.md, the lines `retain run` and `retain report` print).
SUMMARY_KEYS = ("last", "avg", "learning_accuracy", "bwt", "fwt", "forgetting", "last_micro", "avg_micro")


def row_labels(tasks: list[str]) -> list[str]:
    return ["base", *[f"after {name}" for name in tasks]]


def build_metrics(
    tasks: list[str], matrix: list[list[float | None]], extra: dict[str, Any]
) -> dict[str, Any]:
    return {"tasks": tasks, "matrix": matrix, **all_metrics(matrix), **extra}


def write_results(output_dir: str | Path, metrics: dict[str, Any]) -> None:
    out = Path(output_dir)
    tasks, matrix = metrics["tasks"], metrics["matrix"]
    atomic_write_json(out / METRICS_FILE, metrics)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["after", *tasks])
    for label, row in zip(["base", *tasks], matrix, strict=True):
        writer.writerow([label, *["" if v is None else f"{v:.6f}" for v in row]])
    atomic_write_text(out / MATRIX_CSV, buffer.getvalue())
    atomic_write_bytes(out / HEATMAP_PNG, heatmap_png(tasks, matrix, metrics.get("title", "")))
    atomic_write_bytes(out / CURVE_PNG, curve_png(tasks, matrix, metrics.get("title", "")))
    atomic_write_text(out / REPORT_MD, report_markdown(metrics))


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json, checked, with Last, Avg, LA, BWT, FWT and Forgetting computed again from its
    matrix: every reader sees today's definitions, also for a file an earlier version wrote."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RetainError("no metrics.json: run `retain run` or `retain eval` first", source=str(path))
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RetainError(f"malformed JSON: {exc.msg}", source=str(path)) from None
    except UnicodeDecodeError:
        raise RetainError("not a UTF-8 text file", source=str(path)) from None

    def malformed(detail: str) -> RetainError:
        return RetainError(f"not a metrics file written by retain: {detail}", source=str(path))

    if not isinstance(metrics, dict):
        raise malformed("expected a JSON object")
    for key in ("tasks", "matrix"):
        if not isinstance(metrics.get(key), list):
            raise malformed(f"no '{key}' list")
    tasks = metrics["tasks"]
    if not tasks or not all(isinstance(task, str) for task in tasks):
        raise malformed("'tasks' must be task names")
    extra = metrics.get("extra_matrices", {})
    if not isinstance(extra, dict):
        raise malformed("'extra_matrices' must be an object")
    for name, matrix in [
        ("matrix", metrics["matrix"]),
        *((f"extra_matrices.{k}", m) for k, m in extra.items()),
    ]:
        if not is_task_matrix(matrix, len(tasks)):
            raise malformed(
                f"'{name}' must be {len(tasks) + 1} rows (the base model, then one after each task) "
                f"of {len(tasks)} scores in [0, 1] or nulls"
            )
    return {**metrics, **all_metrics(metrics["matrix"])}


def is_task_matrix(matrix: Any, task_count: int) -> bool:
    """Whether `matrix` is (task_count + 1) rows of task_count entries, each a score in [0, 1] or None."""

    def entry(value: Any) -> bool:
        return value is None or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        )

    return (
        isinstance(matrix, list)
        and len(matrix) == task_count + 1
        and all(isinstance(row, list) and len(row) == task_count and all(map(entry, row)) for row in matrix)
    )


#: How each `eval_mode` scores, for the report.
MODES = {
    "generate": "greedy generation (exact match to a label; ROUGE-L besides for tasks without labels)",
    "choice": "choice: the label whose tokens are most likely after the prompt (tasks without labels: generation)",
    "both": "greedy generation; choice's accuracy and the modes' agreement are the extra matrices",
}


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.4f}"


def report_markdown(metrics: dict[str, Any]) -> str:
    tasks, matrix = metrics["tasks"], metrics["matrix"]
    lines = [f"# {metrics.get('title') or 'Continual-learning run'}", ""]
    keys = ("method", "model", "seed", "eval_mode", "eval_split", "wall_time_s")
    info = [(k, metrics[k]) for k in keys if k in metrics]
    if info:
        lines += [", ".join(f"**{k}**: {v}" for k, v in info), ""]
    mode = metrics.get("eval_mode", "generate")
    lines += [
        "## Metrics (accuracy in %)",
        "",
        f"Scored by {MODES.get(mode, mode)}. Last and Avg are means over tasks (macro); the micro ones pool the",
        "test rows of every task.",
        "",
        "| Last | Avg | LA | BWT | FWT | Forgetting | Last (micro) | Avg (micro) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_fmt(metrics.get(k)) for k in SUMMARY_KEYS) + " |", ""]
    lines += [
        "## Accuracy matrix (%)",
        "",
        "Row k: after training task k; column i: test accuracy on task i.",
        "",
    ]
    lines += ["| after \\ task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label, row in zip(row_labels(tasks), matrix, strict=True):
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    for name, extra in (metrics.get("extra_matrices") or {}).items():
        lines += ["", f"## {name} (%)", ""]
        lines += ["| after \\ task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for label, row in zip(row_labels(tasks), extra, strict=True):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    counts = metrics.get("eval_counts")
    if counts:
        lines += [
            "",
            "## Test rows",
            "",
            "Rows whose gold answer is not among the task's labels are counted here and not scored.",
            "",
            "| task | scored | unlabeled (not scored) |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {c['scored']} | {c['unlabeled']} |" for t, c in counts.items()]
    info = metrics.get("method_info")
    if info:
        lines += ["", f"## {metrics.get('method', 'Method')}: the method's own figures", ""]
        lines += [f"- **{key}**: {json.dumps(value, ensure_ascii=False)}" for key, value in info.items()]
    lines += ["", f"![accuracy matrix]({HEATMAP_PNG})", "", f"![accuracy per task]({CURVE_PNG})", ""]
    lines += [
        "Definitions: Last = mean of the final row; Avg = mean over steps of the mean over seen tasks;",
        "LA (learning accuracy) = mean of R[i][i], each task just after its training;",
        "BWT = mean over i<T of R[T][i] - R[i][i]; FWT = mean over i>1 of R[i-1][i] - R[0][i];",
        "Forgetting = mean over i<T of max_{i<=k<T} R[k][i] - R[T][i]. Plain means over tasks.",
        "",
    ]
    return "\n".join(lines)


def figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return data.getvalue()


def draw_heatmap(ax, tasks: list[str], matrix: list[list[float | None]], title: str = ""):
    """Draw an accuracy matrix (fractions; None shown grey) on `ax` in %; return the image."""
    import matplotlib
    import numpy as np

    values = np.array([[math.nan if v is None else 100 * v for v in row] for row in matrix], dtype=float)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), row_labels(tasks))
    for (r, c), v in np.ndenumerate(values):
        ax.text(
            c,
            r,
            "n/a" if math.isnan(v) else f"{v:.0f}",
            ha="center",
            va="center",
            color="white" if not math.isnan(v) and v < 60 else "black",
            fontsize=8,
        )
    ax.set_xlabel("evaluated task")
    ax.set_title(title or "accuracy (%)")
    return image


# Where a point's label may go, in points from the marker: at its four corners first, then up and
# down a column on either side, one text line (11 points) further each time.
NEAR_LABEL_OFFSETS = [(4, 3), (4, -11), (-4, 3), (-4, -11)]
LABEL_OFFSETS = NEAR_LABEL_OFFSETS + [
    (dx, dy) for step in range(1, 12) for dy in (3 + 11 * step, -11 - 11 * step) for dx in (12, -12)
]


def label_points(ax, points: list[tuple[str, float, float]]) -> list:
    """Write each (label, x, y) beside its point, inside the axes and clear of the labels and markers
    placed so far.

    Tries the offsets of LABEL_OFFSETS in order (the last one is taken if none is clear); a label
    moved past its point's corners gets a thin line to its point. Call after the layout is final: the
    check is in screen coordinates.
    """
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((x, y)) for _, x, y in points]
    taken = [Bbox.from_extents(px - 4, py - 4, px + 4, py + 4) for px, py in markers]

    def write(label, xy, offset, line):
        return ax.annotate(
            label,
            xy,
            xytext=offset,
            textcoords="offset points",
            fontsize=8,
            ha="right" if offset[0] < 0 else "left",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"} if line else None,
        )

    texts = []
    for label, x, y in points:
        for number, offset in enumerate(LABEL_OFFSETS):
            text = write(label, (x, y), offset, line=False)
            box = text.get_window_extent(renderer).padded(1)
            clear = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if number == len(LABEL_OFFSETS) - 1 or (clear and not any(box.overlaps(o) for o in taken)):
                break
            text.remove()
        # Far from its point: draw the line (the box checked above is the text's alone).
        if number >= len(NEAR_LABEL_OFFSETS):
            text.remove()
            text = write(label, (x, y), offset, line=True)
        taken.append(box)
        texts.append(text)
    return texts


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_loss_curve(run_dir: str | Path) -> None:
    """`loss_curve.png`: the training loss of every task logged so far, over the steps of the sequence."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    logs = sorted(
        Path(run_dir, LOG_DIR).glob("train_task_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1])
    )
    for path in logs:
        points = [(e["step"], e["loss"]) for e in json.loads(path.read_text()) if "loss" in e and "step" in e]
        if points:
            ax.plot(*zip(*points, strict=True), label=f"task {path.stem.rsplit('_', 1)[1]}")
    ax.set_xlabel("optimizer step (over the whole sequence)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8, loc="best")
    atomic_write_bytes(Path(run_dir) / LOSS_PNG, figure_bytes(fig))


def heatmap_png(tasks: list[str], matrix: list[list[float | None]], title: str = "") -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.55 * len(matrix)))
    image = draw_heatmap(ax, tasks, matrix, title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return figure_bytes(fig)


def curve_png(tasks: list[str], matrix: list[list[float | None]], title: str = "") -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(tasks), 3.5))
    steps = list(range(len(matrix)))
    for i, name in enumerate(tasks):
        ys = [math.nan if row[i] is None else 100 * row[i] for row in matrix]
        ax.plot(steps, ys, marker="o", label=name)
        ax.axvline(i + 1, color="#cccccc", linewidth=0.5, zorder=0)
    ax.set_xticks(steps, ["base", *[f"T{k}" for k in range(1, len(tasks) + 1)]])
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or "accuracy per task over the sequence")
    ax.legend(fontsize=8, loc="best")
    return figure_bytes(fig)
