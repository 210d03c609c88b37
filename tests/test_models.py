"""Precision, attention kernel, placement and 4/8-bit quantization of the base model."""

import json
import math

import pytest
import torch

from retain.cl.registry import method_specs, parse_config
from retain.errors import ConfigError, ModelError
from retain.hparams.args import ModelArguments
from retain.model.adapters import adapter_parameters, add_lora, lora_config
from retain.model.loader import load_model
from retain.training.sequence import Session
from tests.conftest import SMALL_METHOD_VALUES, small_tasks, write_task_family

TINY = "tiny-random-llama"


def test_torch_dtype_loads_the_base_in_that_dtype_and_lora_stays_float32():
    model, _ = load_model(ModelArguments(model_name_or_path=TINY, torch_dtype="bfloat16"))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    from retain.hparams.args import FinetuningArguments

    adapted = add_lora(model, "default", lora_config(FinetuningArguments(lora_rank=2)))
    assert {p.dtype for p in adapter_parameters(adapted, "default").values()} == {torch.float32}
    auto, _ = load_model(ModelArguments(model_name_or_path=TINY))  # auto: float32 on a CPU
    assert next(auto.parameters()).dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_tiny_model_in_another_dtype_keeps_every_weight(arch):
    """The tiny model goes through a checkpoint folder for another dtype: nothing is lost on the way."""
    name = f"tiny-random-{arch}"
    reference = dict(load_model(ModelArguments(model_name_or_path=name))[0].state_dict())
    half = dict(load_model(ModelArguments(model_name_or_path=name, torch_dtype="bfloat16"))[0].state_dict())
    assert half.keys() == reference.keys()
    for key, weight in reference.items():
        assert torch.equal(half[key], weight.to(torch.bfloat16)), key


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("gemma2", False)])
def test_saving_in_any_process_writes_what_save_pretrained_writes(arch, tied, tmp_path):
    """The folder written without `save_pretrained` (which only rank 0 may call) holds the same files,
    config and tensors, a tied output embedding (as SmolLM2's) once under the same name."""
    from safetensors.torch import load_file

    from retain.model.loader import _save_in_this_process
    from retain.model.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(arch, build_tiny_tokenizer(arch))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "reference")
    _save_in_this_process(model, tmp_path / "ours")
    names = {path.name for path in (tmp_path / "reference").iterdir()}
    assert {path.name for path in (tmp_path / "ours").iterdir()} == names
    for name in names - {"model.safetensors"}:
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads(
            (tmp_path / "reference" / name).read_text()
        )
    ours, reference = (load_file(tmp_path / folder / "model.safetensors") for folder in ("ours", "reference"))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[key], reference[key]) for key in reference)


@pytest.mark.parametrize(("key", "kernel"), [("disabled", "eager"), ("sdpa", "sdpa")])
def test_flash_attn_maps_to_the_attention_implementation(key, kernel):
    model, _ = load_model(ModelArguments(model_name_or_path=TINY, flash_attn=key))
    assert model.config._attn_implementation == kernel


def test_bad_model_options_are_config_errors():
    base = {"model_name_or_path": TINY, "cl_tasks": "a"}
    for key, value, message in (
        ("torch_dtype", "float64", "expected one of auto, float32, bfloat16, float16"),
        ("flash_attn", "fa3", "expected one of auto, disabled, sdpa, fa2"),
        ("quantization_bit", 3, "expected 4 or 8"),
        ("quantization_method", "hqq", "expected one of bitsandbytes"),
        ("quantization_type", "int4", "expected one of nf4, fp4"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            parse_config({**base, key: value})
        assert err.value.field == key


def test_quantization_without_bitsandbytes_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ModelError, match="pip install bitsandbytes") as err:
        load_model(ModelArguments(model_name_or_path=TINY, quantization_bit=4))
    assert err.value.field == "quantization_bit"


@pytest.mark.parametrize(("bits", "layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantized_base_loads_and_freezes(bits, layer):
    pytest.importorskip("bitsandbytes")
    model, _ = load_model(ModelArguments(model_name_or_path=TINY, quantization_bit=bits))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    assert not any(p.requires_grad for p in model.parameters())  # prepared for k-bit training
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.dtype == torch.float32


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    return write_task_family(tmp_path_factory.mktemp("q") / "data", small_tasks(2, rows=8))


METHOD_VALUES = SMALL_METHOD_VALUES


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(method_specs()))
def test_every_method_trains_on_a_4bit_base(method, two_tasks, tmp_path):
    pytest.importorskip("bitsandbytes")
    values = {
        "model_name_or_path": TINY,
        "quantization_bit": 4,
        "cl_method": method,
        "dataset_dir": str(two_tasks),
        "cl_tasks": "task0,task1",
        "per_device_train_batch_size": 4,
        "max_samples": 4,
        "eval_max_samples": 2,
        "max_new_tokens": 2,
        "learning_rate": 1e-2,
        "lora_rank": 4,
        "logging_steps": 1,
        "disable_tqdm": True,
        "eval_base_cache": False,
        "output_dir": str(tmp_path / "run"),
        **METHOD_VALUES.get(method, {}),
    }
    session = Session(parse_config({k: v for k, v in values.items() if v is not None}))
    session.load()
    quantized = [m for m in session.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "the base is 4-bit"
    metrics = session.run()
    assert all(v is not None for v in metrics["matrix"][2])
    history = json.loads((tmp_path / "run" / "logs" / "train_task_2.json").read_text())
    steps = [e for e in history if "loss" in e]
    assert steps and all(math.isfinite(e["loss"]) for e in steps)
    assert all(e["grad_norm"] > 0 for e in steps)  # gradients reach the adapters through the 4-bit base


def test_the_base_row_cache_tells_quantized_bases_apart():
    pytest.importorskip("bitsandbytes")
    from retain.eval.base_cache import base_model_id

    plain_args = ModelArguments(model_name_or_path=TINY)
    quant_args = ModelArguments(model_name_or_path=TINY, quantization_bit=4)
    plain = base_model_id(plain_args, load_model(plain_args)[0])
    quantized = base_model_id(quant_args, load_model(quant_args)[0])
    assert plain != quantized
