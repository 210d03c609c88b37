"""Configuration dataclasses. Every field carries help text; `retain run --help-config` prints them."""

from __future__ import annotations

from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class ModelArguments:
    model_name_or_path: str = option(
        "",
        "A local HF model directory, a .gguf file, an offline alias "
        "(tiny-random-llama, smollm2-135m-instruct, all-minilm-l6-v2), or a hub id.",
    )
    trust_remote_code: bool = option(
        False,
        "Accepted for LLaMA-Factory configs, but retain never runs code shipped with a model: "
        "the model must be one that transformers supports.",
    )
    model_cache_dir: str | None = option(
        None, "Where offline aliases are converted and cached (default: $RETAIN_CACHE or ~/.cache/retain)."
    )
    torch_dtype: str = option(
        "auto",
        "dtype of the base weights: auto (the checkpoint's dtype on a GPU, float32 on a CPU), float32, "
        "bfloat16 or float16. LoRA weights and methods' state stay float32 (docs/models.md).",
    )
    device_map: str | None = option(
        None,
        "transformers' device_map for one process (auto, cpu, cuda:0, ...): spread or place the base "
        "model. None: the training device. Not with several processes.",
    )
    flash_attn: str = option(
        "auto",
        "Attention kernel (LLaMA-Factory's key): auto (transformers' choice), disabled (eager), sdpa, "
        "or fa2 (flash_attention_2, needs the flash-attn package and a GPU).",
    )
    quantization_bit: int | None = option(
        None, "Load the base weights in 4 or 8 bits (QLoRA through bitsandbytes). None: no quantization."
    )
    quantization_method: str = option("bitsandbytes", "Only 'bitsandbytes' (LLaMA-Factory's key).")
    quantization_type: str = option("nf4", "4-bit data type: nf4 (QLoRA's) or fp4.")
    double_quantization: bool = option(
        True, "4-bit: also quantize the quantization constants (QLoRA's double quantization)."
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError("is required", field="model_name_or_path")
        choices = {
            "torch_dtype": ("auto", "float32", "bfloat16", "float16"),
            "flash_attn": tuple(ATTENTION),
            "quantization_method": ("bitsandbytes",),
            "quantization_type": ("nf4", "fp4"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"expected one of {', '.join(allowed)}, got {getattr(self, key)!r}", field=key
                )
        if self.quantization_bit not in (None, 4, 8):
            raise ConfigError(
                f"expected 4 or 8 (or null), got {self.quantization_bit}", field="quantization_bit"
            )


#: `flash_attn` values -> transformers' attn_implementation (None: transformers chooses).
ATTENTION = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}


#: Template names with a meaning of their own (retain.data.templates); any other name is read as 'auto'.
TEMPLATE_NAMES = (
    "auto",
    "plain",
    "alpaca",
    "default",
    "empty",
    "llama3",
    "qwen",
    "chatml",
    "mistral",
    "gemma",
)


@dataclass
class DataArguments:
    cl_tasks: list[str] | None = option(
        None, "Comma-separated task names, in training order, from dataset_dir."
    )
    dataset_dir: str = option("data", "Folder holding dataset_info.json and the data files.")
    benchmark: str | None = option(None, "Benchmark name in benchmark_info.json (instead of cl_tasks).")
    benchmark_order: str | None = option(None, "Named task order of the benchmark.")
    benchmark_dir: str | None = option(
        None,
        "Folder holding benchmark_info.json and dataset_info.json. Default: the copy shipped with "
        "retain for the benchmarks it ships (LNT; see `retain benchmarks`), else dataset_dir.",
    )
    template: str = option(
        "auto",
        "Prompt format by LLaMA-Factory's template names: 'auto' (the tokenizer's chat template, else "
        "plain), a chat family (llama3, qwen, chatml, mistral, gemma: the tokenizer's own template when it is of "
        "that family, else retain's), or a text format (plain = alpaca, default, empty). Other names: auto.",
    )
    eval_split: str = option(
        "test",
        "The split every matrix entry is scored on: 'test' (entries <task>_test) or 'dev' (<task>_dev; "
        "the shipped benchmarks cut it from the train rows). Tune hyperparameters on dev, report test.",
    )
    cutoff_len: int = option(1024, "Maximum tokens per training row (prompt + answer).")
    max_samples: int | None = option(None, "Train rows per task (first N). None: all.")
    eval_max_samples: int | None = option(None, "Test rows per task (first N). None: all.")

    def __post_init__(self) -> None:
        if self.eval_split not in ("test", "dev"):
            raise ConfigError(f"expected 'test' or 'dev', got {self.eval_split!r}", field="eval_split")
        if self.cutoff_len < 2:
            raise ConfigError("must be at least 2", field="cutoff_len")
        for name in ("max_samples", "eval_max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError("must be a positive integer or null", field=f"{name}")
        if self.cl_tasks and self.benchmark:
            raise ConfigError("give either cl_tasks or benchmark, not both", field="cl_tasks")
        if not self.cl_tasks and not self.benchmark:
            raise ConfigError(
                "no tasks: set cl_tasks (with dataset_dir) or benchmark + benchmark_order", field="cl_tasks"
            )
        if self.benchmark and not self.benchmark_order:
            raise ConfigError("is required with benchmark", field="benchmark_order")
        if self.benchmark_order and not self.benchmark:
            raise ConfigError("is required with benchmark_order", field="benchmark")


@dataclass
class FinetuningArguments:
    finetuning_type: str = option("lora", "Adapter type. Only 'lora' is supported.")
    lora_rank: int = option(8, "LoRA rank r.")
    lora_alpha: float | None = option(None, "LoRA alpha. None: 2 * lora_rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.")
    lora_target: str = option(
        "all", "Comma-separated module names to adapt, or 'all' for every linear layer but the head."
    )

    def __post_init__(self) -> None:
        if self.finetuning_type != "lora":
            raise ConfigError("only 'lora' is supported", field="finetuning_type")
        if self.lora_rank < 1:
            raise ConfigError("must be at least 1", field="lora_rank")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.lora_alpha <= 0:
            raise ConfigError("must be positive", field="lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("must be in [0, 1)", field="lora_dropout")


@dataclass
class GeneratingArguments:
    max_new_tokens: int | None = option(
        None, "Tokens generated per test row. None: the longest answer of the task's train split plus 2."
    )

    eval_prefix_cache: bool = option(
        True,
        "Run the prompt prefix shared by a task's test rows (system prompt, instruction) once and "
        "reuse its KV cache for every batch. Predictions are the same; prefill work drops.",
    )

    eval_mode: str = option(
        "generate",
        "How a classification task (one with a label_list) is scored: 'generate' (greedy answers, "
        "exact match), 'choice' (the label whose tokens are most likely after the prompt: does the model "
        "still know, whatever format it would write), or 'both' (generate for the matrix, plus choice's "
        "accuracy and the two modes' agreement as extra matrices). Tasks without labels are generated.",
    )
    choice_normalization: str = option(
        "sum", "choice: rank labels by the 'sum' of their tokens' log-likelihoods, or the per-token 'mean'."
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError("must be at least 1", field="max_new_tokens")
        if self.eval_mode not in ("generate", "choice", "both"):
            raise ConfigError(f"expected generate, choice or both, got {self.eval_mode!r}", field="eval_mode")
        if self.choice_normalization not in ("sum", "mean"):
            raise ConfigError(
                f"expected sum or mean, got {self.choice_normalization!r}", field="choice_normalization"
            )


@dataclass
class CLArguments:
    """Arguments shared by every continual-learning method."""

    cl_method: str = option(
        "seq", "The method (see `retain methods`). EasyCL's switch `use_<method>: true` says the same."
    )
    eval_scope: str = option(
        "all",
        "'all': after each task, evaluate every task. 'seen': only tasks seen so far and the next "
        "one (enough for every metric: Last, Avg, LA, BWT, FWT, forgetting).",
    )
    eval_base: bool = option(True, "Evaluate the base model first (row 0, needed for FWT).")
    eval_base_cache: bool = option(
        True,
        "Reuse the base model's row 0 across runs: each entry is cached under $RETAIN_CACHE/eval/, "
        "keyed by the base weights, the test rows, the prompt format and the generation settings, and "
        "only for methods whose base evaluation is the plain one. false: always generate it.",
    )
    plot_loss: bool = option(
        False,
        "Write loss_curve.png (every task's training loss over the steps of the sequence) after each "
        "task. LLaMA-Factory's key.",
    )
    previous_task_model: str | None = option(
        None, "A task directory saved by an earlier run; the first task here starts from it."
    )
    current_task_id: int | None = option(
        None, "1-based id of the first task trained here (filled in by the runner)."
    )
    prev_task_id: int | None = option(
        None, "1-based id of the task that previous_task_model holds (filled in)."
    )

    def __post_init__(self) -> None:
        if self.eval_scope not in ("all", "seen"):
            raise ConfigError("expected 'all' or 'seen'", field="eval_scope")
        for name in ("current_task_id", "prev_task_id"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError("must be a positive integer", field=f"{name}")


# Alias used by the I-LoRA seed.
CommonCLArguments = CLArguments
