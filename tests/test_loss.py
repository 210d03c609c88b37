import pytest
import torch

from retain.cl.loss import LossScale, shifted_targets, token_ce_sum
from retain.cl.registry import parse_config
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session


def test_loss_scale_token_mean_over_accumulation():
    # Two micro-batches with 3 and 1 label tokens, summed losses 6 and 10: the step's mean is 16/4.
    scale = LossScale(num_items=4, accumulation_steps=2)
    total = scale.token_mean(torch.tensor(6.0), 3) + scale.token_mean(torch.tensor(10.0), 1)
    assert total.item() == pytest.approx(4.0)
    # Per-batch terms average over micro-batches.
    assert (
        scale.batch_mean(torch.tensor(2.0)) + scale.batch_mean(torch.tensor(4.0))
    ).item() == pytest.approx(3.0)
    # Under 2 processes DDP averages gradients, so each rank's token share is doubled.
    ddp = LossScale(num_items=8, accumulation_steps=1, num_processes=2)
    assert ddp.token_mean(torch.tensor(4.0), 4).item() == pytest.approx(1.0)


def test_shifted_targets_and_ce_sum():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    keep, targets = shifted_targets(labels)
    assert keep.tolist() == [0, 1, 2]  # positions whose next token is a label
    assert targets.tolist() == [[-100, 5, 6], [7, -100, -100]]
    logits = torch.zeros(2, 3, 10)
    total, count = token_ce_sum(logits, targets)
    assert count.item() == 3
    assert total.item() == pytest.approx(3 * torch.log(torch.tensor(10.0)).item(), rel=1e-6)


def one_step(tiny_config, tmp_path, batch, accumulation):
    config = parse_config(
        tiny_config(
            cl_tasks="task0",
            max_samples=8,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            logging_steps=1,
            lora_dropout=0.0,
            output_dir=str(tmp_path / f"run_{batch}x{accumulation}"),
        )
    )
    session = Session(config)
    session.load()
    session.train_task(session.tasks[0], session.data[0])
    logs = [h for h in session_logs(session) if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in adapter_parameters(session.model, "default").items()}


def session_logs(session):
    return session._last_log_history


def test_gradient_accumulation_gives_the_same_loss_and_update(tiny_config, tmp_path, monkeypatch):
    from retain.training import trainer as trainer_module

    history = []
    original = trainer_module.CLTrainer.log

    def log(self, logs, *args, **kwargs):
        history.append(dict(logs))
        return original(self, logs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.CLTrainer, "log", log)
    Session._last_log_history = history
    logs1, weights1 = one_step(tiny_config, tmp_path, batch=8, accumulation=1)
    loss1 = [h["loss"] for h in history if "loss" in h]
    history.clear()
    logs4, weights4 = one_step(tiny_config, tmp_path, batch=2, accumulation=4)
    loss4 = [h["loss"] for h in history if "loss" in h]
    assert len(loss1) == len(loss4) == 1
    assert loss1[0] == pytest.approx(loss4[0], abs=1e-5)
    # SGD: the update is proportional to the gradient, so a mis-scaled loss would show here.
    for k in weights1:
        torch.testing.assert_close(weights1[k], weights4[k], atol=1e-6, rtol=1e-5)
