"""Scoring by label sets, exact match and ROUGE-L, the choice mode's log-likelihoods, micro averages."""

import json

import pytest
import torch

from retain.errors import ConfigError
from retain.eval.choice import (
    choice_layout,
    choice_log_likelihoods,
    packed_attention_mask,
    padding_bounded_batches,
    pick,
)
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


def test_choice_layout_packs_all_but_each_last_token():
    layout = choice_layout([[5], [7, 8, 9], [3, 4]])
    assert (layout.tokens, layout.segment, layout.depth) == ([7, 8, 3], [1, 1, 2], [0, 1, 0])
    # Every first token is scored at the prompt's last position (row 0); token j after packed token j - 1.
    assert layout.rows == [0, 0, 1, 2, 0, 3]
    assert layout.owner == [0, 1, 1, 1, 2, 2]
    assert layout.target == [5, 7, 8, 9, 3, 4]
    with pytest.raises(ValueError, match="at least one token"):
        choice_layout([[1], []])


def test_packed_attention_mask_by_hand():
    # Keys: 1 prefix token, 2 prompt tokens (row 0 left-padded), 1 packed token (choice 1's first).
    allowed = packed_attention_mask(torch.tensor([[0, 1], [1, 1]]), 1, choice_layout([[5], [7, 8]]))
    T, F = True, False
    assert allowed.shape == (2, 1, 3, 4)
    assert allowed[0, 0].tolist() == [[T, T, F, F], [T, F, T, F], [T, F, T, T]]  # the pad sees itself only
    assert allowed[1, 0].tolist() == [[T, T, F, F], [T, T, T, F], [T, T, T, T]]
    other = packed_attention_mask(torch.tensor([[1]]), 0, choice_layout([[1, 2], [3, 4, 5]]))
    # Packed tokens 1, 3, 4 (choices 0, 1, 1): each sees the prompt and its own choice's earlier tokens.
    assert other[0, 0].tolist() == [
        [T, F, F, F],
        [T, T, F, F],
        [T, F, T, F],
        [T, F, T, T],
    ]


def test_padding_bounded_batches_bound_rows_and_padding():
    # Batch size 3, longest first; a row joins while rows x longest <= 1.1 x the batch's real tokens.
    # 100 alone (2 x 100 > 1.1 x 112); 12, 11, 10: 3 x 12 = 36 <= 1.1 x 33 = 36.3; 9: the batch is full.
    assert padding_bounded_batches([10, 100, 12, 11, 9], 3) == [[1], [2, 3, 0], [4]]
    assert padding_bounded_batches([10, 8], 4) == [[0], [1]]  # 2 x 10 = 20 > 1.1 x 18 = 19.8
    assert padding_bounded_batches([4, 4, 4, 4], 3) == [[0, 1, 2], [3]]
    assert padding_bounded_batches([], 3) == []


def test_choice_with_flash_attention_is_a_config_error(tiny_config):
    from retain.cl.registry import parse_config

    with pytest.raises(ConfigError, match="flash_attn fa2 cannot take") as err:
        parse_config(tiny_config(eval_mode="both", flash_attn="fa2"))
    assert err.value.field == "eval_mode"


def reference_log_likelihood(model, prompt, choice):
    ids = torch.tensor([prompt + choice])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
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
    choices = [
        tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("yes", "no", "maybe so", "not at all")
    ]
    assert len({len(c) for c in choices}) > 1  # labels of several lengths share the packed pass
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


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])  # sliding and full layers; every layer sliding
def test_choice_keeps_the_sliding_window(arch):
    tokenizer = build_tiny_tokenizer(arch)
    model = build_tiny_model(arch, tokenizer)
    model.config.sliding_window = 6  # shorter than the prompts, so the window changes the scores
    head = tokenizer("Shared instruction text: ", add_special_tokens=False)["input_ids"]
    prompts = [head + tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("a b", "longer row here")]
    choices = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("yes", "maybe so")]
    got = choice_log_likelihoods(model, prompts, choices, tokenizer.pad_token_id, batch_size=2)
    with torch.no_grad():
        want = [[reference_log_likelihood(model, p, c) for c in choices] for p in prompts]
        model.config.sliding_window = 10_000
        unwindowed = [[reference_log_likelihood(model, p, c) for c in choices] for p in prompts]
    assert torch.tensor(got) == pytest.approx(torch.tensor(want), abs=1e-4)
    assert torch.tensor(got) != pytest.approx(torch.tensor(unwindowed), abs=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_evaluation_passes_the_kv_cache_by_its_current_name(arch):
    """transformers 5.24 renamed a forward's `past_key_values` to `cache` (the old name goes in 5.40):
    choice and generation with a shared prefix use the new name, so no deprecation warning is raised."""
    import warnings

    from retain.eval.predict import generate_answers

    tokenizer = build_tiny_tokenizer(arch)
    model = build_tiny_model(arch, tokenizer)
    prompts = [tokenizer("Shared instruction text for every row: " + x)["input_ids"] for x in ("a", "bb b")]
    choices = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("yes", "no")]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        choice_log_likelihoods(model, prompts, choices, tokenizer.pad_token_id, batch_size=2)
        generate_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=3)
