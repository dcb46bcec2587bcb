"""Recipe checks across keys: what cannot work together, what the task allows, and what this machine changes.

Each check names the key and where its value came from (the recipe file or the command line); a setting that can be
fixed without doubt is fixed and reported as a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.recipe.mixture import parse_mixture
from qlora_pipeline.recipe.task_settings import SETTINGS as TASK_SETTINGS
from qlora_pipeline.sizes import parse_size

# Attention backends on which packed examples stay isolated: transformers builds a block-diagonal causal mask
# from restarting position_ids (sdpa, eager, flex) or passes the boundaries to a varlen kernel (flash attention).
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def failer(origin: dict[str, str]):
    """fail(key, message): raise a RecipeError naming the key and where its value came from (file or command line)."""

    def fail(key: str, message: str):
        raise RecipeError(f"{origin.get(key, 'recipe')}: key '{key}': {message}")

    return fail


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_combinations(values: dict[str, Any], origin: dict[str, str]) -> list[str]:
    """Reject settings that cannot work together, naming the keys. Returns notes for fixable ones."""
    fail = failer(origin)
    notes: list[str] = []
    if not values.get("model_name_or_path"):
        fail("model_name_or_path", "is required")
    if values.get("dataset_mixture") is not None:
        if values.get("dataset_name"):
            fail("dataset_mixture", "and dataset_name are both set; give one (a mixture lists every source)")
        if values["task"] != "causal_lm":
            fail("dataset_mixture", f"mixes instruction rows for causal_lm, not task '{values['task']}'")
        parse_mixture(values["dataset_mixture"], values, fail)
    elif not values.get("dataset_name"):
        fail("dataset_name", "is required (or dataset_mixture: a list of sources)")
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        name = values.get(key)
        if name and _looks_like_a_path(name) and not Path(name).expanduser().exists():
            fail(key, f"'{name}' looks like a local folder, and there is none; give the model's folder or a Hub id")
    if values["fp16"] and values["bf16"]:
        fail("bf16", "fp16 and bf16 are both on; choose one")
    if values["load_in_4bit"] and values["load_in_8bit"]:
        fail("load_in_8bit", "load_in_4bit and load_in_8bit are both on; choose one")
    if values["load_in_4bit"] or values["load_in_8bit"]:
        key = "load_in_4bit" if values["load_in_4bit"] else "load_in_8bit"
        try:
            import importlib.util

            missing = importlib.util.find_spec("bitsandbytes") is None
        except ValueError:
            missing = True
        if missing:
            fail(key, "needs the bitsandbytes package, which is not installed (pip install bitsandbytes)")
        if not values["use_peft"]:
            fail(key, "quantized weights cannot be trained directly; set use_peft: true to train LoRA adapters on them")
    if values["learning_rate"] <= 0:
        fail("learning_rate", f"must be positive, got {values['learning_rate']}")
    if values["use_peft"]:
        if values["lora_r"] <= 0:
            fail("lora_r", f"must be a positive integer, got {values['lora_r']}")
        if values["lora_alpha"] <= 0:
            fail("lora_alpha", f"must be positive, got {values['lora_alpha']}")
        if not 0 <= values["lora_dropout"] < 1:
            fail("lora_dropout", f"must be in [0, 1), got {values['lora_dropout']}")
    if values["max_length"] is not None and values["max_length"] < 16:
        fail("max_length", f"must be at least 16 tokens, got {values['max_length']}")
    notes += _check_task(values, fail)
    if values["packing"]:
        if values["max_length"] is None:
            fail("packing", "needs max_length: packed rows are filled up to it")
        if values["packing_strategy"] == "wrapped":
            fail("packing_strategy", "'wrapped' cuts examples across rows so they attend to each other; use 'bfd'")
        attention = values["attn_implementation"] or "sdpa"
        if attention not in PACKING_SAFE_ATTENTION:
            values["packing"] = False
            notes.append(
                f"packing is off: attention '{attention}' cannot keep packed examples apart "
                f"(safe: {', '.join(PACKING_SAFE_ATTENTION)}); batches are padded instead"
            )
    if values["assistant_only_loss"]:
        fail("assistant_only_loss", "is not used here; completion_only_loss masks the prompt for every template")
    if values["push_to_hub"]:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if not values["hub_model_id"]:
            fail("push_to_hub", "needs hub_model_id: OWNER/NAME of the repo to publish the merged model to")
        try:
            validate_repo_id(values["hub_model_id"])
        except HFValidationError:
            fail("hub_model_id", f"{values['hub_model_id']!r} is not a valid repo id (OWNER/NAME)")
        if "/" not in values["hub_model_id"]:
            fail("hub_model_id", f"{values['hub_model_id']!r} needs an owner: OWNER/NAME")
    reporters = values["report_to"] or []
    reporters = [reporters] if isinstance(reporters, str) else list(reporters)
    for name in reporters:
        if name in ("none", "all"):
            continue
        from transformers.integrations import get_available_reporting_integrations

        if name not in get_available_reporting_integrations():
            fail("report_to", f"'{name}' is not installed here (pip install {name})")
    if values["merge_fidelity_prompts"] < 1:
        fail("merge_fidelity_prompts", f"must be at least 1, got {values['merge_fidelity_prompts']}")
    if values["merge_max_ppl_increase"] < 0:
        fail("merge_max_ppl_increase", f"must be 0 or more, got {values['merge_max_ppl_increase']}")
    if values["gguf_quant_types"]:
        from qlora_pipeline.errors import PipelineError
        from qlora_pipeline.gguf_types import parse_quant_types

        if values["task"] != "causal_lm":
            fail("gguf_quant_types", f"GGUF files are written for causal language models, not task '{values['task']}'")
        try:
            parse_quant_types(values["gguf_quant_types"])
        except PipelineError as exc:
            fail("gguf_quant_types", str(exc).split(": ", 1)[1])
    for key in ("gguf_max_ppl_increase", "gguf_quantized_max_ppl_increase"):
        if values[key] < 0:
            fail(key, f"must be 0 or more, got {values[key]}")
    for key in ("gguf_min_top1_agreement", "gguf_quantized_min_top1_agreement"):
        if not 0 <= values[key] <= 1:
            fail(key, f"must be a share between 0 and 1, got {values[key]}")
    size = values["eval_split_size"]
    if not (size == 0 or 0 < size < 1 or (size >= 1 and size == int(size))):
        fail("eval_split_size", f"must be 0, a share between 0 and 1, or a whole row count; got {size}")
    return notes


def _check_task(values: dict[str, Any], fail) -> list[str]:
    """The task's peft type and head go into the LoRA settings, so the saved recipe carries them; causal-LM-only
    settings on another task are refused; then the task's own checks."""
    name = values["task"]
    if name not in TASK_SETTINGS:
        fail("task", f"unknown task {name!r}; available: {', '.join(TASK_SETTINGS)}")
    task = TASK_SETTINGS[name]
    if name != "causal_lm":
        if values["packing"]:
            fail("packing", f"packs causal-LM examples; task '{name}' pads each batch to its longest example")
        if values["generation_metric"] != "none":
            fail("generation_metric", f"is a causal_lm setting; task '{name}' has its own metric")
        if values["metric_batch_size"] is not None:
            fail(
                "metric_batch_size",
                f"is for causal_lm generation metrics; task '{name}' batches by per_device_eval_batch_size",
            )
        if len(values["eval_file"] or []) > 1:
            fail("eval_file", f"takes one file for task '{name}'; several are for causal_lm")
    if values["use_peft"]:
        # TRL's default is CAUSAL_LM, so that value cannot tell a recipe's choice from the default.
        if values["lora_task_type"] not in ("CAUSAL_LM", task.peft_task_type):
            fail(
                "lora_task_type",
                f"task '{name}' trains {task.peft_task_type} adapters, not {values['lora_task_type']}",
            )
        values["lora_task_type"] = task.peft_task_type
        if not values["lora_modules_to_save"] and task.modules_to_save:
            values["lora_modules_to_save"] = list(task.modules_to_save)
    for key in ("doc_stride", "max_answer_length", "n_best_size", "max_target_length", "eval_max_new_tokens"):
        if values[key] < 1:
            fail(key, f"must be a positive integer, got {values[key]}")
    for key in ("metric_max_samples", "metric_batch_size"):
        if values[key] is not None and values[key] < 1:
            fail(key, f"must be a positive integer, got {values[key]}")
    return task.check(values, fail)


