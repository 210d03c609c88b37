"""The `peft` method's config keys: the seed's names and defaults, plus a few documented additions."""

from __future__ import annotations

from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option

PEFT_TYPES = ("PromptTuning", "LoRA")
CLASSIFIERS = ("Linear", "CosineLinear")
CLASSIFICATION_TYPES = ("sentence-level", "word-level")
IL_MODES = ("CIL", "TIL")
ROUTINGS = ("auto", "all", "hard", "soft")
POOLINGS = ("auto", "cls", "last", "mean")


def _none(value: str | None) -> str | None:
    """The seed writes the string 'None' for "no such thing"; YAML may give null."""
    return None if value is None or value.strip().lower() in ("none", "null", "") else value


def _choice(value: str | None, choices: tuple[str, ...], name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        options = [*choices, "None"] if allow_none else list(choices)
        raise ConfigError(f"expected one of {', '.join(options)}, got {value!r}", field=name)


@dataclass
class PEFTArguments:
    PEFT_type: str = option("PromptTuning", "The per-task adapter: 'PromptTuning' (soft prompt) or 'LoRA'.")
    Sub_PEFT_type: str | None = option(
        "NewLoRA",
        "'NewLoRA' (a task router trained next to the heads) or None (plain per-task heads). "
        "Only used with a classifier head.",
    )
    PEFT_lora_r: int = option(4, "LoRA rank of every task adapter.")
    PEFT_lora_alpha: int = option(8, "LoRA alpha (scaling = alpha / r).")
    PEFT_lora_bias: str = option("none", "Only 'none': trained biases would be shared by all task adapters.")
    PEFT_lora_dropout: float = option(0.1, "Dropout on the LoRA input, in [0, 1).")
    PEFT_num_virtual_tokens: int = option(10, "Soft-prompt length of every task's prompt-tuning adapter.")
    PEFT_prompt_tuning_init_text: str = option(
        "auto",
        "Initial soft prompt: 'auto' (the embeddings of the task's instruction, or of its name and "
        "labels when rows carry no instruction), 'random', or a literal text used for every task.",
    )
    classifier: str | None = option(
        None,
        "None: generative training (causal-LM loss on the answer). 'Linear' or 'CosineLinear': "
        "one classification head per task on the backbone's features.",
    )
    classification_type: str = option(
        "sentence-level",
        "'sentence-level' (one label per row) or 'word-level' (one BIO tag per word; "
        "needs `formatting: tagging` data and a classifier).",
    )
    il_mode: str = option(
        "CIL",
        "'CIL': the model must also infer the task (heads: every seen task's adapter and head over "
        "the global label space; generative: the current adapter). 'TIL': the evaluated task's adapter "
        "and head are used.",
    )
    newlora_routing: str = option(
        "auto",
        "CIL evaluation with NewLoRA: 'all' runs every seen task's adapter and head (T passes) and "
        "takes the highest logit; 'hard' lets the router pick one task per row (one feature pass plus one "
        "adapter pass); 'soft' weighs each head's log-softmax by the log of the router's weight for the row "
        "(T passes, as 'all'); 'auto': soft where it applies (NewLoRA, sentence-level heads, CIL; the best "
        "CIL mode measured in docs/results.md), else all. docs/methods/peft.md.",
    )
    pooling: str = option(
        "auto",
        "Sentence features for the heads and the router: 'cls' (first real token), 'last' "
        "(last real token), 'mean' (mean over real tokens), or 'auto': cls when the tokenizer has a "
        "CLS token (BERT-style encoders), else last (decoders).",
    )
    cosine_scale: float = option(
        16.0, "Initial value of CosineLinear's learnable scale s (logits = s * cosine)."
    )
    skip_nonfinite_loss: bool = option(
        False,
        "On a NaN/inf training loss: false stops the task with an error naming the task and step; "
        "true drops that micro-batch (zero gradient), counts it and reports the count.",
    )

    def __post_init__(self) -> None:
        self.Sub_PEFT_type = _none(self.Sub_PEFT_type)
        self.classifier = _none(self.classifier)
        _choice(self.PEFT_type, PEFT_TYPES, "PEFT_type")
        _choice(self.Sub_PEFT_type, ("NewLoRA",), "Sub_PEFT_type", allow_none=True)
        _choice(self.classifier, CLASSIFIERS, "classifier", allow_none=True)
        _choice(self.classification_type, CLASSIFICATION_TYPES, "classification_type")
        _choice(self.il_mode, IL_MODES, "il_mode")
        _choice(self.newlora_routing, ROUTINGS, "newlora_routing")
        if self.newlora_routing == "auto":
            self.newlora_routing = "soft" if self.soft_routing_applies else "all"
        _choice(self.pooling, POOLINGS, "pooling")
        if self.PEFT_lora_r < 1:
            raise ConfigError("must be at least 1", field="PEFT_lora_r")
        if self.PEFT_lora_alpha <= 0:
            raise ConfigError("must be positive", field="PEFT_lora_alpha")
        if self.PEFT_lora_bias != "none":
            raise ConfigError(
                "only 'none' is supported: a trained bias is shared by every task adapter, so training "
                "one task would change the others",
                field="PEFT_lora_bias",
            )
        if not 0.0 <= self.PEFT_lora_dropout < 1.0:
            raise ConfigError("must be in [0, 1)", field="PEFT_lora_dropout")
        if self.PEFT_num_virtual_tokens < 1:
            raise ConfigError("must be at least 1", field="PEFT_num_virtual_tokens")
        if not self.PEFT_prompt_tuning_init_text.strip():
            raise ConfigError(
                "must be 'auto', 'random' or a non-empty text", field="PEFT_prompt_tuning_init_text"
            )
        if not self.cosine_scale > 0:
            raise ConfigError("must be positive", field="cosine_scale")
        if self.classification_type == "word-level" and self.classifier is None:
            raise ConfigError(
                "word-level classification needs a classifier head (Linear or CosineLinear)",
                field="classification_type",
            )
        if self.newlora_routing in ("hard", "soft"):
            if self.classifier is None or self.Sub_PEFT_type != "NewLoRA":
                raise ConfigError(
                    f"{self.newlora_routing} routing needs the NewLoRA router: set a classifier and "
                    "Sub_PEFT_type: NewLoRA",
                    field="newlora_routing",
                )
            if self.newlora_routing == "soft" and self.classification_type == "word-level":
                raise ConfigError(
                    "soft routing weighs sentence-level heads; word-level heads share the O tag",
                    field="newlora_routing",
                )
            if self.il_mode != "CIL":
                raise ConfigError(
                    "routing applies to CIL evaluation; set il_mode: CIL", field="newlora_routing"
                )

    @property
    def soft_routing_applies(self) -> bool:
        return (
            self.classifier is not None
            and self.Sub_PEFT_type == "NewLoRA"
            and self.classification_type == "sentence-level"
            and self.il_mode == "CIL"
        )

    @property
    def uses_heads(self) -> bool:
        return self.classifier is not None

    @property
    def uses_router(self) -> bool:
        return self.classifier is not None and self.Sub_PEFT_type == "NewLoRA"

    @property
    def word_level(self) -> bool:
        return self.classification_type == "word-level"
