"""Train: recipe → data → model → the task's trainer (qlora_pipeline/tasks/) → run folder.

A run folder holds:
  adapter/            the LoRA adapter (safetensors), the tokenizer it was trained with, its model card
  checkpoint-N/       the trainer's checkpoints (for --resume)
  recipe.yaml         the fully resolved recipe (no credentials), reloadable as a recipe
  metrics.jsonl       every log line of the trainer, one JSON object per line
  summary.json        the end-of-run summary that is also printed
  auto_settings.json  what the planner chose for the recipe's `auto` settings (read again on --resume)
  skipped_rows.jsonl  rows left out (on_bad_rows: skip, data checks' drop), each with file, line and reason
  data_checks.json    duplicate rows and train/eval overlap the data checks found, each with file and line
  evaluation.json/.md the task metric on the held-out rows, before and after training (tasks with a metric)
  generations/        every answer of a generation metric, before and after training
  merged/             the merged export, once `qlora-pipeline merge` (or push_to_hub: true) has run

`run` is the sequence of steps; each step below it is one function.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.data import rows as data_rows
from qlora_pipeline.data.checks import CHECKS_FILE
from qlora_pipeline.errors import Interrupted, PipelineError
from qlora_pipeline.model import loading
from qlora_pipeline.outputs import tracking
from qlora_pipeline.outputs.evaluation_table import print_table, write_table
from qlora_pipeline.plan import choose
from qlora_pipeline.recipe import Recipe
from qlora_pipeline.tasks import PreparedData, Task, get_task, prepare_data
from qlora_pipeline.tasks.measure import keep_generations, measure
from qlora_pipeline.training.callbacks import MetricsFile, StopOnSignal, keep_adapter_dtype
from qlora_pipeline.training.checkpoints import check_output_dir
from qlora_pipeline.training.measures import launcher_summary, non_padding_fraction, peak_memory_mib, zero3


def run(
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    callbacks: list | None = None,
) -> dict:
    """Train the recipe end to end and write the run folder. Returns the summary. `callbacks`: extra TrainerCallbacks
    (the benchmark's step timer).

    SIGINT or SIGTERM during training saves a checkpoint and raises Interrupted, whose message holds the command that
    resumes the run (`overrides`: the command line's `--key value` pairs, repeated in it)."""
    from accelerate import PartialState

    started = time.time()
    _ = recipe.training.device  # the training arguments set up the process group first (gloo under DeepSpeed on CPU)
    state = PartialState()
    run_dir = Path(recipe.training.output_dir)
    task = get_task(recipe.task.task)

    # 1. Output folder: resume, replace, or refuse.
    checkpoint = open_run_dir(run_dir, resume, overwrite, state)

    # 2. Data: checked and tokenized before the model loads; the resolved recipe and any skipped rows saved.
    prepared = prepare_data(recipe)
    notes = record_data(recipe, prepared, run_dir, state.is_main_process)

    # 3. Settings the recipe leaves to the planner (`auto`), chosen against the memory budget before the model loads.
    auto = settle_auto(recipe, run_dir, resumed=checkpoint is not None, state=state)
    if auto is not None and state.is_main_process:
        print(auto.describe())

    # 4. Model (quantized base + LoRA) and the task's trainer.
    trainer, model_notes = build_trainer(recipe, prepared, [MetricsFile(run_dir / "metrics.jsonl"), *(callbacks or [])])
    notes += say_notes(model_notes, state.is_main_process)
    if state.is_main_process:
        print(describe_batch(recipe.training, state.num_processes))

    # 5. Tracking: the W&B run (offline without a key), started before the first evaluation logs into it.
    data_summary = prepared.data_summary()
    tracker, tracking_notes = start_tracking(recipe, trainer, run_dir, data_summary, resume=checkpoint is not None)
    notes += tracking_notes
    non_padding = non_padding_fraction(trainer)

    # 6. Evaluate (eval loss, the task's metric), train, evaluate again; a generation metric's answers are kept.
    scores = Scores(task, recipe, prepared, trainer, answers_dir=run_dir if state.is_main_process else None)
    if checkpoint is None:
        scores.before()
    trained = train_until_done(recipe, trainer, checkpoint, state, tracker, overrides)
    scores.after()

    # 7. Save the adapter and tokenizer.
    adapter_dir = save_adapter(trainer, run_dir, state.is_main_process)

    # 8. Summary, evaluation table, model card and report.
    summary = {
        "run_dir": str(run_dir),
        "adapter": str(adapter_dir),
        "processes": state.num_processes,
        "launcher": launcher_summary(trainer),
        **trained,
        "non_padding_fraction": non_padding,
        "auto_settings": auto.to_dict() if auto is not None else None,
        **scores.summary(),
        "wall_time_s": round(time.time() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "data": data_summary,
        "notes": notes,
    }
    summary["tracking"] = tracking.finish(tracker, summary, adapter_dir, recipe.tracking.wandb_log_artifacts)
    if state.is_main_process:
        write_outputs(recipe, task, summary, run_dir, adapter_dir)
    state.wait_for_everyone()
    return summary


def open_run_dir(run_dir: Path, resume: bool, overwrite: bool, state) -> str | None:
    """The checkpoint to resume from (None: a new run); an existing run is replaced only under --overwrite."""
    checkpoint = check_output_dir(run_dir, resume, overwrite)
    state.wait_for_everyone()
    if overwrite and not resume and state.is_main_process and run_dir.exists():
        shutil.rmtree(run_dir)
    state.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)
    return checkpoint


AUTO_FILE = "auto_settings.json"


def settle_auto(recipe: Recipe, run_dir: Path, resumed: bool, state):
    """Choose the recipe's `auto` settings (plan/choose.py) and set them in its training arguments; None if it has
    none. The main process chooses and writes the choice (or why nothing fits) to the run folder, every process reads
    it from there, so all ranks train alike or stop alike; a resumed run takes the choice it started with (a new one
    could change the batch mid-run)."""
    if not recipe.auto:
        return None
    path = run_dir / AUTO_FILE
    if state.is_main_process and not (resumed and path.is_file()):
        try:
            settled = choose.choose(recipe).to_dict()
        except PipelineError as exc:
            settled = {"error": str(exc)}
        path.write_text(json.dumps(settled, indent=2) + "\n", encoding="utf-8")
    state.wait_for_everyone()
    settled = json.loads(path.read_text(encoding="utf-8"))
    if "error" in settled:
        state.wait_for_everyone()  # every rank has read it
        if state.is_main_process:
            path.unlink()
        raise PipelineError(settled["error"])
    choice = choose.Choice(**settled)
    choose.apply(recipe, choice)
    return choice


def say_notes(notes: list[str], main_process: bool) -> list[str]:
    """Print each note (on the main process only) and hand the list back, for the summary."""
    if main_process:
        for note in notes:
            print(f"note: {note}")
    return list(notes)


def record_data(recipe: Recipe, prepared: PreparedData, run_dir: Path, main_process: bool) -> list[str]:
    """The recipe's and the data's notes, printed; recipe.yaml, skipped_rows.jsonl, repaired_rows.jsonl and
    data_checks.json written (main process)."""
    notes = say_notes(recipe.notes + prepared.notes, main_process)
    if main_process:
        recipe.save(run_dir / "recipe.yaml")
        if prepared.skipped:
            data_rows.write_records(run_dir / data_rows.SKIPPED_FILE, prepared.skipped)
            print(f"note: the {len(prepared.skipped)} skipped rows are listed in {run_dir / data_rows.SKIPPED_FILE}")
        if prepared.repaired:
            data_rows.write_records(run_dir / data_rows.REPAIRED_FILE, prepared.repaired)
            print(f"note: the {len(prepared.repaired)} repairs are listed in {run_dir / data_rows.REPAIRED_FILE}")
        checks = prepared.checks
        if checks is not None and (checks.duplicates or checks.overlaps):
            findings = json.dumps(checks.to_dict(), indent=2, ensure_ascii=False) + "\n"
            (run_dir / CHECKS_FILE).write_text(findings, encoding="utf-8")
            print(f"note: the data checks' findings are listed in {run_dir / CHECKS_FILE}")
    return notes


def start_tracking(recipe: Recipe, trainer, run_dir: Path, data_summary: dict, resume: bool):
    """The W&B run (None where the recipe reports to no tracker), logging throughput from the trainer; its notes
    printed. Returns (run, notes)."""
    tracker, notes = tracking.start(recipe, run_dir, data_summary, resume=resume)
    if tracker is not None:
        trainer.add_callback(tracking.ThroughputLogger(tracker))
    return tracker, say_notes(notes, True)


def describe_batch(args, processes: int) -> str:
    effective = args.per_device_train_batch_size * processes * args.gradient_accumulation_steps
    if args.packing:
        return (
            f"batch: {args.per_device_train_batch_size} per device x {processes} processes x "
            f"{args.gradient_accumulation_steps} accumulation = {effective} packed rows per optimizer step"
        )
    return (
        f"batch: {args.per_device_train_batch_size} x {processes} x "
        f"{args.gradient_accumulation_steps} = {effective} examples per optimizer step"
    )


@dataclass
class Scores:
    """The held-out figures before and after training: the eval loss, and the task's own metric where it can run
    (ZeRO-3 partitions the weights, so the task's loop cannot). A resumed run has no "before"."""

    task: Task
    recipe: Recipe
    prepared: PreparedData
    trainer: Any
    answers_dir: Path | None  # where a generation metric keeps every answer (None: not the main process)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    task_metrics: dict = field(default_factory=dict)

    @property
    def has_eval(self) -> bool:
        return self.prepared.eval is not None

    @property
    def measurable(self) -> bool:
        return self.has_eval and not zero3(self.trainer)

    def before(self) -> None:
        if not self.has_eval:
            return
        if self.trainer.is_deepspeed_enabled or self.trainer.args.world_size > 1:
            # The "before" eval runs at step 0, inside train(). The Trainer builds the DeepSpeed engine there
            # (evaluating before it needs ZeRO-3); and under DDP an evaluate() before train() marks the model as
            # prepared, so accelerate's prepare() in train() skips the DDP wrapper and each rank trains on its own
            # gradients (tests/test_scaling.py checks the ranks' weights agree after every step).
            self.trainer.args.eval_on_start = True
        else:
            self.eval_before = self.trainer.evaluate(metric_key_prefix="before")
        self._task_metric("before")

    def after(self) -> None:
        if self.trainer.args.eval_on_start:
            log = self.trainer.state.log_history
            first = next(r for r in log if "eval_loss" in r and r.get("step") == 0)
            self.eval_before = {"before_loss": first["eval_loss"]}
        if self.has_eval:
            self.eval_after = final_eval(self.trainer)
        self._task_metric("after")

    def _task_metric(self, key: str) -> None:
        if self.measurable:
            metrics = measure(self.task, self.trainer.model, self.prepared, self.recipe)
            self.task_metrics[key] = keep_generations(metrics, self.answers_dir, key)

    def summary(self) -> dict:
        return {
            "eval_loss_before": self.eval_before.get("before_loss"),
            "eval_loss_after": self.eval_after.get("eval_loss"),
            "task": self.task.name,
            "classes": self.prepared.extra.get("class_names"),
            "task_metrics": {key: metrics for key, metrics in self.task_metrics.items() if metrics} or None,
        }


def train_until_done(recipe: Recipe, trainer, checkpoint: str | None, state, tracker, overrides) -> dict:
    """trainer.train(), from the checkpoint if resuming, stopping at a checkpoint on SIGINT/SIGTERM (`interrupted`
    raises). Returns the step and throughput figures of the summary."""
    start_step = 0
    if checkpoint is not None:
        start_step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        keep_adapter_dtype(trainer.model)
    tokens_before = trainer.state.num_input_tokens_seen
    stop = StopOnSignal(distributed=state.num_processes > 1, announce=state.is_main_process)
    trainer.add_callback(stop)
    with stop:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    if stop.signum and not stop.finished:
        interrupted(recipe, trainer, stop, tracker, overrides)
    if (stop.signum or stop.received) and state.is_main_process:
        # It came during the last step or after it: training is complete, so the run is finished rather than stopped
        # (resuming from the last step would train one step past max_steps: the Trainer steps before it checks).
        # The previous handlers are back: a second signal stops it at once.
        print(
            f"note: {signal.Signals(stop.signum or stop.received).name} came as training ended: finishing the run "
            "(send it again to stop at once)",
            file=sys.stderr,
        )
    tokens_seen = trainer.state.num_input_tokens_seen
    runtime = output.metrics.get("train_runtime") or 0.0
    return {
        "resumed_from_step": start_step,
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "tokens_seen": tokens_seen,
        "non_padding_tokens_per_second": round((tokens_seen - tokens_before) / runtime, 1) if runtime else None,
        "train_loss": output.training_loss,
        "train_runtime_s": round(runtime, 2),
    }


def save_adapter(trainer, run_dir: Path, main_process: bool) -> Path:
    adapter_dir = run_dir / "adapter"
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded (fast, resumable under the same launcher); the adapter is gathered whole, so
        # `qlora-pipeline merge` takes it as it is.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))  # gathers ZeRO-3 weights too (stage3_gather_16bit_weights_on_model_save)
    if main_process:
        # save_model also pickles the training arguments; the export holds no pickles, and recipe.yaml has them.
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    return adapter_dir


def write_outputs(recipe: Recipe, task, summary: dict, run_dir: Path, adapter_dir: Path) -> None:
    """evaluation.json/.md, summary.json, the adapter's model card and the report; the summary printed."""
    if summary["task_metrics"]:
        described = {
            "before": f"untrained: {recipe.model.model_name_or_path}",
            "after": f"trained: {recipe.model.model_name_or_path} + adapter {adapter_dir}",
        }
        columns = {k: {"model": described[k], "metrics": m} for k, m in summary["task_metrics"].items()}
        summary["evaluation"] = str(write_table(run_dir, columns, task, recipe)[1])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    # Our card replaces the one TRL wrote: it carries the recipe, data, results and how to load the adapter.
    from qlora_pipeline.outputs.card import build_card

    build_card("adapter", recipe, summary, None, repo_id=recipe.training.hub_model_id).save(adapter_dir / "README.md")
    print_summary(summary)
    if summary.get("evaluation"):
        print_table(Path(summary["evaluation"]))
    from qlora_pipeline.outputs.report import write_report

    try:
        print(f"report: {write_report(run_dir)}")
    except Exception as exc:  # the run is saved; a failed plot must not fail it
        print(f"warning: no report ({exc}); retry with: qlora-pipeline report {run_dir}", file=sys.stderr)


def build_trainer(recipe: Recipe, prepared: PreparedData, callbacks=None):
    """The task's base model (quantized as the recipe says), its LoRA adapter and the task's trainer. Returns
    (trainer, notes)."""
    from transformers import set_seed

    task = get_task(recipe.task.task)
    # The LoRA A matrices (and a task's new head) start random: seeded here, the same recipe starts from the same
    # weights (the Trainer only seeds once the model exists).
    set_seed(recipe.training.seed)
    model, notes = task.load_model(recipe, prepared)
    if recipe.model.use_peft:
        model = loading.add_lora(model, recipe.model)
    trainer = task.build_trainer(recipe, model, prepared, callbacks)
    match_adapter_to_compute_dtype(trainer.model)
    return trainer, notes


def match_adapter_to_compute_dtype(model) -> None:
    """TRL casts a QLoRA adapter to bfloat16 (the QLoRA paper's choice, for bf16 compute on a GPU). Where the 4-bit
    layers compute in float32 (on a CPU), that only adds a cast of every activation into and out of each adapter
    and runs its matmuls in slow bf16, so the adapter is kept in float32 there (measured: see docs/performance.md)."""
    import torch

    if not getattr(model, "is_loaded_in_4bit", False):
        return
    import bitsandbytes as bnb

    compute = {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    if compute != {torch.float32}:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def final_eval(trainer) -> dict:
    """The eval at the last step: the trainer's own if its eval schedule just ran one, else a new one."""
    state = trainer.state
    for record in reversed(state.log_history):
        if "eval_loss" in record and record.get("step") == state.global_step:
            return record
    return trainer.evaluate()


def interrupted(recipe: Recipe, trainer, stop: StopOnSignal, tracker, overrides: list[str] | None) -> None:
    """Training stopped on a signal, checkpoint saved: no final eval, adapter or summary. Raises Interrupted, naming
    the signal, the step, the checkpoint and the command that resumes, once every rank is done saving."""
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()  # a rank exiting early would make the launcher kill one that is still saving
    if tracker is not None:
        tracker.finish(exit_code=128 + stop.signum)  # the W&B run shows as stopped; --resume continues it
    command = shlex.join(["qlora-pipeline", "train", recipe.source, *(overrides or []), "--resume"])
    if state.num_processes > 1:
        command += f" (under the same launcher: accelerate launch --num_processes {state.num_processes} …)"
    checkpoint = Path(recipe.training.output_dir) / f"checkpoint-{stop.stopped_at}"
    raise Interrupted(
        f"{signal.Signals(stop.signum).name}: training stopped at step {stop.stopped_at} of "
        f"{trainer.state.max_steps}; checkpoint saved in {checkpoint}; continue with: {command}",
        stop.signum,
    )


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