def settle_batch(
    values: dict[str, Any], auto: set[str], file_batch: int | None, file_keys: set[str], override_keys: set[str], fail
) -> None:
    """Settle effective_batch_size and the batch keys in `values`. `per_device_train_batch_size: auto` keeps
    effective_batch_size rows per optimizer step (default: the recipe file's batch x gradient_accumulation_steps,
    where the file gives a number and the command line asks for auto), which the planner splits at the start of
    training; with a batch number, gradient_accumulation_steps follows from effective_batch_size (both set differently
    in the same place is refused; the command line beats the file). Also checks memory_budget's form."""
    if values["memory_budget"] is not None:
        try:
            parse_size(values["memory_budget"], "memory_budget")
        except ValueError as exc:
            fail("memory_budget", str(exc).split(": ", 1)[1])
    if auto and values["task"] != "causal_lm":
        key = sorted(auto)[0]
        fail(key, f"auto is chosen by the memory planner, which models causal_lm recipes, not task '{values['task']}'")
    effective = values["effective_batch_size"]
    if effective is not None and effective < 1:
        fail("effective_batch_size", f"must be a positive integer, got {effective}")
    if "per_device_train_batch_size" in auto:
        if "gradient_accumulation_steps" in override_keys:
            fail("gradient_accumulation_steps", "follows from effective_batch_size when the batch is auto; drop it")
        effective = effective or file_batch
        if effective is None:
            fail(
                "per_device_train_batch_size",
                "auto needs effective_batch_size: the rows per optimizer step on each process, which the planner "
                "splits into per-device batch x gradient_accumulation_steps",
            )
        # Batch 1 x `effective` accumulation until the planner chooses; the planner reads the product.
        values["effective_batch_size"] = values["gradient_accumulation_steps"] = effective
        return
    if effective is None:
        return
    batch = values["per_device_train_batch_size"]
    if "gradient_accumulation_steps" in override_keys and "effective_batch_size" not in override_keys:
        # The command line's accumulation beats the file's effective batch.
        values["effective_batch_size"] = batch * values["gradient_accumulation_steps"]
        return
    steps, remainder = divmod(effective, batch)
    if remainder:
        fail("effective_batch_size", f"{effective} is not a multiple of per_device_train_batch_size {batch}")
    same_place = override_keys if "effective_batch_size" in override_keys else file_keys
    if "gradient_accumulation_steps" in same_place and values["gradient_accumulation_steps"] != steps:
        fail(
            "gradient_accumulation_steps",
            f"{values['gradient_accumulation_steps']} x per_device_train_batch_size {batch} is not "
            f"effective_batch_size {effective}; set one of them",
        )
    values["gradient_accumulation_steps"] = steps


