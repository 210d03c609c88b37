"""The `peft` method's parts against hand-made cases: config, heads, features, label spaces, router
(word-level tasks: test_pertask_words.py)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from retain.cl.loss import LossScale
from retain.cl.pertask.adapters import adapter_name
from retain.cl.pertask.config import PEFTArguments
from retain.cl.pertask.evaluation import evaluation_mode
from retain.cl.pertask.heads import CosineLinear, last_real_index, pool
from retain.cl.pertask.labels import LabelSpace, map_word_targets
from retain.cl.pertask.router import TaskRouter, preference_sum, route
from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX
from retain.errors import ConfigError, DataError, TrainingError
from retain.eval.predict import EvalContext
from retain.training.sequence import Session
from tests.pertask_helpers import one_torch_thread, peft_values  # noqa: F401

# ---- config ------------------------------------------------------------------------------------


def test_arguments_have_the_seed_names_and_defaults():
    args = PEFTArguments()
    assert (args.PEFT_type, args.Sub_PEFT_type) == ("PromptTuning", "NewLoRA")
    assert (args.PEFT_lora_r, args.PEFT_lora_alpha, args.PEFT_lora_bias, args.PEFT_lora_dropout) == (
        4,
        8,
        "none",
        0.1,
    )
    assert (args.PEFT_num_virtual_tokens, args.PEFT_prompt_tuning_init_text) == (10, "auto")
    assert (args.classifier, args.classification_type) == (None, "sentence-level")
    assert args.newlora_routing == "all" and args.skip_nonfinite_loss is False  # no heads: nothing to weigh
    assert PEFTArguments(classifier="None").classifier is None  # the seed's spelling
    assert PEFTArguments(classifier="Linear", Sub_PEFT_type="None").uses_router is False


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"PEFT_type": "Prefix"}, "PEFT_type"),
        ({"PEFT_lora_r": 0}, "PEFT_lora_r"),
        ({"PEFT_lora_alpha": 0}, "PEFT_lora_alpha"),
        ({"PEFT_lora_bias": "all"}, "PEFT_lora_bias"),
        ({"PEFT_lora_dropout": 1.0}, "PEFT_lora_dropout"),
        ({"PEFT_num_virtual_tokens": 0}, "PEFT_num_virtual_tokens"),
        ({"PEFT_prompt_tuning_init_text": " "}, "PEFT_prompt_tuning_init_text"),
        ({"classifier": "MLP"}, "classifier"),
        ({"classification_type": "word-level"}, "classification_type"),
        ({"il_mode": "DIL"}, "il_mode"),
        ({"classifier": "Linear", "newlora_routing": "weighted"}, "newlora_routing"),
        ({"classifier": "Linear", "il_mode": "TIL", "newlora_routing": "soft"}, "newlora_routing"),
        (
            {"classifier": "Linear", "classification_type": "word-level", "newlora_routing": "soft"},
            "newlora_routing",
        ),
        ({"newlora_routing": "hard"}, "newlora_routing"),
        ({"classifier": "Linear", "il_mode": "TIL", "newlora_routing": "hard"}, "newlora_routing"),
        ({"pooling": "max"}, "pooling"),
        ({"cosine_scale": 0.0}, "cosine_scale"),
    ],
)
def test_bad_arguments_name_their_field(values, field):
    with pytest.raises(ConfigError) as info:
        PEFTArguments(**values)
    assert info.value.field == field


def test_engine_lora_keys_are_noted_not_used(tmp_path, data_dir):
    # A re-run from a run's config.yaml (every key resolved) and EasyCL-shaped configs carry lora_rank:
    # the task adapters keep PEFT_lora_r, and the run says so.
    session = Session(
        parse_config(peft_values(tmp_path, data_dir, lora_rank=8, PEFT_lora_r=2, PEFT_type="LoRA"))
    )
    assert any(
        "'lora_rank' is not used by cl_method peft" in n and "PEFT_lora_r (2)" in n
        for n in session.config.notes
    )
    session.load()
    assert {c.r for c in session.method.adapters.peft.peft_config.values()} == {2}
    same = Session(parse_config(peft_values(tmp_path / "b", data_dir, lora_rank=2, PEFT_lora_r=2)))
    assert not any("lora_rank" in n for n in same.config.notes)


# ---- heads and features ----------------------------------------------------------------------------


def test_cosine_linear_normalises_over_the_feature_dimension():
    torch.manual_seed(0)
    head = CosineLinear(8, 3, scale=2.0)
    x2 = torch.randn(5, 8)
    out2 = head(x2)
    expected = (
        2.0 * (x2 / x2.norm(dim=-1, keepdim=True)) @ (head.weight / head.weight.norm(dim=-1, keepdim=True)).T
    )
    torch.testing.assert_close(out2, expected)
    assert out2.abs().max() <= 2.0 + 1e-6
    # A feature along a class weight gets exactly the scale for that class.
    aligned = head(head.weight[1:2].detach() * 7.0)
    torch.testing.assert_close(aligned[0, 1], torch.tensor(2.0))
    # 3-D: each token is normalised on its own. Scaling one token changes nothing, and every
    # token's logits equal the 2-D logits of the same vector (normalising across tokens would not).
    x3 = torch.randn(2, 4, 8)
    out3 = head(x3)
    torch.testing.assert_close(out3, head(x3.reshape(-1, 8)).reshape(2, 4, 3))
    scaled = x3.clone()
    scaled[0, 2] *= 100.0
    scaled[1, 0] *= 0.01
    torch.testing.assert_close(head(scaled), out3)


def test_pool_picks_the_intended_position_past_the_virtual_tokens():
    virtual, length = 3, 5
    # hidden[b, p] = 100 * b + p: the value says which position was taken.
    hidden = (torch.arange(virtual + length).float() + 100 * torch.arange(2).float()[:, None])[
        ..., None
    ].repeat(1, 1, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert pool(hidden, mask, "last", virtual)[:, 0].tolist() == [virtual + 2, 100 + virtual + 4]
    assert pool(hidden, mask, "cls", virtual)[:, 0].tolist() == [virtual, 100 + virtual]
    assert pool(hidden, mask, "mean", virtual)[:, 0].tolist() == [virtual + 1, 100 + virtual + 2]
    # Without virtual tokens, and with left padding.
    left = torch.tensor([[0, 0, 1, 1, 1]])
    assert last_real_index(left).tolist() == [4]
    assert pool(hidden[:1, virtual:], left, "cls", 0)[:, 0].tolist() == [virtual + 2]
    with pytest.raises(ValueError):
        pool(hidden, mask, "last", virtual - 1)


def test_prompt_tuning_features_come_from_the_last_real_token_after_the_soft_prompt(tmp_path, data_dir):
    session = Session(
        parse_config(peft_values(tmp_path, data_dir, classifier="Linear", PEFT_num_virtual_tokens=4))
    )
    session.load()
    method, model = session.method, session.model
    method.begin_task(model, session.tasks[0], session.data[0])
    peft = method.peft
    ids = torch.tensor([[40, 41, 42, 43], [50, 51, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    hidden, virtual = model.hidden(ids, mask, 0)
    assert virtual == 4 and hidden.shape[1] == 8
    # The soft prompt goes in front: recompute by hand with the prompt embeddings prepended.
    prompt = peft.prompt_encoder[adapter_name(0)].embedding.weight
    embeds = torch.cat([prompt.expand(2, -1, -1), peft.word_embeddings(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], dim=1)
    manual = peft.base_model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    features = pool(hidden, mask, model.pooling, virtual)
    assert model.pooling == "last"
    torch.testing.assert_close(features, torch.stack([manual[0, 4 + 3], manual[1, 4 + 1]]))


def test_auto_prompt_init_is_the_instruction_embedding(tmp_path, data_dir):
    session = Session(parse_config(peft_values(tmp_path, data_dir, PEFT_num_virtual_tokens=30)))
    session.load()
    method = session.method
    method.begin_task(session.model, session.tasks[1], session.data[1])
    text = "Task 1: answer red or blue."
    assert method._init_text(1) == text
    ids = session.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * 2)[:30]
    expected = method.peft.word_embeddings(torch.tensor(ids))
    torch.testing.assert_close(method.peft.prompt_encoder["task-1"].embedding.weight, expected)


# ---- label spaces ------------------------------------------------------------------------------------


def test_sentence_label_space_accumulates_like_the_seed():
    space = LabelSpace("sentence-level")
    space.set_task(0, "a", ["no", "yes"])
    space.set_task(1, "b", ["blue", "green", "red"])
    space.set_task(2, "c", ["no", "yes"])  # the same text in another task is another class
    assert space.accum(2) == [2, 5, 7]  # ACCUM_NUM_CLASS
    assert space.pre_accum(2) == [0, 2, 5]  # PRE_ACCUM_NUM_CLASS
    assert space.til_to_global(1) == [2, 3, 4]
    assert space.own_to_global(2) == [5, 6]
    assert space.global_labels(2)[5] == (2, "no")
    # The seed's CIL -> TIL step: label_idx_cil - PRE_ACCUM_NUM_CLASS[t].
    assert [g - space.pre_accum(1)[1] for g in space.til_to_global(1)] == [0, 1, 2]
    with pytest.raises(DataError):
        space.set_task(1, "b", ["blue"])  # contradicts what is known
    restored = LabelSpace("sentence-level")
    restored.merge_json(json.loads(json.dumps(space.to_json())))
    assert restored.accum(2) == space.accum(2)


def test_word_label_space_puts_O_first_and_gives_later_tasks_only_new_tags():
    space = LabelSpace("word-level")
    space.set_task(0, "per", ["B-PER", "I-PER", "O"])
    space.set_task(1, "loc", ["B-LOC", "B-PER", "I-LOC", "O"])  # B-PER already belongs to task 0
    space.set_task(2, "org", ["B-ORG", "O"])
    assert space.head_labels(0) == ["O", "B-PER", "I-PER"]
    assert space.head_labels(1) == ["B-LOC", "I-LOC"]
    assert space.til_labels(1) == ["O", "B-LOC", "I-LOC"]
    assert space.accum(2) == [3, 5, 6] and space.pre_accum(2) == [0, 3, 5]
    assert [label for _, label in space.global_labels(2)] == [
        "O",
        "B-PER",
        "I-PER",
        "B-LOC",
        "I-LOC",
        "B-ORG",
    ]
    assert space.til_to_global(1) == [0, 3, 4]
    assert space.own_to_global(1) == [3, 1, 4, 0]
    space.set_task(3, "dup", ["B-ORG", "O"])
    with pytest.raises(DataError, match="adds no new tag"):
        space.head_labels(3)


def test_word_targets_follow_the_seed_mapping():
    accum, pre = [3, 5, 6], [0, 3, 5]
    # Global tags: O, B-PER, I-PER (task 0), B-LOC, I-LOC (task 1), B-ORG (task 2); -100 ignored.
    labels = torch.tensor([[0, 1, 2, 3, 4, 5, IGNORE_INDEX]])
    # Task 0: later tasks' tags become O.
    assert map_word_targets(labels, 0, accum, pre).tolist() == [[0, 1, 2, 0, 0, 0, IGNORE_INDEX]]
    # Task 1: earlier and later tags become O, its own move to 1.. (after the O from task 0).
    assert map_word_targets(labels, 1, accum, pre).tolist() == [[0, 0, 0, 1, 2, 0, IGNORE_INDEX]]
    # Task 2.
    assert map_word_targets(labels, 2, accum, pre).tolist() == [[0, 0, 0, 0, 0, 1, IGNORE_INDEX]]
    assert labels.tolist() == [[0, 1, 2, 3, 4, 5, IGNORE_INDEX]]  # not modified in place


# ---- router --------------------------------------------------------------------------------------------


def test_router_shape_and_preference_loss_by_hand():
    router = TaskRouter(hidden_size=8, num_task=3)
    layers = list(router.mlp)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear", "Sigmoid"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (8, 4, 3)
    out = router(torch.randn(5, 8))
    assert out.shape == (5, 3) and bool(((out > 0) & (out < 1)).all())
    weights = torch.tensor([[0.2, 0.9], [0.6, 0.1]])
    by_hand = ((0.2**2 + 0.1**2) / 2) + ((0.6**2 + 0.9**2) / 2)
    assert preference_sum(weights, 1).item() == pytest.approx(by_hand)
    # Divided by the rows it is the seed's F.mse_loss(weights, one_hot).
    one_hot = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert (preference_sum(weights, 1) / 2).item() == pytest.approx(F.mse_loss(weights, one_hot).item())
    assert route(torch.tensor([[0.1, 0.7, 0.9], [0.8, 0.2, 0.1]]), seen=2).tolist() == [1, 0]


def test_router_grows_when_a_run_continues_with_more_tasks():
    small, big = TaskRouter(8, 2), TaskRouter(8, 3)
    fresh_row = big.mlp[2].weight[2].detach().clone()
    big.load_grown(small.state_dict())
    torch.testing.assert_close(big.mlp[2].weight[:2], small.mlp[2].weight)
    torch.testing.assert_close(big.mlp[2].weight[2], fresh_row)
    with pytest.raises(ValueError):
        TaskRouter(6, 3).load_grown(small.state_dict())


def _word_session(tmp_path, monkeypatch, **overrides):
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))
    values = peft_values(
        tmp_path,
        tmp_path,
        dataset_dir="builtin://ner",
        cl_tasks="ner_person,ner_location",
        classifier="Linear",
        classification_type="word-level",
        PEFT_type="LoRA",
        **overrides,
    )
    session = Session(parse_config(values))
    session.load()
    return session


def test_word_level_O_logit_comes_from_task_0_without_gradients(tmp_path, monkeypatch):
    session = _word_session(tmp_path, monkeypatch)
    method, model = session.method, session.model
    method.begin_task(model, session.tasks[0], session.data[0])
    with torch.no_grad():  # give task 0 a non-trivial adapter, so a wrong adapter would show
        for param in method.adapters.parameters_of("task-0"):
            param.add_(0.05 * torch.randn_like(param))
    method.begin_task(model, session.tasks[1], session.data[1])
    batch = method.collator(session.tokenizer)(session.data[1].train_rows[:3])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model.til_logits(1, ids, mask)
    assert logits.shape[-1] == 1 + len(method.space.head_labels(1)) == 3
    method.peft.set_adapter("task-0")
    model.eval()  # the O logit is computed without dropout
    expected = model.heads["task-0"](method.peft(input_ids=ids, attention_mask=mask).last_hidden_state)[
        ..., 0
    ]
    model.train()
    method.peft.set_adapter("task-1")
    method.adapters.set_trainable(1)
    torch.testing.assert_close(logits[..., 0], expected)
    # Training task 1: gradients reach task 1's adapter and head only.
    loss = method.compute_loss(model, batch, LossScale(None))
    loss.backward()
    assert all(p.grad is None for p in method.adapters.parameters_of("task-0"))
    assert all(p.grad is None for p in model.heads["task-0"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.adapters.parameters_of("task-1"))
    assert model.heads["task-1"].weight.grad.abs().sum() > 0
    assert model.router.mlp[0].weight.grad.abs().sum() > 0


def test_router_features_do_not_depend_on_the_active_adapter(tmp_path, monkeypatch):
    session = _word_session(tmp_path, monkeypatch)
    method, model = session.method, session.model
    for task, data in zip(session.tasks, session.data, strict=True):
        method.begin_task(model, task, data)
        with torch.no_grad():
            for param in method.adapters.parameters_of(adapter_name(task.index)):
                param.add_(0.1 * torch.randn_like(param))
    batch = method.collator(session.tokenizer)(session.data[0].train_rows[:2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    method.peft.set_adapter("task-0")
    with_0 = model.router_features(ids, mask)
    method.peft.set_adapter("task-1")
    with_1 = model.router_features(ids, mask)
    torch.testing.assert_close(with_0, with_1)
    adapted = pool(model.hidden(ids, mask, 1)[0], mask, model.pooling)
    assert not torch.allclose(adapted, with_1)


def test_switching_adapters_inside_the_forward_flips_no_grad_flag(tmp_path, data_dir):
    """A data-parallel wrapper registers what requires grad once: the forward must not change it."""
    session = Session(parse_config(peft_values(tmp_path, data_dir, classifier="Linear", PEFT_type="LoRA")))
    session.load()
    method, model = session.method, session.model
    for task, data in zip(session.tasks[:2], session.data[:2], strict=True):
        method.begin_task(model, task, data)
        with torch.no_grad():  # LoRA B starts at zero: make each adapter change the features
            for param in method.adapters.parameters_of(adapter_name(task.index)):
                param.add_(0.1 * torch.randn_like(param))
    model.eval()  # no dropout: the passes below must be comparable
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert any(flags.values())
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda *_: seen.append({name: p.requires_grad for name, p in model.named_parameters()})
    )
    batch = method.collator(session.tokenizer)(session.data[0].train_rows[:2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bare, first, second = (model.hidden(ids, mask, index)[0] for index in (None, 0, 1))
    out = model(input_ids=ids, attention_mask=mask, task_index=1, route=True)
    assert len(seen) == 5 and all(flags_then == flags for flags_then in seen)
    assert method.peft.active_adapter == "task-1"
    # The same features as peft's own switches (which do flip flags, outside a forward here).
    method.peft.set_adapter("task-0")
    torch.testing.assert_close(first, method.peft(input_ids=ids, attention_mask=mask).last_hidden_state)
    with method.peft.disable_adapter():
        torch.testing.assert_close(bare, method.peft(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert not torch.allclose(first, second) and not torch.allclose(first, bare)
    torch.testing.assert_close(out.logits, model.heads["task-1"](pool(second, mask, "last")))
    torch.testing.assert_close(out.router_weights, model.router(pool(bare, mask, "last")))


def test_evaluation_modes():
    # (il_mode, routing, trained, evaluated) -> (mode, last task that may answer)
    assert evaluation_mode("CIL", "all", None, 0) == ("fresh", 0)  # the base row
    assert evaluation_mode("TIL", "all", 0, 1) == ("fresh", 1)  # task 1 is not trained yet
    assert evaluation_mode("TIL", "hard", 2, 1) == ("til", 2)
    assert evaluation_mode("CIL", "all", 2, 1) == ("all", 2)
    assert evaluation_mode("CIL", "hard", 2, 0) == ("hard", 2)
    assert evaluation_mode("CIL", "soft", 2, 0) == ("soft", 2)


def test_soft_scores_by_hand():
    from retain.cl.pertask.router import soft_scores

    heads = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])]
    weights = torch.tensor([[0.5, 0.25], [0.1, 0.9]])
    got = soft_scores(heads, weights)
    z0 = math.log(math.exp(2.0) + 1.0)  # row 0, head 0: log-softmax of [2, 0]
    z1 = math.log(math.exp(3.0) + 2.0)  # row 0, head 1: log-softmax of [0, 3, 0]
    expected_row0 = [
        2 - z0 + math.log(0.5),
        -z0 + math.log(0.5),
        -z1 + math.log(0.25),
        3 - z1 + math.log(0.25),
        -z1 + math.log(0.25),
    ]
    assert got[0].tolist() == pytest.approx(expected_row0)
    # One-hot weights: the routed task's head alone decides (hard routing's answer).
    one_hot = soft_scores(heads, torch.tensor([[0.0, 1.0], [1.0, 0.0]])).argmax(-1).tolist()
    assert one_hot == [2 + 1, 1]  # row 0: head 1's class 1 (global 3); row 1: head 0's class 1
    # Equal weights: `all` over each head's log-softmax.
    equal = soft_scores(heads, torch.full((2, 2), 0.3)).argmax(-1)
    normalised = torch.cat([torch.log_softmax(h, -1) for h in heads], -1).argmax(-1)
    assert torch.equal(equal, normalised)
    # Each row uses its own weights: with the batch's mean weights ([0.455, 0.545]) row 0 would pick head 1.
    rows = soft_scores(heads, torch.tensor([[0.9, 0.1], [0.01, 0.99]])).argmax(-1).tolist()
    assert rows == [0, 2]


class _Spy:
    def __init__(self, model):
        self.calls = []
        self.original = model.til_logits

    def __call__(self, index, ids, mask):
        self.calls.append((index, ids.size(0)))
        return self.original(index, ids, mask)


@pytest.mark.parametrize("favoured", [0, 1])
def test_hard_routing_runs_only_the_argmax_tasks_adapter(tmp_path, data_dir, favoured):
    values = peft_values(tmp_path, data_dir, classifier="Linear", PEFT_type="LoRA", newlora_routing="hard")
    session = Session(parse_config(values))
    session.load()
    method, model = session.method, session.model
    for task, data in zip(session.tasks, session.data, strict=True):
        method.begin_task(model, task, data)
    method.end_task(model, session.tasks[1], session.data[1])
    last = model.router.mlp[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0, -5.0] if favoured == 0 else [-5.0, 5.0]))
    spy = _Spy(model)
    model.til_logits = spy
    ctx = EvalContext(session.tokenizer, session.builder, batch_size=8, max_new_tokens=None)
    score = method.evaluate(model, session.tasks[1], session.tasks[0], session.data[0], ctx)
    assert spy.calls == [(favoured, 4)]  # one adapter pass, with the routed task, for the whole batch
    assert score.extra["router_accuracy"] == (1.0 if favoured == 0 else 0.0)
    owners = {p.split(":")[0] if ":" in p else "task0" for p in score.predictions}
    assert owners == {f"task{favoured}"}


@pytest.mark.parametrize(
    ("values", "routing"),
    [
        ({"classifier": "Linear"}, "soft"),  # NewLoRA is the seed's default sub-type
        ({"classifier": "Linear", "il_mode": "TIL"}, "all"),
        ({"classifier": "Linear", "Sub_PEFT_type": "None"}, "all"),
        ({"classifier": "Linear", "classification_type": "word-level"}, "all"),
        ({"classifier": "Linear", "newlora_routing": "all"}, "all"),
    ],
)
def test_auto_routing_is_soft_where_it_applies(values, routing):
    assert PEFTArguments(**values).newlora_routing == routing


def test_soft_routing_weighs_each_rows_heads_by_the_router(tmp_path, data_dir):
    values = peft_values(tmp_path, data_dir, classifier="Linear", PEFT_type="LoRA", newlora_routing="soft")
    session = Session(parse_config(values))
    session.load()
    method, model = session.method, session.model
    for task, data in zip(session.tasks, session.data, strict=True):
        method.begin_task(model, task, data)
    method.end_task(model, session.tasks[1], session.data[1])
    ctx = EvalContext(session.tokenizer, session.builder, batch_size=8, max_new_tokens=None)
    last = model.router.mlp[2]
    owners = {}
    for favoured in (0, 1):  # a router sure of one task: soft answers with that task's head only
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([30.0, -30.0] if favoured == 0 else [-30.0, 30.0]))
        score = method.evaluate(model, session.tasks[1], session.tasks[0], session.data[0], ctx)
        owners[favoured] = {p.split(":")[0] if ":" in p else "task0" for p in score.predictions}
    assert owners == {0: {"task0"}, 1: {"task1"}}
    # One router feature pass per batch gives both the weights and the reported routed task.
    passes = []
    features = model.router_features
    model.router_features = lambda ids, mask: passes.append(ids.size(0)) or features(ids, mask)
    method.evaluate(model, session.tasks[1], session.tasks[0], session.data[0], ctx)
    assert sum(passes) == len(session.data[0].test) and max(passes) <= 8
    with pytest.raises(ConfigError, match="soft routing weighs sentence-level heads"):
        PEFTArguments(
            classifier="Linear",
            Sub_PEFT_type="NewLoRA",
            newlora_routing="soft",
            classification_type="word-level",
        )


# ---- failures are explicit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_a_non_finite_loss_stops_or_is_skipped_and_counted(tmp_path, data_dir, skip):
    session = Session(
        parse_config(peft_values(tmp_path, data_dir, PEFT_type="LoRA", skip_nonfinite_loss=skip))
    )
    session.load()
    method, model = session.method, session.model
    method.begin_task(model, session.tasks[0], session.data[0])
    method.step = 7
    batch = method.collator(session.tokenizer)(session.data[0].train_rows[:2])
    nan = torch.tensor(math.nan, requires_grad=True)
    if not skip:
        with pytest.raises(TrainingError, match=r"task 'task0' at step 7.*skip_nonfinite_loss"):
            method._finite(nan, model)
        return
    loss = method._finite(nan, model)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in method.adapters.parameters_of("task-0"))
    assert method.compute_loss(model, batch, LossScale(None)).isfinite()
    assert method.skipped == {"task0": 1}
