import pytest
import torch

from retain.eval.predict import batch_cache, common_prefix_length, generate_answers, score
from retain.model.tiny import build_tiny_llama, build_tiny_model, build_tiny_tokenizer


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # one token of each row stays to be fed
    assert common_prefix_length([[7], [8, 9]]) == 0
    assert common_prefix_length([]) == 0


def diverse_model():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(
                torch.randn(param.shape, generator=generator) * 0.3
            )  # answers now depend on the prompt
    return model, tokenizer


def test_shared_prefix_cache_gives_identical_answers():
    model, tokenizer = diverse_model()
    head = "<|im_start|>system\nYou classify.<|im_end|>\n<|im_start|>user\nWhich topic is this text about?\n"
    prompts = [
        tokenizer(
            head + f"text {i} " + "abc " * (i % 5) + "<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )["input_ids"]
        for i in range(13)
    ]
    plain = generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=5, share_prefix=False)
    shared = generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=5, share_prefix=True)
    assert len(set(plain)) > 3, "the check needs prompt-dependent answers"
    assert shared == plain
    # Batch size does not change answers either (left padding is masked).
    assert generate_answers(model, tokenizer, prompts, batch_size=1, max_new_tokens=5) == plain


def test_score_counts_unlabeled_rows():
    result = score(["Yes", "no.", "maybe", "yes"], ["yes", "yes", "-", "Yes!"], labels=["no", "yes"])
    assert (result.correct, result.scored, result.unlabeled) == (2, 3, 1)
    assert result.accuracy == 2 / 3


@pytest.mark.parametrize(("arch", "kind"), [("llama", "StaticCache"), ("mistral", "DynamicCache")])
def test_batches_start_from_a_preallocated_prefix_cache_where_layers_allow(arch, kind):
    tokenizer = build_tiny_tokenizer(arch)
    model = build_tiny_model(arch, tokenizer).eval()
    prefix = torch.tensor([tokenizer("a shared prefix of several words " * 2)["input_ids"]])
    with torch.no_grad():
        prefix_cache = model(input_ids=prefix, use_cache=True).cache
    cache = batch_cache(model, prefix_cache, 3, prefix.size(1) + 9)
    assert type(cache).__name__ == kind  # mistral's sliding-window layers keep the dynamic cache
    for layer, original in zip(cache.layers, prefix_cache.layers, strict=True):
        assert int(layer.get_seq_length()) == prefix.size(1)
        for row in range(3):
            assert torch.equal(layer.keys[row, :, : prefix.size(1)], original.keys[0])
            assert torch.equal(layer.values[row, :, : prefix.size(1)], original.values[0])
    assert type(batch_cache(model, prefix_cache, 3, 20, static=False)).__name__ == "DynamicCache"
    prompts = [tokenizer("a shared prefix of several words " * 2 + "x " * i)["input_ids"] for i in range(5)]
    for static in (True, False):
        shared = generate_answers(model, tokenizer, prompts, 2, 6, static_prefix=static)
        assert shared == generate_answers(model, tokenizer, prompts, 2, 6, share_prefix=False)


def test_generation_with_the_preallocated_cache_never_compiles(monkeypatch):
    from transformers import CompileConfig

    model, tokenizer = diverse_model()
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append((kwargs["generation_config"], kwargs["cache"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prompts = [tokenizer("a shared prefix of several words " * 2 + "x " * i)["input_ids"] for i in range(3)]
    generate_answers(model, tokenizer, prompts, 4, 3)
    config, cache = calls[0]
    assert type(cache).__name__ == "StaticCache"
    config.compile_config = CompileConfig()
    config.compile_config._compile_all_devices = True  # what a GPU would allow
    assert not model._valid_auto_compile_criteria({"cache": cache}, config)
    config.disable_compile = False
    assert model._valid_auto_compile_criteria({"cache": cache}, config)  # without the flag it would compile
