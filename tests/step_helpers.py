"""Step-level checks of a method: an instance on the tiny model without a session, and random rows."""

import random

from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX
from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer


def bare_method(method_class, values):
    """A `method_class` instance for the config `values`, wrapping the tiny model; no session."""
    method = method_class(parse_config(values))
    tokenizer = build_tiny_tokenizer()
    model = method.prepare_model(build_tiny_llama(tokenizer), tokenizer)
    return method, model, tokenizer


def random_rows(count, seed, vocab=200, prompt=(3, 9), answer=(1, 5)):
    """`count` train rows of random ids: a prompt of 3-9 tokens (no labels), an answer of 1-5."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        p, a = rng.randint(*prompt), rng.randint(*answer)
        ids = [rng.randrange(vocab) for _ in range(p + a)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return rows


def label_count(batch):
    """The tokens a batch's loss averages over (labels past the first position that are not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
