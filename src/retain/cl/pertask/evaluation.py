"""Evaluation of `peft` with heads: which adapters and heads answer, batched predictions, scores.

Modes (`evaluation_mode`): `fresh` (task not trained yet: bare backbone, freshly seeded head),
`til` (the evaluated task's adapter and head), `all` (every seen task's adapter and head over the
global label space), `hard` (the router picks one task per row) and `soft` (every seen task's head,
each weighted by the router's weight for the row: `router.soft_scores`).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn

from retain.cl.pertask.encoding import EvalRows
from retain.cl.pertask.labels import LabelSpace
from retain.cl.pertask.model import PerTaskModel, eval_mode
from retain.cl.pertask.router import route, soft_scores
from retain.cl.pertask.tagging import entity_f1
from retain.data.prompt import pad_batch
from retain.errors import DataError
from retain.eval.predict import Score


def evaluation_mode(il_mode: str, routing: str, trained: int | None, evaluated: int) -> tuple[str, int]:
    """The mode for scoring task `evaluated` after training task `trained` (None: base row), and the
    last task whose adapter may answer."""
    if trained is None or evaluated > trained:
        return "fresh", evaluated
    if il_mode == "TIL":
        return "til", trained
    return routing, trained


def to_global(space: LabelSpace, index: int, til: torch.Tensor) -> torch.Tensor:
    """Task `index`'s TIL class indices -> global class indices."""
    table = torch.tensor(space.til_to_global(index), device=til.device)
    return table[til]


def predict_batch(
    model: PerTaskModel,
    space: LabelSpace,
    mode: str,
    evaluated: int,
    last: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    fresh_head: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global class per row (sentence) or per token (word), and the routed task per row (or None)."""
    if mode == "fresh":
        hidden, _ = model.hidden(ids, mask, None)
        logits = fresh_head(model.features(hidden, mask, 0))
        return to_global(space, evaluated, logits.argmax(-1)), None
    if mode == "til":
        return to_global(space, evaluated, model.til_logits(evaluated, ids, mask).argmax(-1)), None
    routed = weights = None
    if model.router is not None:  # one feature pass: the routed task (reported) and the soft weights
        weights = model.router(model.router_features(ids, mask))
        routed = route(weights, last + 1)
    if mode == "all":
        logits = torch.cat([model.head_logits(j, ids, mask) for j in range(last + 1)], dim=-1)
        return logits.argmax(-1), routed
    if mode == "soft":
        heads = [model.head_logits(j, ids, mask) for j in range(last + 1)]
        return soft_scores(heads, weights).argmax(-1), routed
    # hard routing: one adapter pass per row, with the task the router picked
    out = None
    for chosen in routed.unique().tolist():
        rows = routed == chosen
        glob = to_global(space, chosen, model.til_logits(chosen, ids[rows], mask[rows]).argmax(-1))
        if out is None:
            out = torch.zeros((ids.size(0), *glob.shape[1:]), dtype=torch.long, device=ids.device)
        out[rows] = glob
    return out, routed


def predict_rows(
    model: PerTaskModel,
    space: LabelSpace,
    mode: str,
    evaluated: int,
    last: int,
    input_ids: list[list[int]],
    batch_size: int,
    pad_id: int,
    fresh_head: nn.Module | None = None,
) -> tuple[list[Any], list[int] | None]:
    """`predict_batch` over all rows, split across processes and gathered (longest rows first)."""
    state = PartialState()
    order = sorted(range(len(input_ids)), key=lambda r: len(input_ids[r]), reverse=True)
    device = next(model.parameters()).device
    mine: list[tuple[int, Any, int | None]] = []
    with eval_mode(model), torch.no_grad(), state.split_between_processes(order) as local:
        for start in range(0, len(local), batch_size):
            batch_rows = local[start : start + batch_size]
            batch = pad_batch(
                [{"input_ids": input_ids[r]} for r in batch_rows], pad_id, "right", ("input_ids",)
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            glob, routed = predict_batch(model, space, mode, evaluated, last, ids, mask, fresh_head)
            for j, r in enumerate(batch_rows):
                value = glob[j, : len(input_ids[r])].tolist() if glob.dim() == 2 else int(glob[j])
                mine.append((r, value, None if routed is None else int(routed[j])))
    pairs = gather_object(mine) if state.num_processes > 1 else mine
    predictions: list[Any] = [None] * len(input_ids)
    routes: list[int] = [0] * len(input_ids)
    for r, value, chosen in pairs:
        predictions[r] = value
        routes[r] = -1 if chosen is None else chosen
    has_routes = any(chosen is not None for _, _, chosen in pairs)
    return predictions, routes if has_routes else None


def sentence_score(
    space: LabelSpace, evaluated: int, last: int, rows: EvalRows, predictions: list[int], name: str
) -> Score:
    """Accuracy over the rows whose answer is one of the task's labels; predictions of another task's
    classes are written as `task:label`."""
    glob = space.global_labels(max(evaluated, last))
    pre = space.pre_accum(evaluated)[evaluated]
    correct = scored = 0
    texts = []
    for gold, predicted in zip(rows.targets, predictions, strict=True):
        owner, text = glob[predicted]
        texts.append(text if owner == evaluated else f"{space.names[owner]}:{text}")
        if gold >= 0:
            scored += 1
            correct += predicted == pre + gold
    if scored == 0:
        raise DataError(f"task '{name}': no test row has a gold answer among the task's labels")
    return Score(
        accuracy=correct / scored,
        correct=correct,
        scored=scored,
        unlabeled=len(rows.targets) - scored,
        predictions=texts,
    )


def word_score(
    space: LabelSpace, evaluated: int, last: int, gold: list[list[str]], rows: EvalRows, predictions
) -> Score:
    """Entity-level F1 of the predicted tags (a word cut away by `cutoff_len` is predicted "O")."""
    glob = space.global_labels(max(evaluated, last))
    predicted = [
        [glob[tokens[s]][1] if s >= 0 else "O" for s in starts]
        for starts, tokens in zip(rows.targets, predictions, strict=True)
    ]
    result = entity_f1(gold, predicted)
    return Score(
        accuracy=result.f1,
        correct=result.true_positives,
        scored=len(gold),
        unlabeled=0,
        predictions=[" ".join(p) for p in predicted],
        extra={"entity_precision": result.precision, "entity_recall": result.recall},
        row_accuracy=False,
    )
