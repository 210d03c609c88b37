import torch

from retain.eval.predict import common_prefix_length, generate_answers, score
from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer


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
