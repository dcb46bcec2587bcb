"""Merge: a trained LoRA adapter → a standalone model that plain `transformers` loads, checked against training.

Steps (`qlora-pipeline merge RUN_DIR`), the same for every task; the task supplies its fidelity probe
(tasks/fidelity.py) and the settings its export needs:
  1. Read the run's recipe; refuse an impossible request before loading anything.
  2. Reference pass: the model as trained (4-bit base + adapter) through the task's probe: for a causal LM, logits,
     perplexity of the reference answers and greedy generations on held-out examples (plus its generation metric);
     for the other tasks, the task's metric on the held-out rows.
  3. Merge into unquantized weights, never into 4-bit ones (rounding the merged weights back to NF4 would lose
     most of what the adapter learned). `nf4-roundtrip` merges into the NF4-dequantized base the adapter was
     trained against, so the export computes what training saw; `original` merges into the 16-bit weights.
  4. Save to a hidden temporary folder: sharded safetensors and the tokenizer (a causal LM's with the training chat
     template and a generation config that stops at the template's end token).
  5. Reload the saved export with plain transformers and repeat the pass; compare. Drift over the recipe's
     thresholds fails the merge.
  6. Write fidelity.json and the model card, then rename the folder into place: an interrupted merge never leaves
     a folder that looks complete.

Memory: the reference model and the merged model are never loaded together; the peak is one copy of the base in
the merge dtype plus the LoRA weights (printed before loading).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.model import loading
from qlora_pipeline.model.adapters import TrainedAdapter, attach_adapter, check_adapter_base, locate
from qlora_pipeline.outputs.staging import staged_folder
from qlora_pipeline.recipe import Recipe, load_recipe
from qlora_pipeline.tasks import get_task, prepare_data

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
BYTES_PER_PARAM = {"fp16": 2, "bf16": 2, "fp32": 4}


def merge(
    path: str | os.PathLike, overrides: list[str] | None = None, out: str | None = None, overwrite: bool = False
) -> dict:
    """Merge the adapter of a run into its base model and export it. Returns the fidelity report."""
    import torch
    import transformers

    # 1. What to merge, where to, and whether it can work, before anything loads.
    source = locate(path)
    recipe = load_recipe(source.recipe_path, overrides)
    check_adapter_base(source.adapter_dir, recipe)
    base_mode = choose_base_mode(recipe, overrides)
    export_dir = export_folder(source, recipe, out)
    if export_dir.exists() and not overwrite:
        raise PipelineError(f"{export_dir}: the export folder already exists; pass --overwrite to replace it")
    config = base_config(recipe)
    dtype_name = merge_dtype_name(recipe, config)
    dtype = getattr(torch, DTYPES[dtype_name])
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    quantized = bool(recipe.model.load_in_4bit or recipe.model.load_in_8bit)

    # 2. Held-out rows, tokenized exactly as the trainer tokenized them, and the task's probe on them.
    task = get_task(recipe.task.task)
    prepared = prepare_data(recipe)
    probe = task.fidelity_probe(recipe, prepared)
    print_memory_plan(config, dtype_name, quantized)

    # 3. Reference pass: the model as trained.
    print(f"[1/4] reference: {'4-bit base' if quantized else 'base'} + adapter, {probe.describe()}")
    reference = probe.measure(task.load_trained(recipe, prepared, source.adapter_dir), "reference")
    free_memory()

    with staged_folder(export_dir, "merge") as staging:
        # 4. Merge, and save into a temporary folder beside the target.
        print(f"[2/4] merge: adapter into the {base_mode} base weights in {dtype_name}")
        merged = merged_model(task, recipe, prepared, source.adapter_dir, base_mode, dtype_name)
        task.prepare_export(merged, prepared)
        print(f"[3/4] save: {export_dir} (safetensors shards of at most {recipe.export.merge_max_shard_size})")
        merged.save_pretrained(staging, max_shard_size=recipe.export.merge_max_shard_size)
        prepared.tokenizer.save_pretrained(staging)
        del merged
        free_memory()

        # 5. The saved export, reloaded as a user would, against the reference.
        print("[4/4] check: the saved export, reloaded with plain transformers, against the reference")
        exported = getattr(transformers, task.auto_class).from_pretrained(staging, dtype=dtype, device_map={"": device})
        candidate = probe.measure(exported, "export")
        del exported
        free_memory()
        report = {"base_mode": base_mode, "dtype": dtype_name, **probe.compare(reference, candidate)}
        probe.print(report)
        if not report["passed"]:
            failed_report = export_dir.parent / f"{export_dir.name}.fidelity-failed.json"
            failed_report.write_text(json.dumps(report, indent=2))
            raise PipelineError(
                f"merge: fidelity check failed ({report['failure']}); nothing exported, report in {failed_report}"
            )

        # 6. Report and card, then the rename that makes the export visible.
        (staging / "fidelity.json").write_text(json.dumps(report, indent=2))
        from qlora_pipeline.outputs.card import build_card

        card = build_card(
            "merged", recipe, read_summary(source), report if probe.in_card else None, recipe.training.hub_model_id
        )
        card.save(staging / "README.md")
    print(f"\nexported: {export_dir}")
    report["export_dir"] = str(export_dir)
    from qlora_pipeline.outputs import tracking

    where = tracking.log_fidelity(recipe, source.run_dir, report)
    if where:
        print(f"W&B: fidelity figures logged to the training's run ({tracking.describe(where)})")
    return report


def export_folder(source: TrainedAdapter, recipe: Recipe, out: str | None) -> Path:
    """Where the export goes: --out, else the recipe's merge_output_dir, else merged/ in the run folder."""
    return Path(out or recipe.export.merge_output_dir or (source.run_dir or source.adapter_dir.parent) / "merged")


