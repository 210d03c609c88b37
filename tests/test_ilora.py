"""I-LoRA: the math against hand computations, the buffer and the argument checks."""

import logging
from collections import Counter

import pytest
import torch

from retain.cl.ilora import ILORA, Buffer, ILORAArguments
from retain.cl.ilora.ilora import BUFFER_FILE
from retain.cl.ilora.ilora_math import (
    concat_right_padded,
    consistency_loss,
    ema_decay,
    ema_update_,
    resolve_hidden_layers,
    selective_mask,
)
from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import ConfigError
from tests.step_helpers import random_rows

# ---- pure math -----------------------------------------------------------------------------------------


def test_ema_decay_and_fused_update():
    assert [ema_decay(t, 0.25) for t in range(4)] == [0.0, 0.25, 0.25, 0.25]
    assert [ema_decay(t, 0.9) for t in range(4)] == [0.0, 0.5, pytest.approx(2 / 3), 0.75]
    assert ema_decay(5, 0.0) == 0.0
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    online = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    ema_update_(ema, online, 0.25)
    # 0.25 * ema + 0.75 * online
    assert ema[0].tolist() == [2.5, -1.0] and ema[1].tolist() == [[1.0]]
    ema_update_(ema, online, 0.0)
    assert torch.equal(ema[0], online[0]) and torch.equal(ema[1], online[1])


def test_consistency_loss_by_hand():
    # One layer, one row, two tokens, two hidden units.
    p = torch.tensor([[[1.0, -2.0], [3.0, 0.45]]], requires_grad=True)
    s = torch.tensor([[[0.5, -1.0], [3.5, 0.4]]])
    both = torch.tensor([[1, 1]])
    # plastic > stable at (0,0) and (1,1): those are their own target. The others pull to stable:
    # (-2 - -1)^2 + (3 - 3.5)^2 = 1.25, over 1 layer * 2 tokens * 2 units.
    loss = consistency_loss([p], [s], both, selective=True, threshold=0.0)
    assert loss.item() == pytest.approx(1.25 / 4)
    loss.backward()
    # d/dp (p - s)^2 / 4 = (p - s) / 2 where not selected, 0 where selected.
    assert p.grad.tolist() == [[[0.0, -0.5], [-0.25, 0.0]]]
    # Selective off: every element pulls to stable: 0.25 + 1 + 0.25 + 0.0025.
    off = consistency_loss([p], [s], both, selective=False)
    assert off.item() == pytest.approx(1.5025 / 4)
    # Padding masked: the second token is padding; the first gives 0 (selected) + 1, over 1 token * 2 units.
    assert consistency_loss([p], [s], torch.tensor([[1, 0]])).item() == pytest.approx(1.0 / 2)
    assert consistency_loss([p], [s], torch.tensor([[1, 0]]), selective=False).item() == pytest.approx(
        1.25 / 2
    )
    # Threshold 0.25 (relative): selected iff p > s + 0.25 |s|. 1 > 0.625 yes; 0.45 > 0.5 no, so the
    # last element now pulls to stable too: 1.25 + 0.0025.
    assert consistency_loss([p], [s], both, threshold=0.25).item() == pytest.approx(1.2525 / 4)
    # Threshold 1: 1 > 0.5 + 0.5 fails too: everything pulls, same as selective off.
    assert consistency_loss([p], [s], both, threshold=1.0).item() == pytest.approx(1.5025 / 4)
    # Two layers: the mean over layers. Second layer: all zeros vs all ones (never selected): 1 per element.
    p2, s2 = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    assert consistency_loss([p, p2], [s, s2], both).item() == pytest.approx((1.25 + 4.0) / 8)
    # An explicit token count (the trainer passes the step's count).
    assert consistency_loss([p], [s], both, num_tokens=4).item() == pytest.approx(1.25 / 8)


def test_threshold_zero_is_the_seed_rule():
    gen = torch.Generator().manual_seed(0)
    plastic = [torch.randn(2, 5, 8, generator=gen) for _ in range(3)]
    stable = [x + 0.3 * torch.randn(2, 5, 8, generator=gen) for x in plastic]
    stable[0][0, 0, :4] = plastic[0][0, 0, :4]  # ties are not selected by the seed either
    for p, s in zip(plastic, stable, strict=True):
        assert torch.equal(selective_mask(p, s, 0.0), p > s)
    # The seed's loss: mean over everything of (plastic - where(plastic > stable, plastic, stable))^2.
    reg = [torch.where(p > s, p, s) for p, s in zip(plastic, stable, strict=True)]
    seed = torch.mean(torch.cat([(p - r) ** 2 for p, r in zip(plastic, reg, strict=True)], dim=0))
    ours = consistency_loss(plastic, stable, torch.ones(2, 5), threshold=0.0)
    torch.testing.assert_close(ours, seed)


def test_resolve_hidden_layers():
    assert resolve_hidden_layers([-1, -2, -3], 4) == [2, 3, 4]
    assert resolve_hidden_layers("all", 4) == [1, 2, 3, 4]
    assert resolve_hidden_layers([0, 4], 4) == [0, 4]  # 0: the embeddings; 4 == -1: the final normed output
    with pytest.raises(ConfigError, match="out of range"):
        resolve_hidden_layers([-6], 4)
    with pytest.raises(ConfigError, match="twice"):
        resolve_hidden_layers([-1, 4], 4)
    with pytest.raises(ConfigError, match="twice"):
        resolve_hidden_layers([0, -5], 4)


