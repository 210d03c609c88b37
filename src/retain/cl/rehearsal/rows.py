"""Pseudo-rows as text: alpaca rows from examples and back, the few-shot prompt and its parser, counting.

A pseudo-row is an alpaca dict `{"instruction", "input", "output"}` (LAMOL's files add `"task"`).
retain's alpaca reader builds the user turn as `instruction + "\\n" + input` (or `instruction` alone),
so `alpaca_to_example(example_to_alpaca(e))` asks the model exactly what `e` asked (the last user
turn; a system prompt and earlier turns are not part of a pseudo-row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from retain.data.registry import Example

PseudoRow = dict[str, str]

#: The few-shot prompt (pseudo_replay, ssr): a header, `num_shots` blocks, then the opening of a new block.
FEW_SHOT_HEADER = (
    "Below are examples of one task. Write one more example of the same task, in the same format.\n\n"
)
NO_INPUT = "<noinput>"
BLOCK_END = "\n\n"


def question_of(example: Example) -> str:
    """The user turn the answer responds to (the last message)."""
    return example.messages[-1]["content"]


def example_to_alpaca(example: Example) -> PseudoRow:
    """The row as alpaca fields: the user turn split into the original instruction and input when the
    reader kept the instruction (alpaca data), else at its first newline."""
    question = question_of(example)
    instruction = example.extra.get("instruction")
    if instruction and question == instruction:
        return {"instruction": instruction, "input": "", "output": example.answer}
    if instruction and question.startswith(instruction + "\n"):
        return {
            "instruction": instruction,
            "input": question[len(instruction) + 1 :],
            "output": example.answer,
        }
    return question_to_alpaca(question, example.answer)


def question_to_alpaca(question: str, answer: str) -> PseudoRow:
    instruction, _, input_text = question.partition("\n")
    return {"instruction": instruction, "input": input_text, "output": answer}


def alpaca_to_example(row: PseudoRow, prefix: str = "") -> Example:
    """The example retain's alpaca reader makes of `row` (with `prefix` before the instruction)."""
    instruction = prefix + row["instruction"]
    content = f"{instruction}\n{row['input']}" if row["input"] else instruction
    return Example(
        messages=[{"role": "user", "content": content}],
        answer=row["output"],
        extra={"instruction": instruction},
    )


# ---- the few-shot prompt (pseudo_replay, ssr) ----------------------------------------------------------


def shot_block(row: PseudoRow) -> str:
    return f"Instruction: {row['instruction']}\nInput: {row['input'] or NO_INPUT}\nOutput: {row['output']}"


def few_shot_prompt(shots: Sequence[PseudoRow]) -> str:
    """The header, one block per shot, and `Instruction:` for the model to continue with a new block."""
    return FEW_SHOT_HEADER + "".join(shot_block(row) + BLOCK_END for row in shots) + "Instruction:"


def few_shot_request(tokenizer, shots: Sequence[PseudoRow]) -> tuple[list[int], int]:
    """The prompt's token ids and the new tokens each completion may take: twice the longest shot block,
    so that a complete block and the blank line that ends it fit."""
    prompt = tokenizer(few_shot_prompt(shots))["input_ids"]
    longest = max(
        len(tokenizer(shot_block(s) + BLOCK_END, add_special_tokens=False)["input_ids"]) for s in shots
    )
    return prompt, 2 * longest


def parse_few_shot_completion(text: str, finished: bool, need_output: bool = True) -> PseudoRow | None:
    """The new block the model wrote after the prompt's final `Instruction:`, or None (malformed).

    The block ends at the first blank line or the first `\\nInstruction:` (the start of another block);
    without either, only a generation that stopped by itself (`finished`: a stop token, not the token
    limit) counts as complete. It needs `\\nInput:` then `\\nOutput:`; `<noinput>` means an empty
    input. Malformed: no end, a missing field marker, an empty instruction, or (with `need_output`)
    an empty output.
    """
    ends = [i for i in (text.find(BLOCK_END), text.find("\nInstruction:")) if i >= 0]
    if ends:
        text = text[: min(ends)]
    elif not finished:
        return None
    instruction, found_input, rest = text.partition("\nInput:")
    input_text, found_output, output = rest.partition("\nOutput:")
    if not (found_input and found_output):
        return None
    instruction, input_text, output = instruction.strip(), input_text.strip(), output.strip()
    if input_text == NO_INPUT:
        input_text = ""
    if not instruction or (need_output and not output):
        return None
    return {"instruction": instruction, "input": input_text, "output": output}


# ---- counting ------------------------------------------------------------------------------------------


def keep_well_formed(
    parsed: Sequence[dict[str, Any] | None], identity: Callable[[dict[str, Any]], Hashable]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop malformed generations (None) and repeats (same `identity` as an earlier kept row).

    Returns the kept rows in generation order and the counts `generated = malformed + duplicates + kept`.
    """
    kept, seen, malformed, duplicates = [], set(), 0, 0
    for row in parsed:
        if row is None:
            malformed += 1
            continue
        key = identity(row)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(row)
    counts = {"generated": len(parsed), "malformed": malformed, "duplicates": duplicates, "kept": len(kept)}
    return kept, counts


def alpaca_identity(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["instruction"], row["input"], row["output"]


def derived_seed(*parts: object) -> int:
    """A seed in [0, 2**31) from the parts (run seed, method, task, purpose): stable across runs and
    processes (no Python hash randomisation), different for different parts."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") >> 1
