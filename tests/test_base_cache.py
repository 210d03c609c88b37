"""The cross-run cache of the base model's row (row 0) of the accuracy matrix."""

import json

import pytest

import retain.eval.predict as predict
from retain.api import run
from retain.cl.base import CLMethod
from retain.cl.registry import load_method as get_method
from retain.cl.registry import parse_config
from retain.training.sequence import Session
from tests.pertask_helpers import peft_values


@pytest.fixture
def generations(monkeypatch, tmp_path):
    """Record the `desc` of every generation pass; base-row passes end in '(base)'. Isolated cache."""
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    original = predict.generate_answers

    def spy(*args, desc="eval", **kwargs):
        calls.append(desc)
        return original(*args, desc=desc, **kwargs)

    monkeypatch.setattr(predict, "generate_answers", spy)
    return calls


def base_passes(calls):
    return [c for c in calls if c.endswith("(base)")]


def row_0(values):
    """Evaluate only row 0 of a fresh session (in its own output_dir); return it and the session."""
    row_0.runs += 1
    session = Session(parse_config({**values, "output_dir": f"{values['output_dir']}_{row_0.runs}"}))
    session.load()
    session.evaluate_row(0)
    return session.state.matrix[0], session


row_0.runs = 0


def test_second_run_reuses_row_0_without_generating(tiny_config, tmp_path, generations):
    values = tiny_config(cl_tasks="task0,task1", max_samples=8, max_new_tokens=3)
    first = run(values)
    assert len(base_passes(generations)) == 2
    assert len(list((tmp_path / "cache" / "eval").glob("*.json"))) == 2
    generations.clear()
    # Another method and another output_dir: the base model, the test rows and the generation match.
    second = run({**values, "cl_method": "replay", "output_dir": str(tmp_path / "run2")})
    assert base_passes(generations) == []
    assert len(generations) == 4  # rows 1 and 2 are still generated
    assert second["matrix"][0] == first["matrix"][0]
    assert second["eval_counts"] == first["eval_counts"]


def test_changed_data_or_settings_invalidate_the_entry(tiny_config, data_dir, generations):
    values = tiny_config(cl_tasks="task0", max_new_tokens=3)
    row, _ = row_0(values)
    assert len(base_passes(generations)) == 1
    again, _ = row_0(values)
    assert again == row and len(base_passes(generations)) == 1
    # A changed test split is another entry.
    path = data_dir / "task0_test.json"
    rows = json.loads(path.read_text())
    rows[0]["input"] += " (changed)"
    path.write_text(json.dumps(rows))
    row_0(values)
    assert len(base_passes(generations)) == 2
    # So is another generation setting.
    row_0({**values, "max_new_tokens": 4})
    assert len(base_passes(generations)) == 3


def test_eval_base_cache_false_generates_and_writes_nothing(tiny_config, tmp_path, generations):
    values = tiny_config(cl_tasks="task0", max_new_tokens=3, eval_base_cache=False)
    row_0(values)
    row_0(values)
    assert len(base_passes(generations)) == 2
    assert not (tmp_path / "cache" / "eval").exists()


def test_cached_row_equals_a_fresh_generation(tiny_config, generations):
    values = tiny_config(cl_tasks="task0,task1", max_new_tokens=3)
    row_0(values)
    cached, session = row_0(values)
    assert len(base_passes(generations)) == 2  # the first session only
    fresh, _ = row_0({**values, "eval_base_cache": False})
    assert cached == fresh
    assert session.base_model_id is not None


def test_methods_say_whether_their_base_row_is_cacheable(tiny_config, tmp_path, data_dir):
    assert get_method("seq")(parse_config(tiny_config())).base_evaluation_key() == "generative"
    assert get_method("ilora")(parse_config(tiny_config(cl_method="ilora"))).base_evaluation_key() == (
        "generative"
    )
    generative = parse_config(peft_values(tmp_path, data_dir, PEFT_type="LoRA"))
    assert get_method("peft")(generative).base_evaluation_key() == "generative"
    heads = parse_config(peft_values(tmp_path, data_dir, PEFT_type="LoRA", classifier="Linear"))
    assert get_method("peft")(heads).base_evaluation_key() is None

    class OwnScoring(get_method("seq")):  # not registered: a method with its own evaluate
        def evaluate(self, model, trained, evaluated, data, ctx):
            return CLMethod.evaluate(self, model, trained, evaluated, data, ctx)

    assert OwnScoring(parse_config(tiny_config())).base_evaluation_key() is None


def test_uncacheable_method_always_generates(tiny_config, tmp_path, generations, monkeypatch):
    monkeypatch.setattr(CLMethod, "base_evaluation_key", lambda self: None)
    values = tiny_config(cl_tasks="task0", max_new_tokens=3)
    row_0(values)
    row_0(values)
    assert len(base_passes(generations)) == 2
    assert not (tmp_path / "cache" / "eval").exists()


def test_model_fingerprint_follows_the_weights(tmp_path):
    from retain.eval.base_cache import base_model_id
    from retain.hparams.args import ModelArguments
    from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    built = ModelArguments(model_name_or_path="tiny-random-llama")
    assert base_model_id(built, model) == base_model_id(built, build_tiny_llama(tokenizer))
    other = build_tiny_llama(tokenizer, seed=1)
    assert base_model_id(built, other) != base_model_id(built, model)
    # A model directory: by its files (a rewritten weights file is another model).
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = ModelArguments(model_name_or_path=str(folder))
    first = base_model_id(local, model)
    assert base_model_id(local, model) == first
    other.save_pretrained(folder)
    assert base_model_id(local, model) != first
