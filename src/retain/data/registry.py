"""LLaMA-Factory-style `dataset_info.json` and `benchmark_info.json`, and the rows they point at."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain.errors import DataError
from retain.io import json_error

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": None,
    "history": None,
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None}
#: `formatting: tagging` (word-level tasks): one row = words plus one BIO tag per word.
TAGGING_COLUMNS = {"tokens": "tokens", "tags": "tags", "instruction": "instruction"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}
#: LLaMA-Factory's registry keys for multimodal, tool and preference data: accepted and not read (the
#: rows' text is read as usual).
UNREAD_REGISTRY_KEYS = {
    "images",
    "videos",
    "audios",
    "tools",
    "chosen",
    "rejected",
    "kto_tag",
    "observation_tag",
    "function_tag",
}


@dataclass
class Example:
    """One row: the conversation up to the answer, and the answer to learn or predict."""

    messages: list[dict[str, str]]
    answer: str
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (gzipped when its name ends in .gz) that must exist and not be empty."""
    if not path.is_file():
        raise DataError(f"{what} not found", source=str(path))
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8-sig")  # a byte-order mark (as some editors write) is dropped
    except (OSError, EOFError) as exc:  # a broken gzip stream
        raise DataError(f"not a readable gzip file ({exc})", source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start]:#04x})", source=str(path)
        ) from None
    if not text.strip():
        raise DataError(f"the {what} is empty", source=str(path))
    return text


