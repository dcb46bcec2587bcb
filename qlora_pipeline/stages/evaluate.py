"""Evaluate: a task's metric on the held-out rows, for an untrained and a trained model, as one table.

`stages.train.run` measures the model before and after training; `qlora-pipeline evaluate RUN_OR_RECIPE [--model X]`
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
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.model.adapters import check_adapter_base
from qlora_pipeline.outputs.evaluation_table import print_table, write_table
from qlora_pipeline.tasks.measure import keep_generations, measure, same_answers


def evaluate(target: str, model: str | list[str] | None = None, overrides: list[str] | None = None) -> Path:
    """`qlora-pipeline evaluate`: measure the models the target names (see the module doc), `model` one or several
    more; returns evaluation.md."""
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import get_task, prepare_data

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
    if source is None:
        return task.load_trained_base(recipe, prepared)
    kind, name = source
    if kind == "adapter":
        check_adapter_base(Path(name), recipe)  # before the weights load
        return task.load_trained(recipe, prepared, Path(name))
    other = dataclasses.replace(recipe.model, model_name_or_path=name)
    config = Path(name) / "config.json"
    if (Path(name) / "fidelity.json").is_file() and config.is_file():
        # A merged export loads as a user loads it: unquantized, in the dtype it was saved in (quantizing the merged
        # weights again would round away what the adapter learned).
        saved = json.loads(config.read_text()).get("dtype") or "auto"
        other = dataclasses.replace(other, load_in_4bit=False, load_in_8bit=False, dtype=saved)
    return task.load_trained_base(dataclasses.replace(recipe, model=other), prepared)
