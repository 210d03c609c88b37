"""Helpers shared by the I-LoRA tests: adapter snapshots, an EMA recorder, tiny configs and rows."""

import torch
from transformers import TrainerCallback

from retain.cl.ilora import ILORA
from retain.model.adapters import adapter_parameters
from tests import step_helpers


def snapshot(model, name):
    return {k: v.detach().clone() for k, v in adapter_parameters(model, name).items()}


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0, msg=lambda m, k=k: f"{k}: {m}")


def differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def perturb(model, name, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    for param in adapter_parameters(model, name).values():
        param.add_(scale * torch.randn(param.shape, generator=gen))


class Recorder:
    """Wraps a method's hooks to record the adapters at task starts and around every EMA update,
    and checks after every backward pass that the EMA adapter has no gradient and is not optimised."""

    def __init__(self, method):
        self.method = method
        self.starts = {}  # task id -> (default, ema) at the start of the task
        self.updates = {}  # task id -> [(default after the optimizer step, decay)]
        self.ema_after = {}
        self.grad_checks = 0
        self.task = None
        begin, update, callbacks = method.begin_task, method.update_ema_weights, method.callbacks

        def begin_task(model, task, data):
            begin(model, task, data)
            self.task = task.id
            self.starts[task.id] = (snapshot(model, "default"), snapshot(model, "ema"))
            self.updates[task.id] = []

        def update_ema_weights():
            default = snapshot(method.model, "default")
            decay = update()
            self.updates[self.task].append((default, decay))
            self.ema_after[self.task] = snapshot(method.model, "ema")
            return decay

        def with_check(model):
            return [*callbacks(model), GradCheck(self)]

        method.begin_task, method.update_ema_weights, method.callbacks = (
            begin_task,
            update_ema_weights,
            with_check,
        )


class GradCheck(TrainerCallback):
    def __init__(self, recorder):
        self.recorder = recorder

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        ema = adapter_parameters(model, "ema").values()
        default = adapter_parameters(model, "default").values()
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert all(p.grad is None and not p.requires_grad for p in ema)
        assert not any(id(p) in optimised for p in ema)
        assert all(p.grad is not None and p.requires_grad for p in default)
        assert all(id(p) in optimised for p in default)
        self.recorder.grad_checks += 1


def replay_recurrence(start_ema, updates, alpha):
    ema = {k: v.clone() for k, v in start_ema.items()}
    for t, (default, decay) in enumerate(updates):
        a = min(1 - 1 / (t + 1), alpha)
        assert decay == a
        ema = {k: a * ema[k] + (1 - a) * default[k] for k in ema}
    return ema


def ilora_config(tiny_config, **overrides):
    values = {"cl_method": "ilora", "max_samples": 8, "lora_dropout": 0.0}  # 8 rows / batch 4: 2 steps
    values.update(overrides)
    return tiny_config(**values)


def bare_method(tiny_config, **overrides):
    """An ILORA instance wrapping the tiny model, without a session (for step-level checks)."""
    return step_helpers.bare_method(ILORA, ilora_config(tiny_config, cl_tasks="task0", **overrides))