def parse_json(text: str, path: Path, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {line}: " if line is not None else ""
        raise DataError(f"malformed JSON: {where}{json_error(exc)}", source=str(path)) from None


def read_json(path: Path, what: str) -> Any:
    return parse_json(read_text(path, what), path)


def load_dataset_info(dataset_dir: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(dataset_dir) / "dataset_info.json"
    info = read_json(path, "dataset registry")
    if not isinstance(info, dict):
        raise DataError("expected an object of dataset entries", source=str(path))
    for name, entry in info.items():
        if not isinstance(entry, dict):
            raise DataError("expected an object with 'file_name'", source=str(path), field=name)
    return info


def benchmark_tasks(benchmark_dir: str | Path, benchmark: str, order: str) -> list[str]:
    path = Path(benchmark_dir) / "benchmark_info.json"
    info = read_json(path, "benchmark registry")
    if not isinstance(info, dict) or benchmark not in info:
        known = ", ".join(sorted(info)) if isinstance(info, dict) else "none"
        raise DataError(f"no benchmark '{benchmark}' (known: {known})", source=str(path), field="benchmark")
    orders = info[benchmark].get("orders", {}) if isinstance(info[benchmark], dict) else {}
    if order not in orders:
        raise DataError(
            f"no order '{order}' in benchmark '{benchmark}' (known: {', '.join(sorted(orders)) or 'none'})",
            source=str(path),
            field="benchmark_order",
        )
    tasks = orders[order]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise DataError(
            "expected a non-empty list of task names", source=str(path), field=f"{benchmark}.{order}"
        )
    return tasks


def entry(info: dict[str, Any], name: str, dataset_dir: Path) -> dict[str, Any]:
    if name not in info:
        raise DataError(
            f"no dataset entry '{name}'", source=str(dataset_dir / "dataset_info.json"), field=name
        )
    return info[name]


def resolve_file(dataset_dir: Path, name: str, spec: dict[str, Any]) -> Path:
    """The data file of an entry; it must lie inside `dataset_dir`."""
    registry = str(dataset_dir / "dataset_info.json")
    file_name = spec.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise DataError("missing 'file_name'", source=registry, field=name)
    root = dataset_dir.resolve()
    path = (root / file_name).resolve()
    if not path.is_relative_to(root):
        raise DataError(
            f"file_name '{file_name}' points outside the dataset directory {root}",
            source=registry,
            field=name,
        )
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON Lines (one object per line, in a .jsonl or a .json file)."""
    text = read_text(path, "data file")
    if path.name.removesuffix(".gz").endswith(".jsonl") or text.lstrip().startswith("{"):
        numbered = ((n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip())
        records = [parse_json(line, path, line=n) for n, line in numbered]
    else:
        records = parse_json(text, path)
    if not isinstance(records, list):
        raise DataError("expected a list of rows (a JSON list, or JSON Lines)", source=str(path))
    if not records:
        raise DataError("the dataset has no rows", source=str(path))
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"row {index}: expected an object", source=str(path))
    return records


def _text(record: dict[str, Any], column: str, path: Path, index: int, required: bool) -> str:
    value = record.get(column)
    if value is None:
        if required:
            raise DataError(f"row {index}: missing column '{column}'", source=str(path))
        return ""
    if not isinstance(value, str):
        raise DataError(f"row {index}: column '{column}' must be a string", source=str(path))
    return value


def _alpaca(records: list[dict[str, Any]], columns: dict[str, Any], path: Path) -> list[Example]:
    cols = {**ALPACA_COLUMNS, **columns}
    examples = []
    for index, record in enumerate(records):
        prompt = _text(record, cols["prompt"], path, index, required=True)
        query = _text(record, cols["query"], path, index, required=False) if cols["query"] else ""
        answer = _text(record, cols["response"], path, index, required=True)
        system = _text(record, cols["system"], path, index, required=False) if cols["system"] else ""
        messages: list[dict[str, str]] = []
        if cols["history"] and record.get(cols["history"]):
            history = record[cols["history"]]
            if not isinstance(history, list) or not all(
                isinstance(t, list | tuple) and len(t) == 2 for t in history
            ):
                raise DataError(
                    f"row {index}: '{cols['history']}' must be a list of [query, answer] pairs",
                    source=str(path),
                )
            for old_query, old_answer in history:
                messages += [
                    {"role": "user", "content": str(old_query)},
                    {"role": "assistant", "content": str(old_answer)},
                ]
        content = f"{prompt}\n{query}" if query else prompt
        messages.append({"role": "user", "content": content})
        examples.append(
            Example(messages=messages, answer=answer, system=system or None, extra={"instruction": prompt})
        )
    return examples


def _sharegpt(
    records: list[dict[str, Any]], columns: dict[str, Any], tag_names: dict[str, Any], path: Path
) -> list[Example]:
    cols = {**SHAREGPT_COLUMNS, **columns}
    tags = {**SHAREGPT_TAGS, **tag_names}
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    examples = []
    for index, record in enumerate(records):
        turns = record.get(cols["messages"])
        if not isinstance(turns, list) or not turns:
            raise DataError(
                f"row {index}: missing column '{cols['messages']}' (a list of turns)", source=str(path)
            )
        system = _text(record, cols["system"], path, index, required=False) if cols["system"] else ""
        messages = []
        for turn_index, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get(tags["role_tag"]) not in roles:
                raise DataError(
                    f"row {index}, turn {turn_index}: expected '{tags['role_tag']}' in {sorted(roles)}",
                    source=str(path),
                )
            content = turn.get(tags["content_tag"])
            if not isinstance(content, str):
                raise DataError(
                    f"row {index}, turn {turn_index}: missing '{tags['content_tag']}' text", source=str(path)
                )
            role = roles[turn[tags["role_tag"]]]
            if role == "system":
                system = content
            else:
                messages.append({"role": role, "content": content})
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"row {index}: the last turn must be the assistant's answer", source=str(path))
        examples.append(
            Example(messages=messages[:-1], answer=messages[-1]["content"], system=system or None)
        )
    return examples


def _tagging(records: list[dict[str, Any]], columns: dict[str, Any], path: Path) -> list[Example]:
    """Word-level rows: a list of words and one BIO tag per word (`O`, `B-TYPE`, `I-TYPE`).

    The conversation is the words joined by spaces and the answer the tags joined by spaces, so
    generative methods can still train on such a task; `extra` keeps the `tokens` and `tags` lists
    (and the optional instruction) for token-classification methods.
    """
    cols = {**TAGGING_COLUMNS, **columns}
    examples = []
    for index, record in enumerate(records):
        words, tags = record.get(cols["tokens"]), record.get(cols["tags"])
        for column, value in ((cols["tokens"], words), (cols["tags"], tags)):
            if not isinstance(value, list) or not value or not all(isinstance(x, str) and x for x in value):
                raise DataError(
                    f"row {index}: column '{column}' must be a non-empty list of non-empty strings",
                    source=str(path),
                )
        assert isinstance(words, list) and isinstance(tags, list)
        if len(words) != len(tags):
            raise DataError(
                f"row {index}: {len(words)} tokens but {len(tags)} tags (one tag per token)", source=str(path)
            )
        bad = next((tag for tag in tags if not is_bio_tag(tag)), None)
        if bad is not None:
            raise DataError(f"row {index}: tag '{bad}' is not O, B-TYPE or I-TYPE", source=str(path))
        if any(" " in word for word in words):
            raise DataError(f"row {index}: a token contains a space", source=str(path))
        instruction = (
            _text(record, cols["instruction"], path, index, required=False) if cols["instruction"] else ""
        )
        examples.append(
            Example(
                messages=[{"role": "user", "content": " ".join(words)}],
                answer=" ".join(tags),
                extra={"tokens": list(words), "tags": list(tags), "instruction": instruction},
            )
        )
    return examples


def is_bio_tag(tag: str) -> bool:
    return tag == "O" or (len(tag) > 2 and tag[:2] in ("B-", "I-") and not tag[2:].isspace())


def load_examples(dataset_dir: str | Path, info: dict[str, Any], name: str) -> list[Example]:
    """Read and parse the rows of one registry entry."""
    dataset_dir = Path(dataset_dir)
    spec = entry(info, name, dataset_dir)
    path = resolve_file(dataset_dir, name, spec)
    registry = str(dataset_dir / "dataset_info.json")
    formatting = spec.get("formatting", "alpaca")
    defaults = {"alpaca": ALPACA_COLUMNS, "sharegpt": SHAREGPT_COLUMNS, "tagging": TAGGING_COLUMNS}
    if formatting not in defaults:
        raise DataError(
            f"unknown formatting '{formatting}' (expected alpaca, sharegpt or tagging)",
            source=registry,
            field=name,
        )
    columns = _names(spec, "columns", defaults[formatting], registry, name)
    records = read_records(path)
    if formatting == "alpaca":
        return _alpaca(records, columns, path)
    if formatting == "sharegpt":
        return _sharegpt(records, columns, _names(spec, "tags", SHAREGPT_TAGS, registry, name), path)
    return _tagging(records, columns, path)


def _names(spec: dict[str, Any], key: str, known: dict[str, Any], registry: str, name: str) -> dict[str, Any]:
    """An entry's `columns` or `tags`: a mapping from the keys in `known` to names (null: no such column)."""
    names = spec.get(key) or {}
    if not isinstance(names, dict) or not all(v is None or isinstance(v, str) for v in names.values()):
        raise DataError(
            f"'{key}' must map each key to a name (a string, or null)", source=registry, field=name
        )
    unknown = sorted(set(names) - set(known) - UNREAD_REGISTRY_KEYS)
    if unknown:
        raise DataError(
            f"unknown '{key}' key {', '.join(map(repr, unknown))} (known: {', '.join(known)})",
            source=registry,
            field=name,
        )
    return {k: v for k, v in names.items() if k in known}
