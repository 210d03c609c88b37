"""N-LoRA: the L1 penalty on B_t A_t by hand (value and gradient), its keys, and a full run."""

import pytest
import torch
from safetensors.torch import load_file

from retain.cl.registry import parse_config
from retain.cl.stacked.method import ADAPTERS_DIR
from retain.cl.stacked.penalties import product_l1, sparsity_loss
from retain.errors import ConfigError
from retain.training.sequence import Session
from tests.run_helpers import log_entries, two_task_values

B = [[1.0, 0], [2, -1], [0, 3]]  # [out=3, r=2]
A = [[1.0, -1, 0, 2], [0, 1, 1, -1]]  # [r=2, in=4]


def test_l1_of_the_update_by_hand():
    b, a = torch.tensor(B, requires_grad=True), torch.tensor(A, requires_grad=True)
    # B A = [[1, -1, 0, 2], [2, -3, -1, 5], [0, 3, 3, -3]]: |.| sums to 4 + 11 + 9
    value = product_l1(b, a)
    assert float(value) == 24.0
    value.backward()
    # S = sign(B A) (0 where B A is 0); dB = S A^T, dA = B^T S
    assert torch.equal(b.grad, torch.tensor([[4.0, -2], [4, -3], [-3, 3]]))
    assert torch.equal(a.grad, torch.tensor([[3.0, -3, -2, 3], [-1, 4, 4, -4]]))


def test_l1_matches_autograd_of_the_plain_formula_and_sums_over_modules():
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(5, 3, generator=gen), torch.randn(3, 7, generator=gen)) for _ in range(2)]
    pairs.append((torch.zeros(4, 3), torch.randn(3, 6, generator=gen)))  # B = 0: value and gradient 0
    mine = [(b.double().requires_grad_(), a.double().requires_grad_()) for b, a in pairs]
    plain = [(b.double().requires_grad_(), a.double().requires_grad_()) for b, a in pairs]
    total = sparsity_loss([b for b, _ in mine], [a for _, a in mine])
    expected = sum((b @ a).abs().sum() for b, a in plain)
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    total.backward()
    expected.backward()
    for (b, a), (pb, pa) in zip(mine, plain, strict=True):
        torch.testing.assert_close(b.grad, pb.grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.grad, pa.grad, rtol=1e-12, atol=0)
    assert float(mine[2][1].grad.abs().sum()) == 0.0
    with pytest.raises(ValueError):
        product_l1(torch.zeros(3, 2), torch.zeros(3, 4))


def test_arguments_defaults_and_checks():
    config = parse_config({"model_name_or_path": "x", "cl_tasks": "a", "use_nlora": True})
    assert config.cl.cl_method == "nlora"
    assert (config.method_args.nlora_lambda, config.method_args.l2_lambda) == (0.4, 0.0)
    for key, value in (("nlora_lambda", -1.0), ("l2_lambda", float("inf"))):
        with pytest.raises(ConfigError) as err:
            parse_config({"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "nlora", key: value})
        assert err.value.field == key
    with pytest.raises(ConfigError) as err:  # O-LoRA's key is not N-LoRA's
        parse_config(
            {"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "nlora", "orthogonal_lambda": 1}
        )
    assert err.value.field == "orthogonal_lambda"


def update_l1(run_dir, task_id, adapter):
    """sum over modules of ||B A||_1 of one LoRA saved after `task_id`."""
    tensors = load_file(
        str(run_dir / f"task_{task_id}" / ADAPTERS_DIR / adapter / "adapter_model.safetensors")
    )
    keys = sorted(k for k in tensors if "lora_A" in k)
    return float(
        sparsity_loss([tensors[k.replace("lora_A", "lora_B")] for k in keys], [tensors[k] for k in keys])
    )


def test_nlora_run_logs_every_term_keeps_earlier_loras_and_sparsifies_the_update(
    tiny_config, learnable_dir, tmp_path
):
    # A small weight: the L1 norm sums every entry of each module's [out, in] update, and the default
    # 0.4 keeps the tiny model from learning anything (docs/methods/nlora.md, "weight").
    runs = {}
    for weight in (0.001, 0.0):
        name = f"weight{weight}"
        values = two_task_values(
            tiny_config, learnable_dir, tmp_path, name, cl_method="nlora", nlora_lambda=weight
        )
        runs[weight] = Session(parse_config(values)).run()
    run = tmp_path / "weight0.001"
    assert max(v for row in runs[0.001]["matrix"][1:] for v in row) > 0, "the tasks must be learned"
    for task_id in (1, 2):
        entries = log_entries(run, task_id)
        assert entries[0]["loss_l1"] == 0.0, "B_t starts at 0, so does B_t A_t"
        assert all(e["loss_l1"] > 0 for e in entries[1:])
        for entry in entries:
            assert entry["loss"] == pytest.approx(entry["loss_ce"] + 0.001 * entry["loss_l1"], rel=1e-5)
            assert entry["loss_l2"] > 0  # logged, with weight 0 by default
    # The earlier LoRA is saved unchanged with task 2; the penalty shrinks task 2's update.
    first = load_file(str(run / "task_1" / ADAPTERS_DIR / "task-1" / "adapter_model.safetensors"))
    again = load_file(str(run / "task_2" / ADAPTERS_DIR / "task-1" / "adapter_model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any("k_proj" in k for k in first), "GQA: k_proj's in and out differ, B A still is defined"
    assert update_l1(run, 2, "task-2") < 0.5 * update_l1(tmp_path / "weight0.0", 2, "task-2")
