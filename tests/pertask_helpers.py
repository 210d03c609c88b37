"""Shared pieces of the `peft` method's tests: a tiny random BERT built in code, and configs."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast


def build_tiny_bert(directory: Path) -> Path:
    """A 2-layer random BertModel and a character WordPiece tokenizer ([CLS] ... [SEP]), saved as an HF dir."""
    if (directory / "config.json").is_file():
        return directory
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + ".,:;!?-'")
    vocab = {token: i for i, token in enumerate(specials + chars + ["##" + c for c in chars])}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def peft_values(tmp_path: Path, data_dir: Path, **overrides) -> dict:
    """A 2-task `peft` config on the tiny Llama; tests override what they need."""
    values = {
        "model_name_or_path": "tiny-random-llama",
        "dataset_dir": str(data_dir),
        "cl_tasks": "task0,task1",
        "cl_method": "peft",
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "num_train_epochs": 1,
        "max_samples": 8,
        "eval_max_samples": 4,
        "max_new_tokens": 3,
        "cutoff_len": 64,
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "disable_tqdm": True,
    }
    values.update(overrides)
    return values


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run far faster on one intra-op thread on these shared 2-core machines (no spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
