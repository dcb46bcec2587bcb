"""Evaluate: a task's metric on the held-out rows, for an untrained and a trained model, as one table.

`train.run` measures the model before and after training; `qlora-pipeline evaluate RUN_OR_RECIPE [--model X]`
measures again from what is saved:
  - a run folder (recipe.yaml + adapter/): the untrained base ("before") and the base + the run's adapter ("after");
  - a recipe file: the untrained base;
  - `--model X` (repeatable) adds X: an adapter folder (on the recipe's base), a merged export or model folder, or
    a Hub id; a run's own merged export (merged/) is added without asking.
A generation metric keeps every answer under generations/ in the run folder, one file per model and held-out source,
and the table says how many answers of each further model are identical to the trained adapter's.
The held-out rows are the recipe's (same seed, same split). Every model of the table starts from the same seed, so a
new head (QA, classification) is initialised as it was in training and "before" here equals "before" in the run.
The table is written to the run folder (the recipe's output_dir) as evaluation.json and evaluation.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from qlora_pipeline.errors import PipelineError

JSON_FILE = "evaluation.json"
MARKDOWN_FILE = "evaluation.md"
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


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"


def _is_count(name: str) -> bool:
    return name == "n" or name.startswith("n_") or name.endswith("_n")


def write_table(folder: Path, columns: dict[str, dict], task, recipe) -> tuple[Path, Path]:
    """evaluation.json (every metric of every model) and evaluation.md (the numbers as one table, headline metrics
    first, with the change from the first column to the last; a confusion matrix per model where there is one).

    `columns`: column name → {"model": what was measured, "metrics": the task's dict}."""
    folder.mkdir(parents=True, exist_ok=True)
    headline = list(task.metric_names_for(recipe))
    names = list(dict.fromkeys(headline + [k for c in columns.values() for k in _numbers(c["metrics"])]))
    record = {
        "task": task.name,
        "recipe": recipe.source,
        "dataset": ", ".join(recipe.data.eval_files) or recipe.data.dataset_name,
        "headline": headline,
        "models": columns,
    }
    json_path = folder / JSON_FILE
    json_path.write_text(json.dumps(record, indent=2, default=str))

    keys = list(columns)
    lines = [f"# Evaluation: {task.name}", ""]
    lines += [f"- **{key}**: {columns[key]['model']}" for key in keys]
    files = recipe.data.eval_files
    held_out = ", ".join(files) or f"{recipe.data.eval_split_size} of {recipe.data.dataset_name} held out"
    caps = [n for n in (recipe.data.max_eval_samples, recipe.task.metric_max_samples) if n]
    count = next((c["metrics"]["n"] for c in columns.values() if isinstance(c["metrics"].get("n"), int)), None)
    scored = f", at most {min(caps)} rows" + (" of each file" if len(files) > 1 else "") if caps else ""
    scored += f"; {count} scored" if count is not None else ""
    lines += [f"- held-out rows: {held_out} (seed {recipe.training.seed}{scored})", ""]
    header = ["metric", *keys] + (["change"] if len(keys) > 1 else [])

    def table(rows: list[str], label) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in rows:
            values = [_numbers(columns[key]["metrics"]).get(name) for key in keys]
            row = [f"**{label(name)}**" if name in headline else label(name), *map(_format, values)]
            if len(keys) > 1:
                first, last = values[0], values[-1]
                both = first is not None and last is not None and not _is_count(label(name))
                row.append(f"{last - first:+.2f}" if both else "")
            lines.append("| " + " | ".join(row) + " |")
        return lines

    # A metric named SUBTASK/NAME (the medtuned metric) goes into its subtask's own table, after the overall one.
    overall = [name for name in names if "/" not in name]
    lines += table(overall, str)
    for subtask in dict.fromkeys(name.rsplit("/", 1)[0] for name in names if "/" in name):
        rows = [name for name in names if name.rsplit("/", 1)[0] == subtask and "/" in name]
        lines += ["", f"**{subtask}**", ""] + table(rows, lambda name: name.rsplit("/", 1)[1])
    files = [(key, path) for key in keys for path in columns[key]["metrics"].get("generations") or []]
    if files:
        lines += ["", "Every answer, for reading the errors:", ""] + [f"- {key}: `{path}`" for key, path in files]
    agreement = [(key, columns[key].get("identical_to")) for key in keys if columns[key].get("identical_to")]
    for key, (other, same, total) in agreement:
        lines.append(f"- {key}: {same} of {total} answers identical to {other}'s")
    notes = [f"- {key}: {note}" for key in keys for note in columns[key]["metrics"].get("notes") or []]
    if notes:
        lines += ["", "Notes:", "", *notes]
    for key in keys:
        matrix = columns[key]["metrics"].get("confusion_matrix")
        if matrix:
            labels = matrix["labels"]
            lines += ["", f"Confusion matrix, {key} (rows: true label, columns: predicted)", ""]
            lines += ["| true \\ predicted | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
            lines += [
                f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(labels, matrix["matrix"])
            ]
    markdown_path = folder / MARKDOWN_FILE
    markdown_path.write_text("\n".join(lines) + "\n")
    return json_path, markdown_path


def print_table(markdown_path: Path) -> None:
    print(markdown_path.read_text().rstrip())


# ---------------------------------------------------------------- the command


def evaluate(target: str, model: str | list[str] | None = None, overrides: list[str] | None = None) -> Path:
    """`qlora-pipeline evaluate`: measure the models the target names (see the module doc), `model` one or several
    more; returns evaluation.md."""
    from transformers import set_seed

    from qlora_pipeline.config import load_recipe
    from qlora_pipeline.tasks import get_task
    from qlora_pipeline.train import prepare_data

    path = Path(target)
    if path.is_dir():
        recipe_path = path / "recipe.yaml"
        if not recipe_path.is_file():
            raise PipelineError(f"{path}: not a run folder (no recipe.yaml); pass a run folder or a recipe file")
        run_dir, adapter = path, path / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            adapter = None
    elif path.is_file():
        recipe_path, run_dir, adapter = path, None, None
    else:
        raise PipelineError(f"{path}: no such run folder or recipe file")
    models = [model] if isinstance(model, str) else list(model or [])
    extras = [(f"model{n if len(models) > 1 else ''}", name, _locate_model(name)) for n, name in enumerate(models, 1)]
    merged = run_dir / "merged" if run_dir is not None else None
    given = {Path(name).resolve() for name in models}
    if merged is not None and (merged / "config.json").is_file() and merged.resolve() not in given:
        extras.append(("merged", str(merged), ("model", str(merged))))  # the run's own export, beside the adapter

    recipe = load_recipe(recipe_path, overrides)
    task = get_task(recipe.task.task)
    if not task.metric_names_for(recipe):
        raise PipelineError(
            f"{recipe_path}: task '{task.name}' has no metric here beyond the eval loss (in summary.json and "
            "report.md); for the symptoms recipes set generation_metric: symptoms"
        )
    run_dir = run_dir or Path(recipe.training.output_dir)
    prepared = prepare_data(recipe)
    if prepared.eval_rows is None:
        raise PipelineError(f"{recipe_path}: no held-out rows to evaluate on; set eval_split_size or eval_file")

    wanted = [("before", "untrained: " + recipe.model.model_name_or_path, None)]
    if adapter is not None:
        wanted.append(
            ("after", f"trained: {recipe.model.model_name_or_path} + adapter {adapter}", ("adapter", adapter))
        )
    for key, name, source in extras:
        wanted.append((key, f"{source[0]}: {name}", source))
    columns, trained_rows = {}, None
    for key, description, source in wanted:
        set_seed(recipe.training.seed)
        loaded = _load(task, recipe, prepared, source)
        print(f"evaluating {key}: {description}", flush=True)
        metrics = measure(task, loaded, prepared, recipe)
        rows = metrics.get("rows")
        columns[key] = {"model": description, "metrics": keep_generations(metrics, run_dir, key)}
        if key == "after":
            trained_rows = rows
        elif key != "before" and rows and trained_rows:  # does a further model answer as the trained adapter?
            columns[key]["identical_to"] = ("after", *same_answers(trained_rows, rows))
        del loaded
    json_path, markdown_path = write_table(run_dir, columns, task, recipe)
    print_table(markdown_path)
    print(f"\nsaved: {json_path} and {markdown_path}")
    return markdown_path


def _locate_model(name: str) -> tuple[str, str]:
    """("adapter", folder) for a LoRA adapter, ("model", name) for a model folder or Hub id."""
    path = Path(name)
    if (path / "adapter" / "adapter_config.json").is_file():
        return "adapter", str(path / "adapter")
    if (path / "adapter_config.json").is_file():
        return "adapter", str(path)
    if (path / "config.json").is_file():
        return "model", str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise PipelineError(f"{name}: not an adapter folder (adapter_config.json) or a model folder (config.json)")
    return "model", name  # a Hub id: from_pretrained says whether it exists


def _load(task, recipe, prepared, source):
    """The task's model as the recipe loads it: the base (source None), base + adapter, or another model."""
    if source is not None and source[0] == "model":
        other = dataclasses.replace(recipe.model, model_name_or_path=source[1])
        config = Path(source[1]) / "config.json"
        if (Path(source[1]) / "fidelity.json").is_file() and config.is_file():
            # A merged export loads as a user loads it: unquantized, in the dtype it was saved in (quantizing the
            # merged weights again would round away what the adapter learned).
            saved = json.loads(config.read_text()).get("dtype") or "auto"
            other = dataclasses.replace(other, load_in_4bit=False, load_in_8bit=False, dtype=saved)
        recipe = dataclasses.replace(recipe, model=other)
    from qlora_pipeline.merge import attach_adapter, check_adapter_base

    if source is not None and source[0] == "adapter":
        check_adapter_base(Path(source[1]), recipe)  # before the weights load
    model, _ = task.load_model(recipe, prepared)
    if source is not None and source[0] == "adapter":
        model = attach_adapter(model, Path(source[1]), recipe)
    return model