def test_concat_right_padded():
    a = pad_batch([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], 0)
    b = pad_batch([{"input_ids": [4], "labels": [4]}, {"input_ids": [5, 6, 7, 8], "labels": [-100] * 4}], 0)
    joined = concat_right_padded(a, b, pad_id=0)
    assert joined["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8]]
    assert joined["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100], [-100] * 4]
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


# ---- configuration -------------------------------------------------------------------------------------


def test_arguments_defaults_and_checks(caplog):
    args = ILORAArguments()
    assert (args.use_ilora, args.ema_alpha, args.consistency_weight, args.save_ema_adapter) == (
        False,
        0.25,
        1.0,
        True,
    )
    assert (args.ema_adapter_path, args.selective_update, args.min_update_threshold) == (None, True, 0.1)
    assert (args.hidden_state_layers, args.ilora_buffer_size, args.ilora_eval_adapter) == (
        [-1, -2, -3],
        500,
        "ema",
    )
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a"}
    assert parse_config({**base, "use_ilora": True}).cl.cl_method == "ilora"
    assert parse_config({**base, "use_ilora": True}).method_args.use_ilora is True
    assert parse_config({**base, "cl_method": "ilora"}).method_args.use_ilora is True
    assert (
        parse_config(
            {**base, "cl_method": "ilora", "hidden_state_layers": "all"}
        ).method_args.hidden_state_layers
        == "all"
    )
    assert parse_config(
        {**base, "cl_method": "ilora", "hidden_state_layers": "-1,-4"}
    ).method_args.hidden_state_layers == [-1, -4]
    bad = {
        "ema_alpha": 1.5,
        "consistency_weight": -1,
        "min_update_threshold": -0.1,
        "ilora_buffer_size": -1,
        "ilora_eval_adapter": "plastic",
        "hidden_state_layers": "last",
        "ilora_replay_batch_size": 0,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "cl_method": "ilora", key: value})
        assert err.value.field == key
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "cl_method": "ilora", "ema_alpha": -0.01})
    assert err.value.field == "ema_alpha"
    # EasyCL's example configs set ema_adapter_path for the first task too: a note, not an error.
    with caplog.at_level(logging.WARNING, logger="retain"):
        ILORA(parse_config({**base, "cl_method": "ilora", "ema_adapter_path": "x"}))
    assert "'ema_adapter_path' is not used" in caplog.text
    with pytest.raises(ConfigError, match="belongs to method 'ilora'"):
        parse_config({**base, "cl_method": "seq", "ema_alpha": 0.5})


# ---- buffer --------------------------------------------------------------------------------------------


def test_buffer_inclusion_is_uniform():
    # 2000 streams of 40 rows into a buffer of 8: each row is kept with probability 8/40.
    counts = Counter()
    for trial in range(2000):
        buffer = Buffer(8, seed=trial)
        for i in range(40):
            buffer.add({"input_ids": [i], "labels": [i]})
        assert len(buffer) == 8 and buffer.num_seen == 40
        counts.update(row["input_ids"][0] for row in buffer.rows)
    expected = 2000 * 8 / 40  # 400; binomial sd ~ 17.9
    assert all(abs(counts[i] - expected) < 90 for i in range(40)), counts
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(40))
    assert chi2 < 73  # df = 39: p(chi2 > 73) < 0.001


def test_buffer_variable_length_round_trip():
    rows = random_rows(5, seed=3)
    batch = pad_batch(rows, pad_id=0)
    buffer = Buffer(10, seed=0, pad_id=0)
    assert buffer.get_data(4) is None
    buffer.add_batch(batch)  # padded in, unpadded stored
    assert buffer.rows == rows
    data = buffer.get_data(5)
    widths = data["attention_mask"].sum(dim=1).tolist()
    got = sorted(
        (
            {"input_ids": i[:w], "labels": lab[:w]}
            for i, lab, w in zip(data["input_ids"].tolist(), data["labels"].tolist(), widths, strict=True)
        ),
        key=lambda r: r["input_ids"],
    )
    assert got == sorted(rows, key=lambda r: r["input_ids"])
    assert data["input_ids"].size(1) == max(len(r["input_ids"]) for r in rows)
    assert (data["labels"][data["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert len(buffer.get_data(2)["input_ids"]) == 2


def test_buffer_save_load_round_trip(tmp_path):
    buffer = Buffer(4, seed=1, pad_id=0)
    for row in random_rows(9, seed=5):
        buffer.add(row)
    buffer.save(tmp_path / BUFFER_FILE)
    saved_rows = list(buffer.rows)
    loaded = Buffer(4, seed=99)
    loaded.load(tmp_path / BUFFER_FILE)
    assert loaded.rows == buffer.rows and loaded.num_seen == 9
    # The random stream continues identically (same draws, same reservoir decisions).
    assert loaded.get_data(3)["input_ids"].tolist() == buffer.get_data(3)["input_ids"].tolist()
    extra = random_rows(3, seed=6)
    for row in extra:
        buffer.add(row)
        loaded.add(row)
    assert loaded.rows == buffer.rows
    # A smaller configured capacity keeps a subsample of the saved rows.
    small = Buffer(2)
    small.load(tmp_path / BUFFER_FILE)
    assert small.capacity == 2 and len(small) == 2 and all(r in saved_rows for r in small.rows)
    assert small.rows[0] != small.rows[1]
