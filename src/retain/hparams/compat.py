"""LLaMA-Factory and EasyCL config keys: what `retain` does with each one that is not its own.

An EasyCL train config carries LLaMA-Factory's keys besides its method's. `translate` turns the
ones that have a `retain` meaning into `retain` keys (`dataset` -> `cl_tasks`, `warmup_ratio` ->
`warmup_steps`), drops the ones that do not apply with a one-line note, and rejects the ones that
ask for something `retain` cannot do. `EASYCL_METHODS` names EasyCL's methods and their keys, so a
config that asks for one `retain` does not have gets an error that says so.
"""

from __future__ import annotations

from typing import Any

from retain.errors import ConfigError
from retain.hparams.coerce import coerce_field

#: Keys accepted and not used, each with the note a run prints when it is set.
NOT_APPLIED: dict[str, str] = {
    "overwrite_cache": "not used: retain keeps no preprocessing cache (rows are encoded in memory each run)",
    "preprocessing_num_workers": "not used: rows are encoded in the main process",
    "overwrite_output_dir": "not used: retain resumes the run in output_dir; use another output_dir, or --force "
    "to continue it with a changed config",
    "val_size": "not used: retain holds out no validation rows during training; it evaluates every task's test "
    "split after each task",
    "save_only_model": "not used: checkpoints keep the optimizer state, so that a killed task resumes exactly",
    "resume_from_checkpoint": "not used: retain resumes from the newest complete checkpoint in output_dir by "
    "itself",
    "eval_strategy": "not used: retain evaluates every task after each task, not during training",
    "eval_steps": "not used: retain evaluates every task after each task, not during training",
}
#: Values of keys in NOT_APPLIED that mean "nothing asked for", so they pass without a note.
SILENT_VALUES: dict[str, tuple[Any, ...]] = {
    "overwrite_cache": (False,),
    "overwrite_output_dir": (False,),
    "val_size": (0, 0.0),
    "save_only_model": (False,),
    "resume_from_checkpoint": (None, False),
    "eval_strategy": ("no",),
}

#: EasyCL's methods: switch name -> (display name, its own keys). Those that `retain` registers are
#: ignored here; the others get a clear "not available" error.
EASYCL_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ewc": ("EWC", ("ewc_lambda", "ewc_num_samples")),
    "lwf": ("LwF", ("lwf_temperature", "lwf_alpha")),
    "olora": ("O-LoRA", ("orthogonal_lambda", "l2_lambda", "olora_history_path")),
    "gem": ("GEM", ("gem_memory_strength",)),
    "lamol": (
        "LAMOL",
        ("lamol_num_samples_per_task", "lamol_generation_temperature", "lamol_show_gen", "lamol_samples_dir"),
    ),
    "pseudo_replay": (
        "pseudo-replay",
        (
            "base_model_path",
            "num_samples_per_task",
            "generation_temperature",
            "num_shots",
            "pseudo_samples_dir",
        ),
    ),
    "ssr": (
        "SSR",
        (
            "base_model_path",
            "num_shots",
            "generation_temperature",
            "n_clusters",
            "pseudo_sample_memory",
            "pseudo_samples_dir",
        ),
    ),
    "moe": ("MoE-LoRA", ("expert_num", "task_embedding_dim")),
    "cl_moe": ("CL-MoE", ("top_k_experts",)),
    "abscl": ("ABSCL", ("abscl_orthogonal_lambda", "abscl_shared_l2_lambda", "adapters_save_path")),
    "dynamic_conpet": ("Dynamic ConPet", ("classification_loss_weight",)),
}


def unavailable_method(name: str, registered: set[str]) -> str | None:
    """EasyCL's display name of `name` when it is an EasyCL method `retain` does not have."""
    if name in registered or name not in EASYCL_METHODS:
        return None
    return EASYCL_METHODS[name][0]


def unavailable_key_owners(key: str, registered: set[str]) -> list[str]:
    """Display names of the unavailable EasyCL methods that `key` belongs to."""
    return [
        display for name, (display, keys) in EASYCL_METHODS.items() if key in keys and name not in registered
    ]


def translate(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """LLaMA-Factory keys -> retain keys, plus the notes to print. Raises for what cannot run."""
    values = dict(values)
    notes: list[str] = []
    stage = values.pop("stage", "sft")
    if stage != "sft":
        raise ConfigError(
            f"only 'sft' (supervised fine-tuning) is supported, got {stage!r}", source=source, field="stage"
        )
    if values.get("do_train") is False:
        notes.append(
            "'do_train': false is not used: `retain run` and `retain train` train; `retain eval` only evaluates"
        )
    values.pop("do_train", None)
    if "dataset" in values:
        dataset = values.pop("dataset")
        if values.get("cl_tasks") not in (None, dataset):
            raise ConfigError(
                "'dataset' (the task sequence, as EasyCL reads it) and 'cl_tasks' differ; give one",
                source=source,
                field="dataset",
            )
        values["cl_tasks"] = dataset
    if "warmup_ratio" in values:
        ratio = values.pop("warmup_ratio")
        if values.get("warmup_steps") not in (None, 0):
            raise ConfigError(
                "give warmup_ratio or warmup_steps, not both", source=source, field="warmup_ratio"
            )
        ratio = coerce_field(ratio, float, "warmup_ratio", source)
        if not 0 <= ratio < 1:  # 1 or more would be read as a number of steps
            raise ConfigError(
                f"is a share of each task's steps: must be in [0, 1), got {ratio}",
                source=source,
                field="warmup_ratio",
            )
        values["warmup_steps"] = ratio  # transformers reads a float in [0, 1) as a share of the steps
    for key, note in NOT_APPLIED.items():
        if key in values:
            value = values.pop(key)
            if value not in SILENT_VALUES.get(key, ()):
                notes.append(f"'{key}': {note}")
    if values.get("trust_remote_code"):
        notes.append(
            "'trust_remote_code': accepted, but retain never runs code shipped with a model; the model must be "
            "one that transformers supports"
        )
    return values, notes
