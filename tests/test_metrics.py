import math

import pytest

from retain.eval import metrics

# Rows: base, after t1, after t2, after t3. Columns: t1, t2, t3.
R = [
    [0.10, 0.20, 0.30],
    [0.90, 0.25, 0.35],
    [0.60, 0.80, 0.40],
    [0.50, 0.70, 0.95],
]


def test_metrics_against_hand_computation():
    assert metrics.last(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    # Avg: after t1 -> 0.90; after t2 -> (0.60+0.80)/2 = 0.70; after t3 -> (0.50+0.70+0.95)/3
    assert metrics.avg(R) == pytest.approx((0.90 + 0.70 + (0.50 + 0.70 + 0.95) / 3) / 3)
    # BWT: (0.50-0.90 + 0.70-0.80) / 2 = -0.25
    assert metrics.bwt(R) == pytest.approx(-0.25)
    # FWT: (R[1][1]-R[0][1] + R[2][2]-R[0][2]) / 2 = (0.25-0.20 + 0.40-0.30)/2 = 0.075
    assert metrics.fwt(R) == pytest.approx(0.075)
    # Forgetting: t1: max(0.90, 0.60) - 0.50 = 0.40; t2: max(0.80) - 0.70 = 0.10 -> 0.25
    assert metrics.forgetting(R) == pytest.approx(0.25)
    # LA: each task just after its training, (0.90 + 0.80 + 0.95) / 3
    assert metrics.learning_accuracy(R) == pytest.approx((0.90 + 0.80 + 0.95) / 3)


def test_last_is_learning_accuracy_plus_what_came_after():
    # Last = LA + (T-1)/T * BWT: the final task's own entry is in both Last and LA.
    values = metrics.all_metrics(R)
    assert values["last"] == pytest.approx(values["learning_accuracy"] + 2 / 3 * values["bwt"])


def test_plain_mean_not_weighted():
    # Two tasks; the metric must not depend on test-set sizes (which the matrix does not carry).
    R2 = [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]
    assert metrics.last(R2) == pytest.approx(0.75)


def test_missing_entry_is_never_zero():
    R_missing = [row[:] for row in R]
    R_missing[3][0] = None
    assert metrics.last(R_missing) is None
    assert metrics.bwt(R_missing) is None
    assert metrics.forgetting(R_missing) is None
    R_diagonal = [row[:] for row in R]
    R_diagonal[2][1] = None
    assert metrics.learning_accuracy(R_diagonal) is None
    # FWT does not need the final row, so it is still defined.
    assert metrics.fwt(R_missing) == pytest.approx(0.075)
    # A missing base row entry only affects FWT.
    R_base = [row[:] for row in R]
    R_base[0][2] = None
    assert metrics.fwt(R_base) is None
    assert metrics.last(R_base) == pytest.approx(metrics.last(R))


def test_seen_scope_matrix_has_every_needed_entry():
    # eval_scope=seen leaves R[k][i] for i > k+1 missing; every metric is still defined.
    R_seen = [row[:] for row in R]
    R_seen[1][2] = None
    values = metrics.all_metrics(R_seen)
    assert all(v is not None and not math.isnan(v) for v in values.values())


def test_single_task_and_shape_checks():
    R1 = [[0.2], [0.9]]
    assert metrics.last(R1) == pytest.approx(0.9)
    assert metrics.bwt(R1) is None and metrics.fwt(R1) is None and metrics.forgetting(R1) is None
    with pytest.raises(ValueError):
        metrics.last([[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError):
        metrics.last([[0.1], [1.5]])
