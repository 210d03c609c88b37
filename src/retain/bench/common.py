"""What every sub-benchmark shares: options, timing, peak memory, machine facts, JSON and tables.

Timing rule: every figure is the median over `--repeats` measurements taken after `--warmup`
untimed rounds. Variants that are compared (methods, evaluators, routings) are measured side by
side in one process and interleaved within each repeat, with the order rotated from repeat to
repeat, so that drift of the machine (other jobs, thermal state) hits all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from retain.errors import ConfigError
from retain.io import atomic_write_json, make_writable_dir

#: The model of the published figures.
DEFAULT_MODEL = "smollm2-135m-instruct"

JSON_VERSION = 1


# ---- options ----------------------------------------------------------------------------------------


def add_common(parser: argparse.ArgumentParser, *, model: str = DEFAULT_MODEL, repeats: int = 5) -> None:
    parser.add_argument(
        "--model",
        default=model,
        help=f"model alias or path: tiny-random-llama (smoke runs), smollm2-135m-instruct, ... (default {model})",
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed repeats; figures are medians (default {repeats})"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats (default 1)")
    parser.add_argument(
        "--json", dest="json_path", metavar="PATH", help="write the raw samples and results here"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, adapters and replay draws")


def add_benchmark_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmark-dir",
        default=None,
        help="folder of the LNT benchmark (default: the copy shipped with retain)",
    )


def lnt_folder(args: argparse.Namespace) -> Path:
    """`--benchmark-dir`, or the LNT copy shipped with retain."""
    from retain.data.builtin import shipped_benchmark

    folder = Path(args.benchmark_dir) if args.benchmark_dir else shipped_benchmark("LNT")
    if folder is None or not (folder / "dataset_info.json").is_file():
        raise ConfigError(f"no LNT benchmark at {folder} (no dataset_info.json): pass --benchmark-dir")
    return folder


def add_data(parser: argparse.ArgumentParser, *, lnt_tasks: str, demo_tasks: str) -> None:
    parser.add_argument(
        "--data",
        choices=("lnt", "demo"),
        default="lnt",
        help="lnt: tasks of the LNT benchmark from --benchmark-dir; demo: the built-in demo tasks",
    )
    add_benchmark_dir(parser)
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated task names (default: {lnt_tasks} for lnt, {demo_tasks} for demo)",
    )
    parser.set_defaults(_lnt_tasks=lnt_tasks, _demo_tasks=demo_tasks)


def add_cutoff(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cutoff-len",
        type=int,
        default=None,
        help="tokens per row at most (default: the longest row loaded, so that no answer is cut)",
    )


def fitting_cutoff(values: dict[str, Any]) -> int:
    """The longest row (prompt + answer) among the train rows `values` selects: a cutoff that cuts nothing."""
    from retain.cl.registry import parse_config
    from retain.data.prompt import PromptBuilder
    from retain.data.tasks import load_tasks
    from retain.model.loader import load_model

    config = parse_config(values)
    _, tokenizer = load_model(config.model)
    builder = PromptBuilder(tokenizer, config.data.template)
    rows = [e for task in load_tasks(config.data) for e in task.train]
    return max(len(builder.prompt_ids(e)) + len(builder.answer_ids(e.answer)) for e in rows)


def check_common(args: argparse.Namespace) -> None:
    """The options every sub-benchmark shares, before any work: a bad one must not cost a run's figures."""
    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    if args.json_path:
        path = Path(args.json_path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a file", field="--json")
        make_writable_dir(path.parent, "--json", ConfigError)


def task_names(args: argparse.Namespace) -> list[str]:
    text = args.tasks or (args._lnt_tasks if args.data == "lnt" else args._demo_tasks)
    return [name.strip() for name in text.split(",") if name.strip()]


def data_values(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Config keys that select `names` from the chosen data source."""
    if args.data == "demo":
        return {"dataset_dir": "builtin://demo", "cl_tasks": ",".join(names)}
    return {"dataset_dir": str(lnt_folder(args)), "cl_tasks": ",".join(names)}


# ---- environment ------------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, quiet progress bars and the device; returns the device."""
    check_common(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back what the engine prints (Trainer log dicts, progress bars, warnings), so that the output
    is the table; on an error, what was printed to stderr is shown before the error propagates."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stderr.write(err.getvalue())
        raise


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.__stderr__ or sys.stderr, flush=True)  # even inside quiet()


@contextlib.contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Discard what native code writes to file descriptor 2 (the profiler's start/stop lines)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- timing ------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleave(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    label: str | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per call of each variant: `warmup` untimed rounds, then `repeats` timed ones.

    Within a round every variant runs once; the order rotates by one each round. Returns the
    samples and each variant's last result.
    """
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for round_index in range(warmup + repeats):
        if label:
            kind = "warm-up" if round_index < warmup else "repeat"
            number = round_index + 1 if round_index < warmup else round_index - warmup + 1
            progress(f"{label}: {kind} {number}/{warmup if round_index < warmup else repeats}")
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with quiet():
                seconds, results[name] = timed(variants[name], device)
            if round_index >= warmup:
                samples[name].append(seconds)
    return samples, results


# ---- memory ------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak bytes of tensor memory allocated above the level at entry, and what is still held at exit.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak. CPU: torch's CPU allocator
    reports every allocation and free to the profiler (`profile_memory=True`); the running sum in
    time order gives the peak. (tracemalloc cannot see torch's allocations, and the process RSS
    mostly shows what glibc keeps cached.) If the profiler's event tree is unavailable, the peak
    RSS above the RSS at entry is used instead (`method` says which).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.held_bytes = 0
        self.method = "cuda" if device.type == "cuda" else "profiler"

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._sampler = _RssSampler()
            self._profiler = profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False
            )
            self._sampler.start()
            with _fd2_silenced():
                self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.held_bytes = torch.cuda.memory_allocated(self.device) - self._base
            return
        with _fd2_silenced():
            self._profiler.__exit__(*exc)
        rss_peak = self._sampler.stop()
        if exc[0] is not None:
            return
        events = _allocation_events(self._profiler)
        if events is None:
            self.method = "rss"
            self.peak_bytes, self.held_bytes = rss_peak, 0
            return
        current = peak = 0
        for _, size in sorted(events):
            current += size
            peak = max(peak, current)
        self.peak_bytes, self.held_bytes = peak, current


def _allocation_events(prof: Any) -> list[tuple[int, int]] | None:
    """(time, bytes) of every CPU allocation (+) and free (-) the profiler saw; None if unavailable."""
    try:
        from torch._C._profiler import _EventType

        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, ImportError, RuntimeError):
        return None
    out: list[tuple[int, int]] = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == torch.device("cpu").type:
            out.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return out


class _RssSampler:
    """Peak resident set size above the level at start, sampled every millisecond (fallback only)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def start(self) -> None:
        self._base = self._peak = self._rss()

        def loop() -> None:
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, self._rss()) - self._base


# ---- output ------------------------------------------------------------------------------------------


def report(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    settings: dict[str, Any],
    body: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The JSON document of one sub-benchmark: written to `--json` when given, printed as a table."""
    out = {
        "benchmark": name,
        "version": JSON_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "retain bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "model": args.model,
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": machine_info(device),
        "settings": settings,
        **body,
    }
    if args.json_path:
        atomic_write_json(args.json_path, json.loads(json.dumps(out, default=str)))
    print(header(args, device, name))
    print(render(out))
    return out


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (readable as text, pasteable into docs)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def mib(value: float | None) -> float | None:
    return None if value is None else value / (1 << 20)


def header(args: argparse.Namespace, device: torch.device, what: str) -> str:
    return (
        f"retain bench {what}: model {args.model}, {device.type}, {torch.get_num_threads()} torch threads, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )


# ---- generated tasks -----------------------------------------------------------------------------------

_WORDS = (
    "amber birch cedar delta ember fjord garnet harbor iris juniper kestrel lagoon maple nectar opal prairie "
    "quartz raven sierra tundra umber violet willow xenon yarrow zephyr anchor beacon canyon dune"
).split()
_CLASS_WORDS = ("north", "south", "east", "west", "up", "down", "left", "right")


def write_generated_tasks(
    root: Path, count: int, train_rows: int, test_rows: int, classes: int = 2, seed: int = 0
) -> list[str]:
    """`count` tasks of the same size and shape in the dataset_info.json layout; returns their names.

    Task t asks which of its own `classes` labels (`north-t`, `south-t`, ...) a row of 8 random words
    belongs to; the label is a function of the first word, so the tasks are learnable, and every
    task has its own instruction and labels, so they are distinct (and a router can tell them apart).
    """
    if classes > len(_CLASS_WORDS):
        raise ConfigError(f"at most {len(_CLASS_WORDS)} classes per generated task")
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    names = []
    for t in range(count):
        name = f"gen{t:02d}"
        labels = [f"{_CLASS_WORDS[c]}-{t}" for c in range(classes)]
        instruction = (
            f"Task {t}: which class do these words belong to? Answer with one of: {', '.join(labels)}."
        )
        rows = []
        for _ in range(train_rows + test_rows):
            words = rng.sample(_WORDS, 8)
            label = labels[_WORDS.index(words[0]) % classes]
            rows.append({"instruction": instruction, "input": " ".join(words), "output": label})
        for entry, part, split in (
            (name, rows[:train_rows], "train"),
            (f"{name}_test", rows[train_rows:], "test"),
        ):
            (root / f"{entry}.json").write_text(json.dumps(part))
            info[entry] = {"file_name": f"{entry}.json", "formatting": "alpaca", "split": split}
        names.append(name)
    (root / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return names
