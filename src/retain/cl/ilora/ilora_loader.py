"""`load_ilora_model`: the generic loader (`retain.model.loader.load_model`) plus I-LoRA's adapters."""

from __future__ import annotations

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from retain.cl.ilora.ilora_adapter import hand_over, init_ilora_adapter, load_ilora_adapters
from retain.errors import ConfigError
from retain.hparams.args import CommonCLArguments, FinetuningArguments, ModelArguments
from retain.model.loader import load_model


def load_ilora_model(
    model_args: ModelArguments,
    finetuning_args: FinetuningArguments,
    cl_args: CommonCLArguments | None = None,
    ema_adapter_path: str | None = None,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer, then add the `default` and `ema` adapters.

    With `cl_args.previous_task_model` (a task directory `.../ilora_task{k}`), the model starts where
    task k+1 starts: `default` and `ema` both equal task k's EMA adapter (read from
    `ema_adapter_path` when given). The replay buffer is the method's state and is loaded by
    `ILORA.load_task`, not here.
    """
    model, tokenizer = load_model(model_args)
    peft_model = init_ilora_adapter(model, finetuning_args)
    previous = cl_args.previous_task_model if cl_args is not None else None
    if previous:
        load_ilora_adapters(peft_model, previous, ema_adapter_path)
        hand_over(peft_model)
    elif ema_adapter_path:
        raise ConfigError("needs previous_task_model", field="ema_adapter_path")
    return peft_model, tokenizer
