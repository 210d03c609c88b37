"""The `peft` method's word-level (BIO tagging) tasks: data, targets, spans and scores against hand-made cases."""

import json

import pytest

from retain.cl.pertask.encoding import EvalRows
from retain.cl.pertask.evaluation import word_score
from retain.cl.pertask.labels import LabelSpace
from retain.cl.pertask.tagging import encode_words, entity_f1, entity_spans
from retain.data.builtin import resolve_dataset_dir
from retain.data.registry import load_dataset_info, load_examples
from retain.data.tasks import load_tasks
from retain.errors import DataError
from retain.hparams.args import DataArguments
from retain.model.tiny import build_tiny_tokenizer
from tests.pertask_helpers import one_torch_thread  # noqa: F401  (autouse)


def test_entity_spans_and_f1_by_hand():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("LOC", 4, 5),
        ("ORG", 5, 6),  # I- after another type starts an entity (conlleval)
    }
    assert entity_spans(["O", "I-PER", "I-PER"]) == {("PER", 1, 3)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]
    # gold: PER(0,2) LOC(3,4) ORG(1,2); predicted: PER(0,1) LOC ORG -> tp 2, p 2/3, r 2/3
    result = entity_f1(gold, pred)
    assert (result.true_positives, result.predicted, result.gold) == (2, 3, 3)
    assert result.f1 == pytest.approx(2 / 3)
    assert entity_f1([["O"]], [["O"]]).f1 == 1.0
    assert entity_f1([["O"]], [["B-X"]]).f1 == 0.0
    assert entity_f1([["B-X"]], [["O"]]).recall == 0.0


def test_word_score_by_hand():
    """Entity F1 of predicted tag indices, through the global tag space, against counts made by hand."""
    space = LabelSpace("word-level")
    space.set_task(0, "per", ["B-PER", "I-PER", "O"])
    space.set_task(1, "loc", ["B-LOC", "I-LOC", "O"])
    tag = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}  # the global space after task 1
    gold, predicted, starts = [], [], []
    for gold_tags, predicted_tags in [
        # PER cut short (boundary error), LOC exact: 1 of 2 found
        ("B-PER I-PER O B-LOC I-LOC O", "B-PER O O B-LOC I-LOC O"),
        # LOC predicted as PER (wrong type), PER exact: 1 of 2
        ("B-LOC O B-PER", "B-PER O B-PER"),
        # LOC starting one word early (boundary error): 0 of 1
        ("O O B-LOC I-LOC", "O B-LOC I-LOC I-LOC"),
        # I-LOC after the sentence start opens an entity (conlleval): exact, 1 of 1
        ("B-LOC I-LOC", "I-LOC I-LOC"),
    ]:
        gold.append(gold_tags.split())
        predicted.append([tag[t] for t in predicted_tags.split()])
        starts.append(list(range(len(gold[-1]))))  # one token per word
    # Its second word was cut away by cutoff_len: predicted O, so the gold PER is missed (0 of 1).
    gold.append(["O", "B-PER"])
    predicted.append([tag["O"]])
    starts.append([0, -1])
    score = word_score(space, 1, 1, gold, EvalRows([[0]] * len(gold), starts), predicted)
    # gold entities 2 + 2 + 1 + 1 + 1 = 7, predicted 2 + 2 + 1 + 1 + 0 = 6, exact matches 3
    assert (score.correct, score.scored) == (3, 5)
    assert score.extra["entity_precision"] == pytest.approx(3 / 6)
    assert score.extra["entity_recall"] == pytest.approx(3 / 7)
    assert score.accuracy == pytest.approx(6 / 13)  # 2PR / (P + R) = 2 * 3 / (6 + 7)
    assert score.predictions[2] == "O B-LOC I-LOC I-LOC" and score.predictions[4] == "O O"


def test_words_map_to_their_first_token():
    tiny = build_tiny_tokenizer()
    ids, starts = encode_words(tiny, ["Al", "met", "Bo", "."], special_tokens=False, max_length=100)
    assert starts == [0, 3, 7, 10] and len(ids) == 11  # byte tokens, spaces are tokens of no word
    ids, starts = encode_words(tiny, ["Al", "met", "Bo", "."], special_tokens=False, max_length=5)
    assert starts == [0, 3, -1, -1]


def _write_tagging(root, rows, label_list=None):
    root.mkdir(parents=True, exist_ok=True)
    entry = {"file_name": "t.json", "formatting": "tagging"}
    if label_list is not None:
        entry["label_list"] = label_list
    (root / "t.json").write_text(json.dumps(rows))
    (root / "t_test.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(
        json.dumps({"t": entry, "t_test": {"file_name": "t_test.json", "formatting": "tagging"}})
    )
    return root


def test_tagging_format_rows_and_tag_sets(tmp_path):
    rows = [{"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}, {"tokens": ["Bo"], "tags": ["B-PER"]}]
    root = _write_tagging(tmp_path / "ok", rows)
    examples = load_examples(root, load_dataset_info(root), "t")
    assert examples[0].messages == [{"role": "user", "content": "Ann runs"}]
    assert examples[0].answer == "B-PER O" and examples[0].extra["tags"] == ["B-PER", "O"]
    (task,) = load_tasks(DataArguments(cl_tasks=["t"], dataset_dir=str(root)))
    assert task.tags == ["B-PER", "O"] and task.labels is None
    root = _write_tagging(tmp_path / "list", rows, label_list=["O", "B-PER", "I-PER"])
    (task,) = load_tasks(DataArguments(cl_tasks=["t"], dataset_dir=str(root)))
    assert task.tags == ["B-PER", "I-PER", "O"]
    root = _write_tagging(tmp_path / "short", rows, label_list=["O"])
    with pytest.raises(DataError, match="missing from 'label_list': B-PER"):
        load_tasks(DataArguments(cl_tasks=["t"], dataset_dir=str(root)))
    for bad, message in [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "2 tokens but 1 tags"),
        ({"tokens": ["a"], "tags": ["PER"]}, "not O, B-TYPE or I-TYPE"),
        ({"tokens": "a b", "tags": ["O", "O"]}, "non-empty list"),
    ]:
        root = _write_tagging(tmp_path / "bad", [bad])
        with pytest.raises(DataError, match=message):
            load_examples(root, load_dataset_info(root), "t")


def test_the_builtin_ner_family(tmp_path, monkeypatch):
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path))
    root = resolve_dataset_dir("builtin://ner")
    tasks = load_tasks(
        DataArguments(cl_tasks=["ner_person", "ner_location", "ner_organization"], dataset_dir=str(root))
    )
    assert [t.tags for t in tasks] == [
        ["B-PER", "I-PER", "O"],
        ["B-LOC", "I-LOC", "O"],
        ["B-ORG", "I-ORG", "O"],
    ]
    for task in tasks:
        train = {tuple(e.extra["tokens"]) for e in task.train}
        assert len(task.train) == 60 and len(task.test) == 20
        assert not train & {tuple(e.extra["tokens"]) for e in task.test}
