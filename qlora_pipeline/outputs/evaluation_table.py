"""The evaluation table: every model's task metrics as evaluation.json and one markdown table, evaluation.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

JSON_FILE = "evaluation.json"


MARKDOWN_FILE = "evaluation.md"


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"


def is_count(name: str) -> bool:
    """A row count (n, n_forward, SUBTASK/n…), not a score: no change is shown for it, no card lists it."""
    last = name.rsplit("/", 1)[-1]  # SUBTASK/METRIC (the medtuned metric)
    return last == "n" or last.startswith("n_") or last.endswith("_n")


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
        "dataset": ", ".join(recipe.data.eval_files) or recipe.data.data_label,
        "headline": headline,
        "models": columns,
    }
    json_path = folder / JSON_FILE
    json_path.write_text(json.dumps(record, indent=2, default=str))

    keys = list(columns)
    lines = [f"# Evaluation: {task.name}", ""]
    lines += [f"- **{key}**: {columns[key]['model']}" for key in keys]
    files = recipe.data.eval_files
    held_out = ", ".join(files) or f"{recipe.data.eval_split_size} of {recipe.data.data_label} held out" + (
        " (of each source)" if recipe.data.dataset_mixture is not None else ""
    )
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
                both = first is not None and last is not None and not is_count(label(name))
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
