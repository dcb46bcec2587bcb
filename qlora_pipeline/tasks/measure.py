"""Measuring a task's metric on a model (eval mode, no gradients), where its per-row answers go, and how two
models' answers compare."""

from __future__ import annotations

import json
from pathlib import Path

# Where the generation metrics keep every answer: one JSONL file per model and held-out source.
GENERATIONS_DIR = "generations"


def measure(task, model, prepared, recipe) -> dict:
    """The task's metrics on `model`, in eval mode without gradients; the model's mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return task.evaluate(model, prepared, recipe)
    finally:
        model.train(was_training)


def keep_generations(metrics: dict, folder: Path | None, key: str) -> dict:
    """Move a generation metric's per-row records (`rows`) out of `metrics` into GENERATIONS_DIR/KEY-SOURCE.jsonl
    under `folder` (nothing is written without a folder: a rank other than the main one); the files are listed in
    metrics["generations"]. Returns `metrics`."""
    rows = metrics.pop("rows", None)
    if not rows or folder is None:
        return metrics
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    target = Path(folder) / GENERATIONS_DIR
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for source, records in by_source.items():
        path = target / f"{key}-{source}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        written.append(str(path))
    metrics["generations"] = written
    return metrics


def same_answers(first: list[dict], second: list[dict]) -> tuple[int, int]:
    """(identical, compared): how many scored rows two models answered word for word the same, from a generation
    metric's per-row records of the same rows in the same order."""
    pairs = [(a, b) for a, b in zip(first, second) if a["subtask"] is not None]
    return sum(a["prediction"] == b["prediction"] for a, b in pairs), len(pairs)
