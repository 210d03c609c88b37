"""`retain benchmarks`: what each benchmark holds (orders, tasks, rows per split, label sets)."""

from __future__ import annotations

from pathlib import Path

from retain.data.builtin import shipped_benchmarks
from retain.data.registry import load_dataset_info, read_json, read_records, resolve_file


def describe_folder(folder: Path) -> list[str]:
    info = load_dataset_info(folder)
    lines = []
    for name, bench in read_json(folder / "benchmark_info.json", "benchmark registry").items():
        lines.append(f"{name}  ({folder})")
        if bench.get("description"):
            lines.append(f"  {bench['description']}")
        orders = bench.get("orders", {})
        for order, tasks in orders.items():
            lines.append(f"  order {order}: {', '.join(tasks)}")
        tasks = sorted({task for order in orders.values() for task in order}, key=str.lower)
        lines.append(f"  {'task':12s} {'train':>6s} {'dev':>6s} {'test':>6s}  labels")
        for task in tasks:
            counts = []
            for entry in (task, f"{task}_dev", f"{task}_test"):
                counts.append(
                    str(len(read_records(resolve_file(folder, entry, info[entry])))) if entry in info else "-"
                )
            labels = info.get(task, {}).get("label_list")
            label_text = ", ".join(labels) if labels else "(no label set: exact match and ROUGE-L)"
            lines.append(f"  {task:12s} {counts[0]:>6s} {counts[1]:>6s} {counts[2]:>6s}  {label_text}")
    return lines


def describe_benchmarks(extra: str | None = None) -> str:
    folders = list(shipped_benchmarks().values())
    if extra:
        folders.append(Path(extra))
    return "\n".join(line for folder in folders for line in describe_folder(folder))
