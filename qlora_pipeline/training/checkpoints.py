"""A run folder's checkpoints: which are complete, which one --resume takes, and the refusal to train over a run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qlora_pipeline.errors import PipelineError

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
