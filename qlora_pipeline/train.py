"""Train: recipe → data → model → SFTTrainer → run folder.

A run folder holds:
  adapter/            the LoRA adapter (safetensors), the tokenizer it was trained with, its model card
  checkpoint-N/       the trainer's checkpoints (for --resume)
  recipe.yaml         the fully resolved recipe (no credentials), reloadable as a recipe
  metrics.jsonl       every log line of the trainer, one JSON object per line
  summary.json        the end-of-run summary that is also printed
  merged/             the merged export, once `qlora-pipeline merge` (or push_to_hub: true) has run
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from qlora_pipeline import data as data_mod
from qlora_pipeline import modeling, tracking
from qlora_pipeline.config import Recipe
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.templates import get_template


@dataclass
class PreparedData:
    tokenizer: object
    template: object
    train: data_mod.TokenizedSplit
    eval: data_mod.TokenizedSplit | None
    notes: list[str]


def prepare_data(recipe: Recipe) -> PreparedData:
    """Tokenizer and tokenized train/eval splits, without loading the model."""
    from accelerate import PartialState

    template = get_template(recipe.data.template)
    tokenizer, notes = modeling.load_tokenizer(recipe.model, recipe.training, template)
    max_length = recipe.training.max_length
    # The main process tokenizes and fills the datasets cache; the others then read it.
    with PartialState().main_process_first():
        train_rows = data_mod.load_rows(recipe.data.dataset_name, recipe.data)
        eval_rows = data_mod.load_rows(recipe.data.eval_file, recipe.data) if recipe.data.eval_file else None
        train_set, eval_set = data_mod.split_train_eval(train_rows, recipe.data, recipe.training.seed, eval_rows)
        train = data_mod.tokenize(train_set, tokenizer, template, recipe.data, max_length, "train")
        evaluation = (
            data_mod.tokenize(eval_set, tokenizer, template, recipe.data, max_length, "eval") if eval_set else None
        )
    for split in filter(None, (train, evaluation)):
        if len(split.dataset) == 0:
            raise PipelineError(
                f"{recipe.data.dataset_name}: every example is longer than max_length {max_length} "
                f"({split.overlong} of {split.rows_in}); raise max_length or set overlong: truncate"
            )
    return PreparedData(tokenizer, template, train, evaluation, notes)


class MetricsFile(TrainerCallback):
    """Appends every trainer log (loss, learning rate, grad norm, eval loss…) to metrics.jsonl on the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def build_trainer(recipe: Recipe, prepared: PreparedData, callbacks=None):
    """The base model (quantized as the recipe says), its LoRA adapter and the SFTTrainer. Returns (trainer, notes)."""
    from trl import SFTTrainer

    model, notes = modeling.load_model(recipe.model, recipe.training, prepared.tokenizer, prepared.template)
    if recipe.model.use_peft:
        model = modeling.add_lora(model, recipe.model)
    trainer = SFTTrainer(
        model=model,
        args=recipe.training,
        train_dataset=prepared.train.dataset.remove_columns(["n_tokens"]),
        eval_dataset=prepared.eval.dataset.remove_columns(["n_tokens"]) if prepared.eval else None,
        processing_class=prepared.tokenizer,
        callbacks=callbacks,
    )
    return trainer, notes


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from, or None. Refuses to train over an existing run unless told how."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume:
        if last is None:
            raise PipelineError(f"{output_dir}: --resume given but there is no checkpoint-N folder to resume from")
        return last
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    if occupied and not overwrite:
        raise PipelineError(
            f"{output_dir}: the output folder already holds a run; "
            "pass --resume to continue it or --overwrite to replace it"
        )
    return None


def final_eval(trainer) -> dict:
    """The eval at the last step: the trainer's own if its eval schedule just ran one, else a new one."""
    state = trainer.state
    for record in reversed(state.log_history):
        if "eval_loss" in record and record.get("step") == state.global_step:
            return record
    return trainer.evaluate()


