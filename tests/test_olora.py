"""O-LoRA and the stacked per-task LoRAs it shares with N-LoRA: the penalties by hand, the stacked layer
against its formula, what trains and what stays frozen, the logged terms, IncLoRA, continuation."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from retain.cl.base import Task
from retain.cl.loss import LossScale, causal_lm_loss
from retain.cl.registry import parse_config
from retain.cl.stacked.method import ADAPTERS_DIR
from retain.cl.stacked.penalties import orthogonal_loss, overlap, squared_frobenius
from retain.errors import ConfigError, ModelError, TrainingError
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session

# ---- helpers -------------------------------------------------------------------------------------------


def snapshot(model, name):
    return {k: v.detach().clone() for k, v in adapter_parameters(model, name).items()}


def saved(run_dir, task_id, adapter):
    """The tensors of LoRA `adapter` as saved in the task directory of task `task_id`."""
    return load_file(str(run_dir / f"task_{task_id}" / ADAPTERS_DIR / adapter / "adapter_model.safetensors"))


def history(run_dir, task_id):
    return json.loads((run_dir / "logs" / f"train_task_{task_id}.json").read_text())


def logged(run_dir, task_id):
    return [entry for entry in history(run_dir, task_id) if "loss" in entry]


def saved_overlap(run_dir, task_id):
    """sum over modules of sum(|A_1 A_2^T|), from the LoRAs saved after `task_id`."""
    first, second = saved(run_dir, task_id, "task-1"), saved(run_dir, task_id, "task-2")
    keys = sorted(k for k in first if "lora_A" in k)
    return float(orthogonal_loss([first[k] for k in keys], [second[k] for k in keys]))


def batch_of(session, task_index, rows=4):
    data = session.data[task_index]
    return session.method.collator(session.tokenizer)(data.train_rows[:rows])


# ---- the penalties by hand ---------------------------------------------------------------------------------


def test_orthogonal_term_by_hand():
    # Two modules; earlier tasks 1 and 2, current task 3.
    m1 = [torch.tensor([[1.0, 0, 2], [0, 1, -1]]), torch.tensor([[0.0, 0, 1], [1, 0, 0]])]
    m1_current = torch.tensor([[1.0, 1, 0], [2, 0, 1]])
    m2 = [torch.eye(3), torch.tensor([[1.0, -1, 0], [0, 0, 0], [0, 0, 3]])]
    m2_current = torch.tensor([[1.0, 2, 3], [0, -1, 0], [0, 0, 1]])
    # |A1 A3^T| = |[[1, 4], [1, -1]]| -> 7; |A2 A3^T| = |[[0, 1], [1, 2]]| -> 4
    assert float(overlap(m1[0], m1_current)) == 7.0
    assert float(overlap(m1[1], m1_current)) == 4.0
    # I A3^T -> sum|A3| = 8; rows of A2 against rows of A3: [-1, 1, 0], 0, [9, 0, 3] -> 14
    assert float(overlap(m2[0], m2_current)) == 8.0
    assert float(overlap(m2[1], m2_current)) == 14.0
    # The earlier tasks stacked along the rank dimension give the sum over tasks and modules.
    total = orthogonal_loss([torch.cat(m1), torch.cat(m2)], [m1_current, m2_current])
    assert float(total) == 33.0


def test_orthogonal_gradient_reaches_the_current_a_only():
    earlier = torch.tensor([[1.0, 0, 2], [0, 1, -1]])
    current = torch.tensor([[1.0, 1, 0], [2, 0, 1]], requires_grad=True)
    orthogonal_loss([earlier], [current]).backward()
    # d/dA_t sum|E A_t^T| = sign(E A_t^T)^T E; sign = [[1, 1], [1, -1]]
    expected = torch.tensor([[1.0, 0, 2], [0, 1, -1]]).T @ torch.tensor([[1.0, 1], [1, -1]])
    assert torch.equal(current.grad, expected.T)


def test_l2_term_is_the_squared_frobenius_norm_summed_over_tensors():
    a = torch.tensor([[1.0, 2], [3, 4]])  # 1 + 4 + 9 + 16 = 30
    b = torch.tensor([[-1.0, 0, 2]])  # 1 + 0 + 4 = 5
    assert float(squared_frobenius([a, b])) == 35.0


def test_arguments_defaults_and_checks():
    config = parse_config({"model_name_or_path": "x", "cl_tasks": "a", "use_olora": True})
    args = config.method_args
    assert config.cl.cl_method == "olora"
    assert (args.orthogonal_lambda, args.l2_lambda, args.olora_history_path) == (0.1, 0.01, None)
    for key, value in (("orthogonal_lambda", -0.1), ("l2_lambda", float("nan")), ("olora_history_path", " ")):
        with pytest.raises(ConfigError) as err:
            parse_config({"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "olora", key: value})
        assert err.value.field == key


# ---- the stack on the tiny model -------------------------------------------------------------------------


def test_stacked_layer_computes_w_x_plus_scale_times_the_sum_of_active_loras(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="olora")))
    session.load()
    method, model = session.method, session.model
    assert sorted(model.peft_config) == ["task-1", "task-2", "task-3"]
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    gen = torch.Generator().manual_seed(0)

    def give_update(name):  # B starts at 0: a non-zero update, so that every LoRA shows
        with torch.no_grad():
            layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=gen))

    give_update("task-1")
    give_update("task-3")  # inactive while task 2 trains: it must not enter the sum
    method.end_task(model, session.tasks[0], session.data[0])  # task 1 "trained"; task 2 now trains
    method.begin_task(model, session.tasks[1], session.data[1])
    give_update("task-2")
    # `earlier` is task 1's LoRA, copied exactly, with the same scale.
    assert torch.equal(layer.lora_A["earlier"].weight, layer.lora_A["task-1"].weight)
    assert torch.equal(layer.lora_B["earlier"].weight, layer.lora_B["task-1"].weight)
    x = torch.randn(2, 5, 64, generator=gen)
    scale = 8 / 4  # lora_alpha (default 2 * rank) / rank
    assert layer.scaling["task-1"] == layer.scaling["task-2"] == layer.scaling["earlier"] == scale
    a1, b1 = layer.lora_A["task-1"].weight, layer.lora_B["task-1"].weight
    a2, b2 = layer.lora_A["task-2"].weight, layer.lora_B["task-2"].weight
    with torch.no_grad():
        expected = x @ layer.base_layer.weight.T + scale * (x @ a1.T @ b1.T + x @ a2.T @ b2.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        # Evaluation after task 1 uses task 1's LoRA alone; the base row none.
        with method.evaluation(model, session.tasks[0], session.tasks[0]):
            torch.testing.assert_close(
                layer(x), x @ layer.base_layer.weight.T + scale * (x @ a1.T @ b1.T), atol=1e-5, rtol=1e-5
            )
        with method.evaluation(model, None, session.tasks[0]):
            torch.testing.assert_close(layer(x), x @ layer.base_layer.weight.T, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # the stack is back
    # After task 2, `earlier` holds tasks 1 and 2 along the rank dimension and answers alone.
    method.end_task(model, session.tasks[1], session.data[1])
    assert layer.lora_A["earlier"].weight.shape == (8, 64)
    assert torch.equal(layer.lora_B["earlier"].weight, torch.cat([b1, b2], dim=1))
    with torch.no_grad(), method.evaluation(model, session.tasks[1], session.tasks[1]):
        assert layer.active_adapters == ["earlier"]
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # An older row (after task 1, while the model holds tasks 1 and 2) takes the per-task adapters.
    with torch.no_grad(), method.evaluation(model, session.tasks[0], session.tasks[0]):
        assert layer.active_adapters == ["task-1"]


def test_gradients_reach_only_the_current_lora_and_the_loss_is_the_composition(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="olora", orthogonal_lambda=0.5, l2_lambda=0.02)))
    session.load()
    method, model = session.method, session.model
    method.begin_task(model, session.tasks[0], session.data[0])
    method.end_task(model, session.tasks[0], session.data[0])
    method.begin_task(model, session.tasks[1], session.data[1])
    model.train()
    batch = batch_of(session, 1)
    with pytest.raises(TrainingError, match="begin_step"):
        method.compute_loss(model, batch, LossScale(num_items=None))
    method.begin_step([batch])
    loss = method.compute_loss(model, batch, LossScale(num_items=None))
    loss.backward()
    for name, param in model.named_parameters():
        if ".task-2." in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert all(bool(p.grad.abs().sum() > 0) for p in adapter_parameters(model, "task-2").values())
    # The loss is task + 0.5 * orthogonal + 0.02 * l2, each term recomputed here from the adapters.
    a = {k: v for k, v in adapter_parameters(model, "task-1").items() if "lora_A" in k}
    current = adapter_parameters(model, "task-2")
    orth = sum(float(overlap(a[k], current[k])) for k in a)
    l2 = sum(float(p.detach().pow(2).sum()) for p in current.values())
    terms = method.loss_terms.sums
    assert float(terms["loss_orthogonal"]) == pytest.approx(orth, rel=1e-5) and orth > 0
    assert float(terms["loss_l2"]) == pytest.approx(l2, rel=1e-5)
    assert float(loss) == pytest.approx(float(terms["loss_ce"]) + 0.5 * orth + 0.02 * l2, rel=1e-6)


def test_step_loss_is_the_same_under_gradient_accumulation(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="olora", orthogonal_lambda=0.5)))
    session.load()
    method, model = session.method, session.model
    method.begin_task(model, session.tasks[0], session.data[0])
    method.end_task(model, session.tasks[0], session.data[0])
    method.begin_task(model, session.tasks[1], session.data[1])
    model.train()
    batch = batch_of(session, 1, rows=4)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    method.begin_step([batch])
    whole = method.compute_loss(model, batch, LossScale(num_items=tokens))
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    width = [int(h["attention_mask"].sum(1).max()) for h in halves]
    halves = [{k: v[:, :w] for k, v in h.items()} for h, w in zip(halves, width, strict=True)]
    method.begin_step(halves)
    parts = [method.compute_loss(model, h, LossScale(num_items=tokens, accumulation_steps=2)) for h in halves]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-5)
    # The penalties are per-step terms: the step's first micro-batch adds them, once.
    task_parts = [
        float(causal_lm_loss(model, h, LossScale(num_items=tokens, accumulation_steps=2))) for h in halves
    ]
    assert float(parts[1]) == pytest.approx(task_parts[1], rel=1e-6)
    assert float(parts[0]) > task_parts[0] + 1e-3


# ---- full runs ------------------------------------------------------------------------------------------------


def learnable(tiny_config, learnable_dir, **overrides):
    values = dict(
        dataset_dir=str(learnable_dir),
        learning_rate=1e-2,
        num_train_epochs=2,
        logging_steps=1,
        max_new_tokens=4,
    )
    return tiny_config(**{**values, **overrides})


def test_olora_run_freezes_earlier_loras_logs_every_term_and_reduces_overlap(
    tiny_config, learnable_dir, tmp_path
):
    run = tmp_path / "olora"
    session = Session(
        parse_config(learnable(tiny_config, learnable_dir, cl_method="olora", output_dir=str(run)))
    )
    session.load()
    begins = {}
    original = session.method.begin_task

    def recording_begin(model, task, data):
        begins[task.id] = {n: snapshot(model, n) for n in ("task-1", "task-2")}
        return original(model, task, data)

    session.method.begin_task = recording_begin
    metrics = session.run()
    assert max(v for row in metrics["matrix"][1:] for v in row) > 0, "the tasks must be learned"
    # Earlier LoRAs never change: task-1 as it was when task 2 began, in memory and on disk.
    after = snapshot(session.model, "task-1")
    for key, value in begins[2]["task-1"].items():
        assert torch.equal(after[key], value), key
    first, last = saved(run, 1, "task-1"), saved(run, 3, "task-1")
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    assert sorted(p.name for p in (run / "task_3" / ADAPTERS_DIR).iterdir()) == ["task-1", "task-2", "task-3"]
    # Each term is logged; the logged loss is their weighted sum.
    for task_id in (1, 2, 3):
        for entry in logged(run, task_id):
            parts = entry["loss_ce"] + 0.1 * entry["loss_orthogonal"] + 0.01 * entry["loss_l2"]
            assert entry["loss"] == pytest.approx(parts, rel=1e-5)
    assert all(e["loss_orthogonal"] == 0.0 for e in logged(run, 1)), "task 1 has no earlier LoRA"
    assert all(e["loss_orthogonal"] > 0 for e in logged(run, 2) + logged(run, 3))

    # A strong orthogonality weight leaves task 2's A overlapping task 1's less than IncLoRA does.
    overlaps = {}
    for weight in (5.0, 0.0):
        out = tmp_path / f"weight{weight}"
        values = learnable(
            tiny_config,
            learnable_dir,
            cl_method="olora",
            cl_tasks="task0,task1",
            orthogonal_lambda=weight,
            l2_lambda=0.0,
            output_dir=str(out),
        )
        Session(parse_config(values)).run(train=True, evaluate=False)
        overlaps[weight] = saved_overlap(out, 2)
    assert overlaps[5.0] < 0.5 * overlaps[0.0]


def test_zero_weights_are_inclora_task_one_is_seq_and_olora_equals_nlora(
    tiny_config, learnable_dir, tmp_path
):
    runs = {}
    for name, values in (
        ("seq", {"cl_method": "seq"}),
        ("olora", {"cl_method": "olora", "orthogonal_lambda": 0.0, "l2_lambda": 0.0}),
        ("nlora", {"cl_method": "nlora", "nlora_lambda": 0.0, "l2_lambda": 0.0}),
    ):
        out = tmp_path / name
        config = learnable(tiny_config, learnable_dir, cl_tasks="task0,task1", output_dir=str(out), **values)
        runs[name] = (out, Session(parse_config(config)).run())
    (seq_dir, seq), (olora_dir, olora), (nlora_dir, nlora) = runs["seq"], runs["olora"], runs["nlora"]
    # Task 1 of IncLoRA is one LoRA, initialised and trained exactly as seq's.
    assert olora["matrix"][:2] == seq["matrix"][:2]
    seq_adapter = load_file(str(seq_dir / "task_1" / "adapter" / "adapter_model.safetensors"))
    first = saved(olora_dir, 1, "task-1")
    assert seq_adapter.keys() == first.keys() and all(torch.equal(seq_adapter[k], first[k]) for k in first)
    # With both weights 0, the penalties are only logged: O-LoRA and N-LoRA train the same IncLoRA.
    assert olora["matrix"] == nlora["matrix"]
    assert [e["loss"] for e in logged(olora_dir, 2)] == [e["loss"] for e in logged(nlora_dir, 2)]
    for adapter in ("task-1", "task-2"):
        a, b = saved(olora_dir, 2, adapter), saved(nlora_dir, 2, adapter)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(e["loss_orthogonal"] > 0 for e in logged(olora_dir, 2)), "logged even when its weight is 0"
    assert all(e["loss"] == e["loss_ce"] for e in logged(olora_dir, 2))


# ---- continuation ----------------------------------------------------------------------------------------------


def test_a_continuation_process_trains_exactly_as_one_process(tiny_config, tmp_path):
    both = tmp_path / "both"
    Session(parse_config(tiny_config(cl_method="olora", cl_tasks="task0,task1", output_dir=str(both)))).run(
        train=True, evaluate=False
    )
    split = tmp_path / "split"
    Session(parse_config(tiny_config(cl_method="olora", cl_tasks="task0", output_dir=str(split)))).run(
        train=True, evaluate=False
    )
    second = Session(
        parse_config(
            tiny_config(
                cl_method="olora",
                cl_tasks="task1",
                previous_task_model=str(split / "task_1"),
                current_task_id=2,
                output_dir=str(split),
            )
        )
    )
    second.run(train=True, evaluate=False)
    for adapter in ("task-1", "task-2"):
        a, b = saved(both, 2, adapter), saved(split, 2, adapter)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), adapter

    # olora_history_path replaces previous_task_model as the source of the earlier LoRAs.
    other = tmp_path / "history"
    shutil.copytree(split / "task_1", other)
    weights = other / ADAPTERS_DIR / "task-1" / "adapter_model.safetensors"
    save_file({k: 2 * v for k, v in load_file(str(weights)).items()}, str(weights))
    third = Session(
        parse_config(
            tiny_config(
                cl_method="olora",
                cl_tasks="task1",
                previous_task_model=str(split / "task_1"),
                olora_history_path=str(other),
                current_task_id=2,
                output_dir=str(tmp_path / "third"),
            )
        )
    )
    third.load()
    third.restore(0)
    loaded = snapshot(third.model, "task-1")
    doubled = {k: 2 * v for k, v in snapshot(second.model, "task-1").items()}
    assert all(torch.equal(loaded[k], doubled[k]) for k in loaded)


def test_continuation_errors_name_the_key(tiny_config, tmp_path):
    seq_run = tmp_path / "seq"
    Session(parse_config(tiny_config(cl_tasks="task0", output_dir=str(seq_run)))).run(
        train=True, evaluate=False
    )
    with pytest.raises(ConfigError) as err:  # task 2 without the LoRA of task 1
        Session(parse_config(tiny_config(cl_method="olora", cl_tasks="task1", current_task_id=2))).run(
            train=True, evaluate=False
        )
    assert err.value.field == "previous_task_model"
    with pytest.raises(ModelError, match="not a stacked-LoRA task directory"):
        Session(
            parse_config(
                tiny_config(
                    cl_method="olora",
                    cl_tasks="task1",
                    current_task_id=2,
                    previous_task_model=str(seq_run / "task_1"),
                    output_dir=str(tmp_path / "b"),
                )
            )
        ).run(train=True, evaluate=False)
    run = tmp_path / "olora"
    Session(parse_config(tiny_config(cl_method="olora", cl_tasks="task0", output_dir=str(run)))).run(
        train=True, evaluate=False
    )
    with pytest.raises(ConfigError) as err:  # continuing after task 1 but starting at task 1 again
        Session(
            parse_config(
                tiny_config(
                    cl_method="olora",
                    cl_tasks="task1",
                    previous_task_model=str(run / "task_1"),
                    output_dir=str(tmp_path / "c"),
                )
            )
        ).run(train=True, evaluate=False)
    assert err.value.field == "current_task_id"
    session = Session(parse_config(tiny_config(cl_method="olora", output_dir=str(tmp_path / "d"))))
    session.load()
    session.method.load_task(session.model, Task(0, "task0"), run / "task_1")
    with pytest.raises(Exception, match="already trained or loaded"):
        session.method.begin_task(session.model, Task(0, "task0"), session.data[0])
