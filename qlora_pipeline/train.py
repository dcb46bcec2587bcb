"""Train: recipe → data → model → the task's trainer (qlora_pipeline/tasks/) → run folder.

A run folder holds:
  adapter/            the LoRA adapter (safetensors), the tokenizer it was trained with, its model card
  checkpoint-N/       the trainer's checkpoints (for --resume)
  recipe.yaml         the fully resolved recipe (no credentials), reloadable as a recipe
  metrics.jsonl       every log line of the trainer, one JSON object per line
  summary.json        the end-of-run summary that is also printed
  evaluation.json/.md the task metric on the held-out rows, before and after training (tasks with a metric)
  merged/             the merged export, once `qlora-pipeline merge` (or push_to_hub: true) has run
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from qlora_pipeline import data as data_mod
from qlora_pipeline import evaluate as evaluation
from qlora_pipeline import modeling, tracking
from qlora_pipeline.config import Recipe
from qlora_pipeline.errors import Interrupted, PipelineError
from qlora_pipeline.tasks import PreparedData, get_task


def prepare_data(recipe: Recipe) -> PreparedData:
    """Tokenizer and checked, tokenized train/eval splits, as the recipe's task makes them; no model loads."""
    return get_task(recipe.task.task).prepare_data(recipe)


class MetricsFile(TrainerCallback):
    """Appends every trainer log (loss, learning rate, grad norm, eval loss…) to metrics.jsonl on the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs, "memory_mib": current_memory_mib()}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM during training: finish the optimizer step under way, save checkpoint-N through the Trainer's
    own path (weights, optimizer, scheduler, RNG, trainer state), then stop.

    Used as a context manager around `trainer.train()`: the handlers are installed on entry and the previous ones put
    back on exit. The handler only records the signal and puts the previous handlers back at once, so a second
    signal acts as it would without us (SIGINT: KeyboardInterrupt, SIGTERM: terminate): a hard stop. With several
    processes the ranks agree on the stop step (an all-reduce MAX of the signal number at each step end), since a
    rank that stopped alone would leave the others waiting in DDP forever. A signal during the last step finds the
    training complete (`finished`): the run then ends as usual, since a resume from the last step would train one
    step past max_steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, distributed: bool = False, announce: bool = True):
        self.distributed = distributed
        self.announce = announce  # print the "stopping" line (main process only)
        self.received = 0  # the signal this process caught, 0 if none
        self.signum = 0  # the signal training stopped on (agreed by all ranks), 0 if it did not
        self.stopped_at: int | None = None  # the global step whose checkpoint holds the stop
        self.finished = False  # the stop came at the last step: training was complete anyway
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored (nohup, background job): stays so
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        self._restore()
        return False

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        self._restore()
        if self.announce:  # os.write: a signal may land in the middle of a print
            os.write(
                2,
                f"\n{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint "
                f"(send it again to stop at once, without one)\n".encode(),
            )

    def _check(self, args, state, control) -> None:
        if self.signum:
            return
        signum = self.received
        if self.distributed:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([signum], dtype=torch.int64, device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signum = int(flag.item())
        if signum:
            self.signum, self.stopped_at = signum, state.global_step
            self.finished = state.global_step >= state.max_steps
            control.should_save = True
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        self._check(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer saves after on_epoch_end too: a signal during the last step of an epoch stops there.
        self._check(args, state, control)


def keep_adapter_dtype(model) -> None:
    """On --resume the Trainer reloads the adapter with PEFT's load_adapter, which by default upcasts bf16/fp16
    adapter weights to float32, while TRL trains a QLoRA adapter in bf16. Loaded in the dtype it was trained in, the
    resumed run (optimizer state included) continues exactly where the interrupted one stopped."""
    load_adapter = getattr(model, "load_adapter", None)
    if load_adapter is not None and "autocast_adapter_dtype" in inspect.signature(load_adapter).parameters:
        model.load_adapter = functools.partial(load_adapter, autocast_adapter_dtype=False)


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
        model = modeling.add_lora(model, recipe.model)
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


CHECKPOINT_WEIGHTS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def checkpoint_complete(checkpoint: Path) -> bool:
    """The Trainer's last write, trainer_state.json, is there and whole, and so are the weights."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any((checkpoint / name).is_file() for name in CHECKPOINT_WEIGHTS)


def checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """The checkpoint-N folders of a run, oldest first: (complete, incomplete)."""
    if not output_dir.is_dir():
        return [], []
    found = [path for path in output_dir.iterdir() if path.is_dir() and re.fullmatch(r"checkpoint-\d+", path.name)]
    found.sort(key=step_of)
    complete = [path for path in found if checkpoint_complete(path)]
    return complete, [path for path in found if path not in complete]


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from, or None. Refuses to train over an existing run unless told how.

    --resume takes the newest complete checkpoint: the Trainer writes checkpoint-N/ in place and trainer_state.json
    last, so a save cut short (killed, disk full) leaves a folder without it, which is skipped with a note."""
    if resume:
        complete, incomplete = checkpoints(output_dir)
        skipped = [path.name for path in incomplete if not complete or step_of(path) > step_of(complete[-1])]
        if not complete and not skipped:
            raise PipelineError(f"{output_dir}: --resume given but there is no checkpoint-N folder to resume from")
        if not complete:
            raise PipelineError(
                f"{output_dir}: --resume given but there is no complete checkpoint-N folder to resume from "
                f"({', '.join(skipped)}: incomplete, a save was cut short)"
            )
        from accelerate import PartialState

        if skipped and PartialState().is_main_process:
            print(
                f"note: skipping {', '.join(skipped)}: incomplete (no trainer_state.json or weights; a save was cut "
                f"short); resuming from {complete[-1].name}"
            )
        return str(complete[-1])
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
    """Share of real tokens in the training batches, from the first batches in dataset order (no RNG used): what
    padding each batch to its longest row (packed) or example (unpacked) costs."""
    dataset, collate = trainer.train_dataset, trainer.data_collator
    size = trainer.args.per_device_train_batch_size
    real = total = 0
    for start in range(0, min(len(dataset), size * max_batches), size):
        batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        total += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        if mask is None:  # packed rows carry no mask: their padding is the pad token
            mask = batch["input_ids"] != trainer.processing_class.pad_token_id
        real += int(mask.sum())
    return round(real / total, 4) if total else None


def current_memory_mib() -> float | None:
    """Memory in use now: allocated GPU memory, else this process's resident set (Linux)."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.memory_allocated() / 2**20, 1)
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    args = recipe.training
    # The training arguments set up the process group first, with their backend (gloo under DeepSpeed on CPU).
    _ = args.device
    state = PartialState()
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
        if prepared.skipped:
            data_mod.write_skipped(run_dir / data_mod.SKIPPED_FILE, prepared.skipped)
            print(f"note: the {len(prepared.skipped)} skipped rows are listed in {run_dir / data_mod.SKIPPED_FILE}")

    # 3-4. Model (quantized base + LoRA) and trainer.
    trainer, model_notes = build_trainer(
        recipe, prepared, callbacks=[MetricsFile(run_dir / "metrics.jsonl"), *(callbacks or [])]
    )
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
    data_summary.update(prepared.accounting or {})
    tracker, tracking_notes = tracking.start(recipe, run_dir, data_summary, resume=checkpoint is not None)
    notes += tracking_notes
    for note in tracking_notes:
        print(f"note: {note}")
    if tracker is not None:
        trainer.add_callback(tracking.ThroughputLogger(tracker))
    non_padding = non_padding_fraction(trainer)

    # 6. Evaluate, train, evaluate.
    has_eval = prepared.eval is not None
    eval_before = {}
    if has_eval and checkpoint is None:
        if trainer.is_deepspeed_enabled:
            # The Trainer builds the DeepSpeed engine inside train(); evaluating before it needs ZeRO-3. So the
            # "before" eval runs at step 0, inside train().
            trainer.args.eval_on_start = True
        else:
            eval_before = trainer.evaluate(metric_key_prefix="before")
    task = get_task(recipe.task.task)
    task_metrics = {}
    measurable = has_eval and not _zero3(trainer)  # ZeRO-3 partitions the weights: the task's own loop cannot run
    answers_dir = run_dir if state.is_main_process else None  # where a generation metric keeps every answer
    if measurable and checkpoint is None:
        before = evaluation.measure(task, trainer.model, prepared, recipe)
        task_metrics["before"] = evaluation.keep_generations(before, answers_dir, "before")
    start_step = 0
    if checkpoint is not None:
        start_step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    tokens_before = trainer.state.num_input_tokens_seen
    if checkpoint is not None:
        keep_adapter_dtype(trainer.model)
    stop = StopOnSignal(distributed=state.num_processes > 1, announce=state.is_main_process)
    trainer.add_callback(stop)
    with stop:
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
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
    if trainer.args.eval_on_start:
        first = next(r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == 0)
        eval_before = {"before_loss": first["eval_loss"]}
    eval_after = final_eval(trainer) if has_eval else {}
    if measurable:
        after = evaluation.measure(task, trainer.model, prepared, recipe)
        task_metrics["after"] = evaluation.keep_generations(after, answers_dir, "after")

    # 7. Save the adapter and tokenizer, then the summary.
    adapter_dir = run_dir / "adapter"
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded (fast, resumable under the same launcher); the adapter is gathered whole, so
        # `qlora-pipeline merge` takes it as it is.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))  # gathers ZeRO-3 weights too (stage3_gather_16bit_weights_on_model_save)
    if state.is_main_process:
        # save_model also pickles the training arguments; the export holds no pickles, and recipe.yaml has them.
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    tokens_seen = trainer.state.num_input_tokens_seen
    runtime = train_output.metrics.get("train_runtime") or 0.0
    summary = {
        "run_dir": str(run_dir),
        "adapter": str(adapter_dir),
        "processes": state.num_processes,
        "launcher": launcher_summary(trainer),
        "resumed_from_step": start_step,
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "tokens_seen": tokens_seen,
        "non_padding_tokens_per_second": round((tokens_seen - tokens_before) / runtime, 1) if runtime else None,
        "non_padding_fraction": non_padding,
        "train_loss": train_output.training_loss,
        "eval_loss_before": eval_before.get("before_loss"),
        "eval_loss_after": eval_after.get("eval_loss"),
        "task": task.name,
        "classes": prepared.extra.get("class_names"),
        "task_metrics": {key: metrics for key, metrics in task_metrics.items() if metrics} or None,
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "data": data_summary,
        "notes": notes,
    }
    summary["tracking"] = tracking.finish(tracker, summary, adapter_dir, recipe.tracking.wandb_log_artifacts)
    if state.is_main_process:
        if summary["task_metrics"]:
            described = {
                "before": f"untrained: {recipe.model.model_name_or_path}",
                "after": f"trained: {recipe.model.model_name_or_path} + adapter {adapter_dir}",
            }
            columns = {k: {"model": described[k], "metrics": m} for k, m in summary["task_metrics"].items()}
            summary["evaluation"] = str(evaluation.write_table(run_dir, columns, task, recipe)[1])
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        # Our card replaces the one TRL wrote: it carries the recipe, data, results and how to load the adapter.
        from qlora_pipeline.card import build_card

        build_card("adapter", recipe, summary, None, repo_id=args.hub_model_id).save(adapter_dir / "README.md")
        print_summary(summary)
        if summary.get("evaluation"):
            evaluation.print_table(Path(summary["evaluation"]))
        from qlora_pipeline.report import write_report

        try:
            print(f"report: {write_report(run_dir)}")
        except Exception as exc:  # the run is saved; a failed plot must not fail it
            print(f"warning: no report ({exc}); retry with: qlora-pipeline report {run_dir}", file=sys.stderr)
    state.wait_for_everyone()
    return summary


def _zero3(trainer) -> bool:
    if not trainer.is_deepspeed_enabled:
        return False
    plugin = trainer.accelerator.state.deepspeed_plugin
    return bool(plugin and plugin.zero_stage == 3)


def launcher_summary(trainer) -> dict:
    """How the run was spread: accelerate's distributed type and each rank's process id, so a run that silently fell
    back to one process shows it. Every rank must call it (it gathers)."""
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    return {
        "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1],
        "processes": accelerator.num_processes,
        "ranks": gather_object([{"rank": accelerator.process_index, "pid": os.getpid()}]),
    }


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