def non_padding_fraction(trainer, max_batches: int = 32) -> float | None:
    """Share of real tokens in the training batches, from the first batches in dataset order (no RNG used).

    Packed rows are padding-free (1.0); padded batches show what padding to the longest example costs."""
    dataset, collate = trainer.train_dataset, trainer.data_collator
    size = trainer.args.per_device_train_batch_size
    real = total = 0
    for start in range(0, min(len(dataset), size * max_batches), size):
        batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        total += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return round(real / total, 4) if total else None


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the recipe end to end and write the run folder. Returns the summary."""
    from accelerate import PartialState

    started = time.time()
    state = PartialState()
    args = recipe.training
    run_dir = Path(args.output_dir)

    # 1. Output folder: resume, replace, or refuse.
    checkpoint = check_output_dir(run_dir, resume, overwrite)
    state.wait_for_everyone()
    if overwrite and not resume and state.is_main_process and run_dir.exists():
        shutil.rmtree(run_dir)
    state.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)

    # 2. Data: checked and tokenized before the model loads.
    prepared = prepare_data(recipe)
    notes = recipe.notes + prepared.notes
    if state.is_main_process:
        for note in notes:
            print(f"note: {note}")
        recipe.save(run_dir / "recipe.yaml")

    # 3-4. Model (quantized base + LoRA) and trainer.
    trainer, model_notes = build_trainer(recipe, prepared, callbacks=[MetricsFile(run_dir / "metrics.jsonl")])
    notes += model_notes
    if state.is_main_process:
        for note in model_notes:
            print(f"note: {note}")
        effective = args.per_device_train_batch_size * state.num_processes * args.gradient_accumulation_steps
        print(
            f"batch: {args.per_device_train_batch_size} per device x {state.num_processes} processes x "
            f"{args.gradient_accumulation_steps} accumulation = {effective} packed rows per optimizer step"
            if args.packing
            else f"batch: {args.per_device_train_batch_size} x {state.num_processes} x "
            f"{args.gradient_accumulation_steps} = {effective} examples per optimizer step"
        )

    # 5. Tracking: the W&B run (offline without a key), started before the first evaluation logs into it.
    data_summary = {"train": prepared.train.stats(), "eval": prepared.eval.stats() if prepared.eval else None}
    tracker, tracking_notes = tracking.start(recipe, run_dir, data_summary, resume=checkpoint is not None)
    notes += tracking_notes
    for note in tracking_notes:
        print(f"note: {note}")
    if tracker is not None:
        trainer.add_callback(tracking.ThroughputLogger(tracker))
    non_padding = non_padding_fraction(trainer)

    # 6. Evaluate, train, evaluate.
    has_eval = prepared.eval is not None
    eval_before = trainer.evaluate(metric_key_prefix="before") if has_eval and checkpoint is None else {}
    start_step = 0
    if checkpoint is not None:
        start_step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    tokens_before = trainer.state.num_input_tokens_seen
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_after = final_eval(trainer) if has_eval else {}

    # 7. Save the adapter and tokenizer, then the summary.
    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # gathers the weights under any launcher; safetensors
    if state.is_main_process:
        # save_model also pickles the training arguments; the export holds no pickles, and recipe.yaml has them.
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    tokens_seen = trainer.state.num_input_tokens_seen
    runtime = train_output.metrics.get("train_runtime") or 0.0
    summary = {
        "run_dir": str(run_dir),
        "adapter": str(adapter_dir),
        "processes": state.num_processes,
        "resumed_from_step": start_step,
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "tokens_seen": tokens_seen,
        "non_padding_tokens_per_second": round((tokens_seen - tokens_before) / runtime, 1) if runtime else None,
        "non_padding_fraction": non_padding,
        "train_loss": train_output.training_loss,
        "eval_loss_before": eval_before.get("before_loss"),
        "eval_loss_after": eval_after.get("eval_loss"),
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "data": data_summary,
        "notes": notes,
    }
    summary["tracking"] = tracking.finish(tracker, summary, adapter_dir, recipe.tracking.wandb_log_artifacts)
    if state.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        # Our card replaces the one TRL wrote: it carries the recipe, data, results and how to load the adapter.
        from qlora_pipeline.card import build_card

        build_card("adapter", recipe, summary, None, repo_id=args.hub_model_id).save(adapter_dir / "README.md")
        print_summary(summary)
        from qlora_pipeline.report import write_report

        try:
            print(f"report: {write_report(run_dir)}")
        except Exception as exc:  # the run is saved; a failed plot must not fail it
            print(f"warning: no report ({exc}); retry with: qlora-pipeline report {run_dir}", file=sys.stderr)
    state.wait_for_everyone()
    return summary


def print_summary(summary: dict) -> None:
    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    train = summary["data"]["train"]
    lines = [
        ("run folder", summary["run_dir"]),
        ("adapter", summary["adapter"]),
        ("processes", summary["processes"]),
        (
            "steps",
            f"{summary['global_step']} (resumed from {summary['resumed_from_step']})"
            if summary["resumed_from_step"]
            else summary["global_step"],
        ),
        (
            "examples",
            f"{train['examples']} train ({train['dropped']} dropped, {train['truncated']} truncated over max_length)",
        ),
        ("tokens seen", summary["tokens_seen"]),
        ("non-padding tokens/s", fmt(summary["non_padding_tokens_per_second"], ".1f")),
        ("train loss", fmt(summary["train_loss"])),
        ("eval loss", f"{fmt(summary['eval_loss_before'])} before → {fmt(summary['eval_loss_after'])} after"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("peak memory", f"{summary['peak_memory_mib']:.0f} MiB"),
    ]
    if summary.get("non_padding_fraction") is not None:
        lines.insert(7, ("non-padding share", f"{summary['non_padding_fraction']:.1%} of batch positions"))
    if summary.get("tracking"):
        lines.append(("W&B", tracking.describe(summary["tracking"])))
    width = max(len(k) for k, _ in lines)
    print("\n== qlora-pipeline train: done ==")
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    sys.stdout.flush()
