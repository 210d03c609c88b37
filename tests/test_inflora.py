"""InfLoRA: the subspace math by hand, the collection pass against the model's own layers, the designed A
(orthogonal to the stored subspace, frozen, never in the optimizer), interference-freeness on the model,
saved state, continuation, and the logged terms."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from retain.cl.base import Task
from retain.cl.inflora.math import (
    ROW_NORM,
    complement,
    covariance,
    design_down_projection,
    directions_to_add,
    empty_basis,
    grow_basis,
)
from retain.cl.inflora.method import BASIS_PREFIX, STATE_FILE, collection_rows
from retain.cl.registry import parse_config
from retain.cl.stacked.method import ADAPTERS_DIR
from retain.errors import ConfigError, ModelError
from retain.export import export_run
from retain.training.sequence import Session

# ---- helpers -------------------------------------------------------------------------------------------


def saved_bases(run_dir, task_id):
    tensors = load_file(str(run_dir / f"task_{task_id}" / STATE_FILE))
    return {k[len(BASIS_PREFIX) :]: v for k, v in tensors.items()}


def saved_adapter(run_dir, task_id, adapter):
    return load_file(str(run_dir / f"task_{task_id}" / ADAPTERS_DIR / adapter / "adapter_model.safetensors"))


def logged(run_dir, task_id):
    history = json.loads((run_dir / "logs" / f"train_task_{task_id}.json").read_text())
    return [entry for entry in history if "loss" in entry]


def unsigned(t):
    """Rows up to sign: each row times the sign of its largest-magnitude entry."""
    index = t.abs().argmax(dim=1, keepdim=True)
    return t * torch.sign(t.gather(1, index))


def learnable(tiny_config, learnable_dir, **overrides):
    values = dict(
        cl_method="inflora",
        dataset_dir=str(learnable_dir),
        learning_rate=1e-2,
        num_train_epochs=2,
        logging_steps=1,
        max_new_tokens=4,
    )
    return tiny_config(**{**values, **overrides})


# ---- the math by hand -------------------------------------------------------------------------------------


def test_covariance_and_complement_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    # X^T X = [[1 + 9, 2], [2, 4]]; / 2 tokens
    assert torch.equal(covariance(x), torch.tensor([[5.0, 1.0], [1.0, 2.0]]))
    assert torch.equal(covariance(torch.zeros(0, 3)), torch.zeros(3, 3))
    assert torch.equal(complement(empty_basis(3)), torch.eye(3))
    basis = torch.tensor([[0.6], [0.8], [0.0]])
    rest = complement(basis)
    assert rest.shape == (3, 2)
    torch.testing.assert_close(rest.T @ rest, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis.T @ rest, torch.zeros(1, 2), atol=1e-6, rtol=0)
    # Together they span everything: the projector onto the complement is I - M M^T.
    torch.testing.assert_close(rest @ rest.T, torch.eye(3) - basis @ basis.T, atol=1e-6, rtol=0)


def test_designed_a_is_the_top_directions_outside_the_stored_subspace_by_hand():
    cov = torch.diag(torch.tensor([3.0, 5.0, 1.0, 4.0, 2.0]))  # strongest: e2, e4, e1, e5, e3
    e = torch.eye(5)
    # No stored subspace: the top-2 eigenvectors of C, as rows of norm 1/sqrt(3).
    a = design_down_projection(cov, empty_basis(5), rank=2)
    torch.testing.assert_close(unsigned(a), torch.stack([e[1], e[3]]) * ROW_NORM, atol=1e-6, rtol=0)
    # e2 stored: the top-2 of P C P are then e4 and e1.
    a = design_down_projection(cov, e[:, [1]], rank=2)
    torch.testing.assert_close(unsigned(a), torch.stack([e[3], e[0]]) * ROW_NORM, atol=1e-6, rtol=0)
    assert ROW_NORM == pytest.approx(3**-0.5)
    # A stored direction that mixes e2 and e4: the complement holds (e2 - e4)/sqrt(2), whose energy
    # (5 + 4) / 2 = 4.5 beats e1's 3.
    mixed = ((e[1] + e[3]) / 2**0.5)[:, None]
    a = design_down_projection(cov, mixed, rank=1)
    torch.testing.assert_close(unsigned(a), ((e[1] - e[3]) / 2**0.5 * ROW_NORM)[None], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="free directions"):
        design_down_projection(cov, e[:, :4], rank=2)


def test_directions_to_add_by_hand():
    energies = torch.tensor([4.0, 3.0, 2.0, 1.0])  # total 10
    assert directions_to_add(0.0, 10.0, energies, 0.65) == 2  # 4 + 3 = 7 >= 6.5
    assert directions_to_add(0.0, 10.0, energies, 0.75) == 3  # 9 >= 7.5
    assert directions_to_add(0.0, 10.0, energies, 0.3) == 1
    assert directions_to_add(7.0, 10.0, energies, 0.65) == 0  # the subspace holds enough already
    assert directions_to_add(5.0, 10.0, energies, 0.85) == 1  # 5 + 4 = 9 >= 8.5
    assert directions_to_add(0.0, 10.0, energies, 0.0) == 0  # epsilon 0 stores nothing
    assert directions_to_add(0.0, 10.0, energies, 1.0) == 4
    assert directions_to_add(0.0, 10.0, torch.tensor([4.0, 3.0]), 1.0) == 2  # short of 1: all there are
    assert directions_to_add(0.0, 0.0, energies, 0.9) == 0  # no energy at all


def test_grow_basis_by_hand_keeps_old_columns_and_stops_at_its_cap():
    e = torch.eye(4)
    first = grow_basis(empty_basis(4), torch.diag(torch.tensor([1.0, 4.0, 3.0, 2.0])), 0.65, max_dim=3)
    # energies 4, 3 of 10 reach 0.65: e2 then e3
    torch.testing.assert_close(unsigned(first.T), torch.stack([e[1], e[2]]), atol=1e-6, rtol=0)
    # Task 2 (total 1 + 0 + 3 + 0.5 = 4.5): span{e2, e3} holds 3 < 0.7 * 4.5; with e1 (1), 4 >= 3.15.
    cov2 = torch.diag(torch.tensor([1.0, 0.0, 3.0, 0.5]))
    second = grow_basis(first, cov2, 0.7, max_dim=3)
    assert torch.equal(second[:, :2], first)
    torch.testing.assert_close(unsigned(second[:, 2:].T), e[[0]], atol=1e-6, rtol=0)
    # 0.95 would need e1 and e4 (4.5 >= 4.275), but the cap (d - r = 3 columns) keeps e1 only.
    capped = grow_basis(first, cov2, 0.95, max_dim=3)
    torch.testing.assert_close(capped, second, atol=1e-6, rtol=0)
    assert torch.equal(grow_basis(second, cov2, 1.0, max_dim=3), second)  # full: unchanged
    assert torch.equal(grow_basis(first, cov2, 0.6, max_dim=3), first)  # 3 >= 0.6 * 4.5: nothing to add


def random_covariance(gen, dim, rank, tokens=200):
    """The covariance of `tokens` inputs that live in a random `rank`-dim subspace (plus a little noise)."""
    mix = torch.randn(rank, dim, generator=gen) * torch.linspace(3, 0.5, rank)[:, None]
    x = torch.randn(tokens, rank, generator=gen) @ mix + 0.01 * torch.randn(tokens, dim, generator=gen)
    return covariance(x), x


def test_grown_bases_stay_orthonormal_and_new_loras_ignore_stored_inputs():
    gen = torch.Generator().manual_seed(0)
    dim, rank = 48, 4
    basis = empty_basis(dim)
    for _ in range(6):  # six tasks, each with its own input subspace
        cov, x = random_covariance(gen, dim, 10)
        basis = grow_basis(basis, cov, 0.97, max_dim=dim - rank)
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
        # The task's inputs keep at least 0.97 of their energy inside the stored subspace (until it is full).
        if basis.shape[1] < dim - rank:
            inside = (x @ basis).pow(2).sum() / x.pow(2).sum()
            assert float(inside) >= 0.97 - 1e-5
    assert 10 < basis.shape[1] <= dim - rank
    # The next task's A is orthogonal to the stored subspace: for x in it, A x = 0, so B A x = 0 for any B.
    cov, _ = random_covariance(gen, dim, 10)
    a = design_down_projection(cov, basis, rank)
    torch.testing.assert_close(a @ a.T, torch.eye(rank) * ROW_NORM**2, atol=1e-6, rtol=0)
    stored = basis @ torch.randn(basis.shape[1], 32, generator=gen)  # 32 inputs inside span(M)
    b = torch.randn(16, rank, generator=gen)
    assert float((a @ stored).abs().max()) < 1e-5 * float(stored.abs().max())
    assert float((b @ a @ stored).abs().max()) < 1e-4 * float(stored.abs().max())
    # Inputs outside the subspace do reach the new LoRA.
    outside = complement(basis) @ torch.randn(dim - basis.shape[1], 32, generator=gen)
    assert float((a @ outside).abs().max()) > 0.1


# ---- config and rows ---------------------------------------------------------------------------------------


def test_arguments_defaults_and_checks():
    config = parse_config({"model_name_or_path": "x", "cl_tasks": "a", "use_inflora": True})
    args = config.method_args
    assert config.cl.cl_method == "inflora"
    assert (args.inflora_threshold, args.inflora_samples) == (0.97, 256)
    for key, value in (
        ("inflora_threshold", 1.5),
        ("inflora_threshold", -0.1),
        ("inflora_threshold", float("nan")),
        ("inflora_samples", 0),
    ):
        with pytest.raises(ConfigError) as err:
            parse_config({"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "inflora", key: value})
        assert err.value.field == key


def test_collection_rows_are_seeded_distinct_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    rows = collection_rows(100, 10, 0, "task0")
    assert rows == sorted(set(rows)) and len(rows) == 10 and all(0 <= i < 100 for i in rows)
    assert rows == collection_rows(100, 10, 0, "task0")
    assert rows != collection_rows(100, 10, 1, "task0") and rows != collection_rows(100, 10, 0, "task1")
    assert collection_rows(5, 10, 0, "task0") == [0, 1, 2, 3, 4]
    assert torch.equal(state, torch.get_rng_state())


# ---- on the tiny model ---------------------------------------------------------------------------------------


def test_collection_is_the_covariance_of_the_layer_inputs_over_real_tokens(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="inflora", inflora_samples=5)))
    session.load()
    method, model = session.method, session.model
    task, data = session.tasks[0], session.data[0]
    covs = method.collect(task, data, phase="design")
    # q_proj of the first layer reads the normalised embeddings: no LoRA acts before it.
    inner = model.get_base_model().model
    index = method.names.index("base_model.model.model.layers.0.self_attn.q_proj")
    rows = [data.train_rows[i] for i in collection_rows(len(data.train_rows), 5, 0, task.name)]
    with torch.no_grad():
        inputs = [
            inner.layers[0].input_layernorm(inner.embed_tokens(torch.tensor([r["input_ids"]])))[0]
            for r in rows
        ]
    x = torch.cat(inputs)  # every real token of the 5 rows, no padding
    assert method.timings[-1]["tokens"] == x.shape[0] == sum(len(r["input_ids"]) for r in rows)
    assert method.report_info() == {"subspace_timings": method.timings}  # the report and the bench show them
    torch.testing.assert_close(covs[index], x.T @ x / x.shape[0], atol=1e-5, rtol=1e-5)


def test_task_boundaries_leave_rng_modes_and_flags_as_they_should(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="inflora", cl_tasks="task0,task1")))
    session.load()
    method, model = session.method, session.model
    model.train()
    rng = torch.get_rng_state()
    method.begin_task(model, session.tasks[0], session.data[0])
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    for name, param in model.named_parameters():
        assert param.requires_grad == (".task-1." in name and "lora_B" in name), name
    # B starts at 0; the designed A has orthogonal rows of norm 1/sqrt(3) (nothing is stored yet).
    layer = method.layers[0]
    assert not layer.lora_B["task-1"].weight.any()
    a = layer.lora_A["task-1"].weight
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]) / 3, atol=1e-5, rtol=0)
    # What the Trainer does when it resumes a checkpoint: peft's set_adapter, which would make the whole
    # adapter trainable; A stays frozen.
    model.set_adapter("task-1")
    assert not a.requires_grad and layer.lora_B["task-1"].weight.requires_grad
    method.restore_stack()
    method.end_task(model, session.tasks[0], session.data[0])
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert all(0 < b.shape[1] <= b.shape[0] - 4 for b in method.bases)
    assert not any(p.requires_grad for p in model.parameters())

    # inflora_threshold 0 stores nothing: task 2's A is then designed from its own inputs alone.
    zero = Session(
        parse_config(tiny_config(cl_method="inflora", cl_tasks="task0,task1", inflora_threshold=0.0))
    )
    zero.load()
    zero.method.begin_task(zero.model, zero.tasks[0], zero.data[0])
    zero.method.end_task(zero.model, zero.tasks[0], zero.data[0])
    assert all(b.shape[1] == 0 for b in zero.method.bases)


def test_lora_rank_must_leave_room_in_every_layer(tiny_config):
    with pytest.raises(ConfigError) as err:
        Session(parse_config(tiny_config(cl_method="inflora", lora_rank=64))).load()
    assert err.value.field == "lora_rank"


class OptimizerProbe(TrainerCallback):
    """Records the ids of the parameters the optimizer holds when training begins."""

    def __init__(self):
        self.ids: list[set[int]] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.ids.append({id(p) for group in optimizer.param_groups for p in group["params"]})


def test_run_freezes_a_protects_stored_inputs_and_logs_the_loss(tiny_config, learnable_dir, tmp_path):
    run = tmp_path / "inflora"
    session = Session(parse_config(learnable(tiny_config, learnable_dir, output_dir=str(run))))
    session.load()
    method = session.method
    probe = OptimizerProbe()
    callbacks = method.callbacks
    method.callbacks = lambda model: [*callbacks(model), probe]
    designed = {}
    original = method.begin_task

    def recording_begin(model, task, data):
        original(model, task, data)
        designed[task.id] = [
            layer.lora_A[f"task-{task.id}"].weight.detach().clone() for layer in method.layers
        ]

    method.begin_task = recording_begin
    metrics = session.run()
    assert max(v for row in metrics["matrix"][1:] for v in row) > 0, "the tasks must be learned"

    layers, names = method.layers, method.names
    for task_id in (1, 2, 3):
        # A never changes in training (in memory and as saved), and it is not in the optimizer; B is.
        a_params = [layer.lora_A[f"task-{task_id}"].weight for layer in layers]
        b_params = [layer.lora_B[f"task-{task_id}"].weight for layer in layers]
        assert all(torch.equal(p, d) for p, d in zip(a_params, designed[task_id], strict=True))
        optimized = probe.ids[task_id - 1]
        assert not {id(p) for p in a_params} & optimized and {id(p) for p in b_params} <= optimized
        saved = saved_adapter(run, 3, f"task-{task_id}")
        for name, a in zip(names, designed[task_id], strict=True):
            assert torch.equal(saved[f"{name}.lora_A.weight"], a), name
        # The logged loss is its one term.
        assert all(e["loss"] == pytest.approx(e["loss_ce"], rel=1e-6) for e in logged(run, task_id))

    bases = {t: saved_bases(run, t) for t in (1, 2, 3)}
    for name, a2, a3 in zip(names, designed[2], designed[3], strict=True):
        m1, m2, m3 = bases[1][name], bases[2][name], bases[3][name]
        for m in (m1, m2, m3):  # orthonormal, and each task's basis extends the previous one
            torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1]), atol=1e-5, rtol=0)
        assert torch.equal(m2[:, : m1.shape[1]], m1) and torch.equal(m3[:, : m2.shape[1]], m2)
        assert 0 < m1.shape[1] <= m2.shape[1] <= m3.shape[1] <= m1.shape[0] - 4
        # Each task's A is orthogonal to the subspace stored before it.
        assert float((a2 @ m1).abs().max()) < 1e-5 and float((a3 @ m2).abs().max()) < 1e-5

    # On the model: inputs inside task 1's stored subspace get the same output from every target layer
    # whether the stack holds task 1 alone or tasks 1-3: the later LoRAs add nothing there. Elsewhere they do.
    model, (first, _, third) = session.model, session.tasks
    gen = torch.Generator().manual_seed(0)
    inside = [bases[1][n] @ torch.randn(bases[1][n].shape[1], 6, generator=gen) for n in names]
    anywhere = [torch.randn(m.shape[0], 6, generator=gen) for m in inside]
    outputs = {}
    with torch.no_grad():
        for trained in (first, third):
            with method.evaluation(model, trained, first):
                outputs[trained.id] = [
                    (layer(x.T), layer(y.T)) for layer, x, y in zip(layers, inside, anywhere, strict=True)
                ]
    for (in_one, _), (in_three, _) in zip(outputs[1], outputs[3], strict=True):
        torch.testing.assert_close(in_three, in_one, atol=1e-5, rtol=1e-5)
    assert (
        max(float((a3 - a1).abs().max()) for (_, a1), (_, a3) in zip(outputs[1], outputs[3], strict=True))
        > 1e-3
    )

    # Task 1's own inputs to the first layer's q_proj (no LoRA acts before it, so they are what the
    # subspace was grown from): at least epsilon of their energy lies in M_1, so task 2's LoRA input
    # A_2 x carries at most (1 - epsilon) / 3 of it (rows of A_2: orthogonal, norm 1/sqrt(3), outside M_1).
    index = names.index("base_model.model.model.layers.0.self_attn.q_proj")
    cov = method.collect(first, session.data[0], phase="check")[index]
    m1, a2 = bases[1][names[index]], designed[2][index]
    total = float(torch.trace(cov))
    assert float(torch.trace(m1.T @ cov @ m1)) >= (0.97 - 1e-5) * total
    assert float(torch.trace(a2 @ cov @ a2.T)) <= (1 - 0.97) / 3 * total + 1e-5 * total

    # The task states keep the subspace steps up to their task, so a later process (a resumed run) reports
    # them all; restoring an earlier task for evaluation does not shorten the list.
    steps = [(t["task"], t["phase"]) for t in method.timings]
    assert steps[:6] == [(task, phase) for task in (1, 2, 3) for phase in ("design", "grow")]
    later = Session(parse_config(learnable(tiny_config, learnable_dir, output_dir=str(run))))
    later.load()
    later.restore(2)
    assert later.method.report_info() == {"subspace_timings": method.timings[:4]}
    later.restore(3)
    later.restore(1)
    assert later.method.report_info() == {"subspace_timings": method.timings[:6]}


# ---- saved state and continuation --------------------------------------------------------------------------


def test_a_continuation_process_trains_exactly_as_one_process(tiny_config, tmp_path):
    both = tmp_path / "both"
    Session(parse_config(tiny_config(cl_method="inflora", cl_tasks="task0,task1", output_dir=str(both)))).run(
        train=True, evaluate=False
    )
    split = tmp_path / "split"
    Session(parse_config(tiny_config(cl_method="inflora", cl_tasks="task0", output_dir=str(split)))).run(
        train=True, evaluate=False
    )
    Session(
        parse_config(
            tiny_config(
                cl_method="inflora",
                cl_tasks="task1",
                previous_task_model=str(split / "task_1"),
                current_task_id=2,
                output_dir=str(split),
            )
        )
    ).run(train=True, evaluate=False)
    for task_id in (1, 2):
        a, b = saved_bases(both, task_id), saved_bases(split, task_id)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.shape[1] > 0 for v in saved_bases(both, 2).values())
    for adapter in ("task-1", "task-2"):
        a, b = saved_adapter(both, 2, adapter), saved_adapter(split, 2, adapter)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), adapter
    # `retain export` writes the stack as one LoRA: the designed A's stacked by rows, B's by columns.
    export_run(both, tmp_path / "exported")
    exported = load_file(str(tmp_path / "exported" / "adapter_model.safetensors"))
    first, second = saved_adapter(both, 2, "task-1"), saved_adapter(both, 2, "task-2")
    assert exported.keys() == first.keys()
    for key in first:
        dim = 0 if ".lora_A." in key else 1
        assert torch.equal(exported[key], torch.cat([first[key], second[key]], dim=dim)), key
    # The continued run's own folder exports the same stack (its task states are in the folder above).
    export_run(split / "from_task2", tmp_path / "exported_split")
    split_export = load_file(str(tmp_path / "exported_split" / "adapter_model.safetensors"))
    assert all(torch.equal(split_export[k], exported[k]) for k in exported)


def test_loading_a_task_without_inflora_state_names_the_file(tiny_config, tmp_path):
    olora = tmp_path / "olora"
    Session(parse_config(tiny_config(cl_method="olora", cl_tasks="task0", output_dir=str(olora)))).run(
        train=True, evaluate=False
    )
    session = Session(parse_config(tiny_config(cl_method="inflora", output_dir=str(tmp_path / "b"))))
    session.load()
    with pytest.raises(ModelError, match="InfLoRA state not found") as err:
        session.method.load_task(session.model, Task(0, "task0"), olora / "task_1")
    assert STATE_FILE in str(err.value)
