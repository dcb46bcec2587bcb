"""Adapters: find a trained adapter and its recipe, check it belongs to the recipe's base, and attach it to a model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.model import loading
from qlora_pipeline.recipe import Recipe


@dataclass
class TrainedAdapter:
    """Where a trained adapter is, the run folder around it, and the recipe it was trained from."""

    adapter_dir: Path
    run_dir: Path | None  # the run folder, when the adapter sits in one (recipe.yaml, summary.json)
    recipe_path: Path


def locate(path: str | os.PathLike) -> TrainedAdapter:
    """A run folder (holding adapter/) or an adapter folder; the recipe is recipe.yaml beside the adapter."""
    given = Path(path)
    if not given.exists():
        raise PipelineError(f"{given}: no such run or adapter folder")
    if (given / "adapter" / "adapter_config.json").is_file():
        adapter_dir, run_dir = given / "adapter", given
    elif (given / "adapter_config.json").is_file():
        adapter_dir = given
        run_dir = given.parent if (given.parent / "recipe.yaml").is_file() else None
    else:
        raise PipelineError(
            f"{given}: neither a run folder (with adapter/) nor an adapter folder (with adapter_config.json)"
        )
    for candidate in (adapter_dir / "recipe.yaml", run_dir / "recipe.yaml" if run_dir else None):
        if candidate is not None and candidate.is_file():
            return TrainedAdapter(adapter_dir, run_dir, candidate)
    raise PipelineError(f"{adapter_dir}: no recipe.yaml beside the adapter; pass the run folder that training wrote")


def saved_merge_output_dir(run: Path) -> Path | None:
    """The merge_output_dir that the run's saved recipe.yaml names, or None (none named, or no readable recipe)."""
    import yaml

    try:
        saved = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    configured = saved.get("merge_output_dir") if isinstance(saved, dict) else None
    return Path(configured) if isinstance(configured, str) and configured else None


def load_trained_model(recipe: Recipe, adapter_dir: Path, tokenizer, device: str):
    """The causal LM exactly as training ran it, for inference from a saved adapter (`generate`, `chat`): the base
    quantized with the same settings, plus the adapter. `tokenizer` is the one saved with the adapter (its length
    sizes the embeddings). The stages that hold the recipe's prepared data use `Task.load_trained` instead."""
    check_adapter_base(adapter_dir, recipe)
    quantization = loading.quantization_config(recipe.model, recipe.training)
    base, _ = loading.load_base_model(
        recipe.model,
        recipe.training,
        tokenizer,
        quantization=quantization,
        dtype=loading.training_dtype(recipe.model),
        device_map={"": device},
    )
    if quantization is not None:
        # Training ran with this: it keeps norms and embeddings in float32 beside the 4-bit layers.
        base = loading.prepare_for_kbit_training(base, use_gradient_checkpointing=False)
    return attach_adapter(base, adapter_dir, recipe).eval()


def check_adapter_base(adapter_dir: Path, recipe: Recipe) -> None:
    """Refuse, before any weights load, an adapter whose adapter_config.json names another base than the recipe."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
        trained_on = config.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return  # PEFT names what is wrong with the file when it reads it
    if not trained_on:
        return
    name = recipe.model.model_name_or_path
    resolved, expected = loading.resolve_model_path(str(trained_on)), loading.resolve_model_path(name)
    a, b = Path(resolved).expanduser(), Path(expected).expanduser()
    same = (
        resolved == expected
        or (a.exists() and b.exists() and a.resolve() == b.resolve())
        # a local model folder that moved (a rebuilt cache, another disk) keeps its name
        or (a.is_absolute() and b.is_absolute() and a.name == b.name)
    )
    if not same:
        raise PipelineError(
            f"{adapter_dir}: the adapter was trained on '{trained_on}' (adapter_config.json base_model_name_or_path)"
            f", not on '{name}' that {recipe.source} loads; set model_name_or_path to the base it was trained on"
        )


def attach_adapter(base, adapter_dir: Path, recipe: Recipe):
    """PeftModel.from_pretrained, with a size mismatch (an adapter trained on another base) as one line."""
    from peft import PeftModel

    try:
        with loading.quiet_peft_deprecations():
            return PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as exc:
        mismatch = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if not mismatch:
            raise
        raise PipelineError(
            f"{adapter_dir}: the adapter does not fit the base model '{recipe.model.model_name_or_path}', so it was "
            f"trained on another one ({mismatch[0].rstrip('.')})"
        ) from None