def choose_base_mode(recipe: Recipe, overrides: list[str] | None) -> str:
    """nf4-roundtrip or original: the recipe's merge_base_mode, where it can apply to how the adapter was trained."""
    quantized = bool(recipe.model.load_in_4bit or recipe.model.load_in_8bit)
    base_mode = recipe.export.merge_base_mode
    if base_mode == "nf4-roundtrip" and not quantized:
        if "--merge_base_mode" in (overrides or []):
            raise PipelineError(
                "merge: --base-mode nf4-roundtrip needs an adapter trained on a 4-bit base; this one was trained "
                "on unquantized weights, so merge with --base-mode original"
            )
        return "original"  # nothing was quantized: the original weights are what training saw
    if base_mode == "nf4-roundtrip" and recipe.model.load_in_8bit:
        raise PipelineError("merge: nf4-roundtrip is for 4-bit adapters; this adapter was trained on 8-bit weights")
    return base_mode


def merged_model(task, recipe: Recipe, prepared, adapter_dir: Path, base_mode: str, dtype_name: str):
    """The adapter merged into unquantized base weights, in the merge dtype, in eval mode."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    if base_mode == "nf4-roundtrip":
        # Quantize with the training settings and dtype, then dequantize: bit for bit the weights training saw.
        base = task.load_trained_base(recipe, prepared).dequantize(dtype=dtype)
    else:  # the published weights, loaded in the merge dtype
        original = dataclasses.replace(recipe.model, load_in_4bit=False, load_in_8bit=False, dtype=DTYPES[dtype_name])
        base = task.load_trained_base(recipe, prepared, original)
    model = attach_adapter(base.to(dtype), adapter_dir, recipe)
    merged = model.merge_and_unload(safe_merge=True, progressbar=True)  # safe_merge: refuses NaN/inf weights
    return merged.to(dtype).eval()


def base_config(recipe: Recipe):
    """The base model's config (no weights), or None if it cannot be read here."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            loading.resolve_model_path(recipe.model.model_name_or_path),
            revision=recipe.model.model_revision,
            trust_remote_code=recipe.training.trust_remote_code,
        )
    except Exception:  # noqa: BLE001 -- only the defaults and the memory estimate need it
        return None


def merge_dtype_name(recipe: Recipe, config) -> str:
    """fp16 / bf16 / fp32: the recipe's choice, or for 'auto' the dtype the base model was published in."""
    choice = recipe.export.merge_dtype
    if choice != "auto":
        return choice
    published = str(getattr(config, "dtype", None) or "").replace("torch.", "")
    return {v: k for k, v in DTYPES.items()}.get(published, "fp16")


def print_memory_plan(config, dtype_name: str, quantized: bool) -> None:
    """What the merge will hold at its peak, from the config alone (no weights are loaded)."""
    if config is None:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            parameters = AutoModelForCausalLM.from_config(config).num_parameters()
    except Exception:  # noqa: BLE001 -- an estimate only
        return
    merged_gib = parameters * BYTES_PER_PARAM[dtype_name] / 2**30
    reference = " (the 4-bit reference pass needs about a third of that, and runs first)" if quantized else ""
    print(
        f"memory: about {merged_gib:.2f} GiB at the peak: one copy of the {parameters / 1e6:,.1f} M-parameter base "
        f"in {dtype_name}; the reference model and the merged model are never loaded together{reference}"
    )


def read_summary(source: TrainedAdapter) -> dict | None:
    path = source.run_dir / "summary.json" if source.run_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