def _looks_like_a_path(name: str) -> bool:
    """A local path rather than a Hub id (OWNER/NAME or NAME): it starts with /, ., ~ or has more than one slash."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def adapt_to_hardware(values: dict[str, Any]) -> list[str]:
    """Settings that depend on the machine the run lands on; each change is reported as a note."""
    import torch

    notes = []
    # The prompt tokens are masked from the pre-tokenized data's completion_mask only if TRL is told to use it.
    if values["completion_only_loss"] is None:
        values["completion_only_loss"] = True
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; recipes may use either name.
    renamed = "activation_checkpointing" in values
    kwargs_key = "activation_checkpointing_kwargs" if renamed else "gradient_checkpointing_kwargs"
    if renamed and values["activation_checkpointing"] is None:
        values["activation_checkpointing"] = values["gradient_checkpointing"]
    # Non-reentrant checkpointing works with DDP and frozen inputs; reentrant breaks both.
    kwargs = dict(values.get(kwargs_key) or values.get("gradient_checkpointing_kwargs") or {})
    kwargs.setdefault("use_reentrant", False)
    values[kwargs_key] = kwargs
    if renamed:  # the old names then mirror the new ones, without a deprecation warning
        values["gradient_checkpointing"] = values["gradient_checkpointing_kwargs"] = None
    values["include_num_input_tokens_seen"] = "non_padding"
    # No metric is computed from evaluation logits: evaluation asks for the loss only, which PipelineSFTTrainer
    # computes on the labelled positions (with logits wanted, TRL recomputes them for every position).
    values["prediction_loss_only"] = True

    if not torch.cuda.is_available():
        if values["fp16"] or values["bf16"]:
            notes.append("no CUDA GPU: fp16/bf16 mixed precision is off, training runs in float32 on the CPU")
        values["fp16"] = values["bf16"] = False
        # Without use_cpu, `accelerate launch --num_processes N` on a CPU box quietly trains N separate rank-0 copies
        # (launcher.adapt turns it off again under DeepSpeed, which runs CPU processes itself).
        values["use_cpu"] = True
        if values["dtype"] in ("float16", "bfloat16"):
            notes.append(f"no CUDA GPU: weights load in float32 rather than {values['dtype']}")
            values["dtype"] = "float32"
        if values["optim"] and "paged" in str(values["optim"]):
            notes.append(f"no CUDA GPU: '{values['optim']}' falls back to plain (non-paged) AdamW on the CPU")
    elif values["fp16"] and values["prefer_bf16"] and torch.cuda.is_bf16_supported():
        notes.append("this GPU supports bf16: training in bf16 instead of fp16 (same memory, no loss scaling)")
        values["fp16"], values["bf16"] = False, True
    return notes
