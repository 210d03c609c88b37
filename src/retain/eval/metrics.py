"""Continual-learning metrics from the accuracy matrix.

`R` has T+1 rows and T columns: row 0 is the base model, row k (1..T) the model after training
task k, and `R[k][i]` the accuracy on task i (1-based columns written i = 1..T below; the lists
are 0-based). A missing entry is None; a metric that needs a missing entry is None, never a
number computed as if the entry were 0. Every mean is the plain mean over tasks.

- Last       = mean_i R[T][i]
- Avg        = mean_k ( mean_{i<=k} R[k][i] )            (average incremental accuracy)
- LA         = mean_i R[i][i]                             (learning accuracy: each task just after its training)
- BWT        = mean_{i<T} ( R[T][i] - R[i][i] )          (backward transfer; < 0 is forgetting)
- FWT        = mean_{i>1} ( R[i-1][i] - R[0][i] )        (forward transfer, against the base row)
- Forgetting = mean_{i<T} ( max_{i<=k<T} R[k][i] - R[T][i] )

With every entry present, Last = LA + (T-1)/T * BWT: the final accuracy is what was learned plus what
was gained or lost afterwards.

Micro averages pool test rows instead of tasks (C: correct rows, N: scored rows of each entry):
- Last (micro) = sum_i C[T][i] / sum_i N[T][i]
- Avg (micro)  = mean_k ( sum_{i<=k} C[k][i] / sum_{i<=k} N[k][i] )
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _check(matrix: Matrix) -> int:
    tasks = len(matrix[0]) if matrix else 0
    if len(matrix) != tasks + 1 or any(len(row) != tasks for row in matrix):
        raise ValueError(f"expected a (T+1) x T matrix, got {len(matrix)} rows")
    for row in matrix:
        for value in row:
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"accuracy {value} outside [0, 1]")
    return tasks


def last(matrix: Matrix) -> float | None:
    t = _check(matrix)
    return _mean([matrix[t][i] for i in range(t)])


def avg(matrix: Matrix) -> float | None:
    t = _check(matrix)
    return _mean([_mean([matrix[k][i] for i in range(k)]) for k in range(1, t + 1)])


def learning_accuracy(matrix: Matrix) -> float | None:
    t = _check(matrix)
    return _mean([matrix[i + 1][i] for i in range(t)])


def bwt(matrix: Matrix) -> float | None:
    t = _check(matrix)
    if t < 2:
        return None
    return _mean([_diff(matrix[t][i], matrix[i + 1][i]) for i in range(t - 1)])


def fwt(matrix: Matrix) -> float | None:
    t = _check(matrix)
    if t < 2:
        return None
    return _mean([_diff(matrix[i][i], matrix[0][i]) for i in range(1, t)])


def forgetting(matrix: Matrix) -> float | None:
    t = _check(matrix)
    if t < 2:
        return None
    values: list[float | None] = []
    for i in range(t - 1):
        history = [matrix[k][i] for k in range(i + 1, t)]
        if any(v is None for v in history) or matrix[t][i] is None:
            values.append(None)
        else:
            values.append(max(history) - matrix[t][i])  # type: ignore[operator,type-var]
    return _mean(values)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def all_metrics(matrix: Matrix) -> dict[str, float | None]:
    return {
        "last": last(matrix),
        "avg": avg(matrix),
        "learning_accuracy": learning_accuracy(matrix),
        "bwt": bwt(matrix),
        "fwt": fwt(matrix),
        "forgetting": forgetting(matrix),
    }


def _pooled(correct: list[int | None], scored: list[int | None]) -> float | None:
    if any(v is None for v in [*correct, *scored]) or not sum(scored):  # type: ignore[arg-type]
        return None
    return sum(correct) / sum(scored)  # type: ignore[arg-type]


def micro_metrics(correct: Matrix | None, scored: Matrix | None) -> dict[str, float | None]:
    """Last and Avg over test rows (None when an entry has no row counts, e.g. an F1 over entities)."""
    if correct is None or scored is None:
        return {"last_micro": None, "avg_micro": None}
    t = len(correct) - 1
    per_step = [_pooled(list(correct[k][:k]), list(scored[k][:k])) for k in range(1, t + 1)]
    return {"last_micro": _pooled(list(correct[t]), list(scored[t])), "avg_micro": _mean(per_step)}
