"""Scoring by label sets, exact match and ROUGE-L, the choice mode's log-likelihoods, micro averages."""

import json

import pytest
import torch

from retain.eval.choice import choice_log_likelihoods, pick
from retain.eval.metrics import micro_metrics
from retain.eval.scoring import rouge_l, score
from retain.model.tiny import build_tiny_model, build_tiny_tokenizer


def test_a_label_set_scores_labelled_rows_and_counts_the_rest():
    result = score(
        ["World", "sports", "cooking", "Business"],
        ["World", "Sports", "Business", "-"],
        ["business", "sports", "world"],
    )
    assert (result.correct, result.scored, result.unlabeled) == (2, 3, 1)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.extra == {"off_label": pytest.approx(1 / 3)}  # "cooking" is no label at all


def test_without_a_label_set_every_row_is_scored_by_exact_match_and_rouge_l():
    result = score(["the cat sat on", "A dog."], ["the cat sat", "a dog"], None)
    assert (result.correct, result.scored, result.unlabeled) == (1, 2, 0)
    # LCS("the cat sat on", "the cat sat") = 3 words: P = 3/4, R = 3/3, F = 2PR/(P+R) = 6/7; the second is exact.
    assert result.extra["rouge_l"] == pytest.approx((6 / 7 + 1) / 2)
    assert rouge_l(["ça va bien"], ["ça va"]) == pytest.approx(0.8)  # non-ASCII words are words


def test_micro_averages_pool_rows():
    correct = [[0, 0], [8, 1], [6, 9]]
    scored = [[10, 30], [10, 30], [10, 30]]
    got = micro_metrics(correct, scored)
    assert got["last_micro"] == pytest.approx(15 / 40)
    assert got["avg_micro"] == pytest.approx((8 / 10 + 15 / 40) / 2)
    assert micro_metrics(None, None) == {"last_micro": None, "avg_micro": None}
    assert micro_metrics([[0, 0], [1, 0], [None, 1]], scored) == {"last_micro": None, "avg_micro": None}


def test_pick_sum_or_mean():
    assert pick([-3.0, -4.0], [1, 4], "sum") == 0
    assert pick([-3.0, -4.0], [1, 4], "mean") == 1  # -1 per token beats -3


def reference_log_likelihood(model, prompt, choice):
    ids = torch.tensor([prompt + choice])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + j, token].item() for j, token in enumerate(choice))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_choice_log_likelihoods_match_one_sequence_at_a_time(arch, share_prefix):
    tokenizer = build_tiny_tokenizer(arch)
    model = build_tiny_model(arch, tokenizer)
    head = tokenizer("Shared instruction text for every row: ", add_special_tokens=False)["input_ids"]
    prompts = [
        head + tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("a", "longer row", "mid row")
    ]
    choices = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("yes", "no", "maybe so")]
    got = choice_log_likelihoods(
        model, prompts, choices, tokenizer.pad_token_id, batch_size=2, share_prefix=share_prefix
    )
    with torch.no_grad():
        want = [[reference_log_likelihood(model, p, c) for c in choices] for p in prompts]
    assert torch.tensor(got) == pytest.approx(torch.tensor(want), abs=1e-4)


def test_eval_mode_choice_and_both_in_a_run(tiny_config, data_dir, tmp_path):
    import retain

    info = json.loads((data_dir / "dataset_info.json").read_text())
    for name in ("task0", "task1"):
        info[name]["label_list"] = ["yes", "no"] if name == "task0" else ["red", "blue"]
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    values = tiny_config(cl_tasks="task0,task1,task2", max_samples=8, eval_base_cache=False)
    both = retain.run({**values, "eval_mode": "both", "output_dir": str(tmp_path / "both")})
    choice = retain.run({**values, "eval_mode": "choice", "output_dir": str(tmp_path / "choice")})
    assert both["eval_mode"] == "both" and choice["eval_mode"] == "choice"
    # task0 and task1 have labels: choice's accuracy in "both" is choice's matrix; task2 (no labels) is generated.
    for row in range(4):
        for column in (0, 1):
            assert both["extra_matrices"]["choice_accuracy"][row][column] == choice["matrix"][row][column]
        assert both["extra_matrices"]["choice_accuracy"][row][2] is None
        assert both["extra_matrices"]["rouge_l"][row][2] is not None
    predictions = (tmp_path / "choice" / "predictions" / "after_3" / "task0.jsonl").read_text().splitlines()
    assert {json.loads(line)["prediction"] for line in predictions} <= {"yes", "no"}
    report = (tmp_path / "choice" / "report.md").read_text()
    assert "Scored by choice" in report and "Last (micro)" in report
    assert 0 <= both["extra_matrices"]["mode_agreement"][3][0] <= 1
