"""Tracking: one Weights & Biases run per training run, online with an API key, offline without one.

`report_to: wandb` in the recipe turns it on; the trainer's own `WandbCallback` logs the losses, learning rate and
grad norm into the run started here. This module adds what the trainer does not log: the resolved recipe (no
credentials), library versions, the data summary, tokens per second, the end-of-run summary (non-padding share,
peak memory, eval before/after) and, when `wandb_log_artifacts: true`, the adapter and the merge's fidelity report.

Without `WANDB_API_KEY` or a saved login the run is logged offline (never a login prompt), inside the run folder;
the summary prints the `wandb sync` command that uploads it later. Other `report_to` integrations (tensorboard,
mlflow…) go through the trainer's own callbacks unchanged.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path

from transformers import TrainerCallback

TRACKING_FILE = "tracking.json"  # in the run folder: the W&B run id, so --resume and merge log into the same run
DEFAULT_PROJECT = "qlora-pipeline"
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "wandb")


def uses_wandb(training_args) -> bool:
    report_to = training_args.report_to or []
    return "wandb" in ([report_to] if isinstance(report_to, str) else report_to)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def start(recipe, run_dir: Path, data_summary: dict, resume: bool):
    """Start (or, on --resume, continue) the W&B run of this training run. Main process only; None if off.

    Returns (run, notes)."""
    from accelerate import PartialState

    if not uses_wandb(recipe.training) or not PartialState().is_main_process:
        return None, []
    import wandb

    notes = []
    mode = os.environ.get("WANDB_MODE")
    if not mode:
        mode = "online" if has_wandb_credentials() else "offline"
        if mode == "offline":
            notes.append("W&B: no API key or saved login, so the run is logged offline in the run folder")
    options = recipe.tracking
    previous = _read_tracking(run_dir) if resume else {}
    run = wandb.init(
        project=options.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=options.wandb_entity,
        name=recipe.training.run_name or run_dir.name,
        group=options.wandb_group,
        tags=options.wandb_tags,
        notes=options.wandb_notes,
        dir=str(run_dir),
        mode=mode,
        id=previous.get("run_id"),
        resume="allow" if previous.get("run_id") else None,
        config={"recipe": recipe.to_dict(), "versions": library_versions(), "data": data_summary},
        settings=wandb.Settings(save_code=False, silent=True),
    )
    _write_tracking(run_dir, run, mode)
    return run, notes


class ThroughputLogger(TrainerCallback):
    """Logs non-padding tokens per second between consecutive trainer logs, on the trainer's step axis."""

    def __init__(self, run):
        self.run = run
        self.last = None  # (time, tokens seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.run is None:
            return
        now, tokens = time.time(), state.num_input_tokens_seen
        if self.last is not None and now > self.last[0] and tokens > self.last[1]:
            rate = (tokens - self.last[1]) / (now - self.last[0])
            self.run.log({"train/tokens_per_second": rate, "train/global_step": state.global_step})
        self.last = (now, tokens)


def finish(run, summary: dict, adapter_dir: Path, log_artifacts: bool) -> dict | None:
    """Write the end-of-run figures into the run's summary, log the adapter if asked, close the run.

    Returns where the run went (for summary.json and the printed summary)."""
    if run is None:
        return None
    import wandb

    for key in (
        "global_step",
        "tokens_seen",
        "non_padding_tokens_per_second",
        "non_padding_fraction",
        "train_loss",
        "eval_loss_before",
        "eval_loss_after",
        "train_runtime_s",
        "peak_memory_mib",
    ):
        if summary.get(key) is not None:
            run.summary[f"final/{key}"] = summary[key]
    for stage, metrics in (summary.get("task_metrics") or {}).items():  # before/after: the task's held-out scores
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run.summary[f"task_{stage}/{name}"] = value
    train = summary["data"]["train"]
    for key in ("rows", "examples", "tokens", "dropped", "truncated"):
        run.summary[f"data/train_{key}"] = train[key]
    if log_artifacts:
        artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata={"base": summary.get("base_model")})
        artifact.add_dir(str(adapter_dir))
        run.log_artifact(artifact)
    info = _where(run)
    run.finish()
    return info


def log_fidelity(recipe, run_dir: Path | None, report: dict) -> dict | None:
    """After a merge: the fidelity figures (and, if asked, fidelity.json as an artifact) into the training's run."""
    if run_dir is None or not uses_wandb(recipe.training):
        return None
    previous = _read_tracking(run_dir)
    if not previous.get("run_id"):
        return None
    import wandb

    run = wandb.init(
        project=previous["project"],
        entity=previous.get("entity"),
        id=previous["run_id"],
        resume="allow",
        dir=str(run_dir),
        mode=os.environ.get("WANDB_MODE") or previous["mode"],
        settings=wandb.Settings(save_code=False, silent=True),
    )
    for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "perplexity_increase", "greedy_identical", "passed"):
        if key in report:  # the logit figures are a causal LM's; every task's merge has its verdict
            run.summary[f"merge/{key}"] = report[key]
    task_metrics = report.get("task_metrics") or {}
    for name, value in (task_metrics.get("export") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            run.summary[f"merge/task/{name}"] = value
    if task_metrics.get("compared"):
        run.summary["merge/task/identical_predictions"] = task_metrics["identical_predictions"]
    if recipe.tracking.wandb_log_artifacts and report.get("export_dir"):
        artifact = wandb.Artifact(f"fidelity-{run.id}", type="evaluation")
        artifact.add_file(str(Path(report["export_dir"]) / "fidelity.json"))
        run.log_artifact(artifact)
    info = _where(run)
    run.finish()
    return info


def describe(info: dict | None) -> str | None:
    """One line for the printed summary: where the run is, and how to upload an offline one."""
    if not info:
        return None
    if info["mode"] == "offline":
        return f"offline run in {info['dir']}; upload with: wandb sync {info['dir']}"
    return info.get("url") or info["dir"]


def _where(run) -> dict:
    offline = run.settings.mode == "offline"
    return {
        "mode": "offline" if offline else "online",
        "run_id": run.id,
        "project": run.project,
        "dir": str(Path(run.dir).parent),  # run.dir is the run's files/ folder
        "url": None if offline else run.url,
    }


def _write_tracking(run_dir: Path, run, mode: str) -> None:
    record = {"run_id": run.id, "project": run.project, "entity": run.entity or None, "mode": mode}
    (run_dir / TRACKING_FILE).write_text(json.dumps(record, indent=2))


def _read_tracking(run_dir: Path) -> dict:
    path = run_dir / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
