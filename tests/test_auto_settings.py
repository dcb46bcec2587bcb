"""`gradient_checkpointing: auto` and `per_device_train_batch_size: auto`: parsed, refused where they cannot work,
chosen from the memory plan fastest first, predicted by `plan`, applied by `train`, and kept for a resume."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_RECIPE, run_cli

from qlora_pipeline import plan
from qlora_pipeline.errors import PipelineError, RecipeError
from qlora_pipeline.plan import choose
from qlora_pipeline.recipe import load_recipe

MIB = 2**20


def test_the_demo_leaves_checkpointing_and_batch_to_the_planner():
    recipe = load_recipe(TINY_RECIPE)
    assert recipe.auto == ("gradient_checkpointing", "per_device_train_batch_size")
    # Until the planner chooses: batch 1 x the effective batch, checkpointing on (the placeholders).
    assert recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps == 2
    assert recipe.resources.effective_batch_size == 2


@pytest.mark.parametrize(
    "overrides",
    [
        ["--gradient_checkpointing", "auto", "--per_device_train_batch_size", "auto"],
        ["--gradient-checkpointing=auto", "--per-device-train-batch-size=AUTO"],
        ["--activation_checkpointing", "auto", "--per_device_train_batch_size", "auto"],
    ],
)
def test_auto_on_the_command_line_in_either_spelling(tmp_path, overrides):
    values = yaml.safe_load(TINY_RECIPE.read_text())
    values.update(per_device_train_batch_size=4, gradient_accumulation_steps=2, gradient_checkpointing=True)
    del values["effective_batch_size"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    recipe = load_recipe(path, overrides)
    assert recipe.auto == ("gradient_checkpointing", "per_device_train_batch_size")
    # The file's 4 x 2 is the effective batch the planner keeps.
    assert recipe.resources.effective_batch_size == 8
    assert [batch for _, batch in choose.candidates(recipe)] == [8, 4, 2, 1, 8, 4, 2, 1]
    assert [on for on, _ in choose.candidates(recipe)] == [False] * 4 + [True] * 4


def test_a_number_on_the_command_line_beats_auto_in_the_file():
    recipe = load_recipe(TINY_RECIPE, ["--per_device_train_batch_size", "1", "--gradient_checkpointing", "false"])
    assert recipe.auto == ()
    # The file's effective batch of 2 stays: 1 row x 2 accumulation steps.
    assert (recipe.training.per_device_train_batch_size, recipe.training.gradient_accumulation_steps) == (1, 2)
    assert recipe.training.gradient_checkpointing is False


@pytest.mark.parametrize(
    "changes, overrides, message",
    [
        ({"effective_batch_size": None}, [], "per_device_train_batch_size': auto needs effective_batch_size"),
        ({}, ["--gradient_accumulation_steps", "2"], "follows from effective_batch_size when the batch is auto"),
        ({}, ["--per_device_train_batch_size", "3"], "effective_batch_size': 2 is not a multiple of"),
        ({}, ["--memory_budget", "lots"], "memory_budget': 'lots' is not a size"),
        ({}, ["--effective_batch_size", "0"], "effective_batch_size': must be a positive integer"),
        ({"task": "classification", "packing": False, "generation_metric": "none", "metric_batch_size": None}, [],
         "models causal_lm recipes, not task 'classification'"),
    ],
)  # fmt: skip
def test_impossible_auto_settings_are_refused_before_anything_loads(tmp_path, changes, overrides, message):
    values = yaml.safe_load(TINY_RECIPE.read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path, overrides)


def test_the_fastest_candidate_that_fits_is_chosen():
    recipe = load_recipe(TINY_RECIPE, ["--effective_batch_size", "4"])
    roomy = choose.choose(recipe, budget=64 * 2**30)
    assert (roomy.gradient_checkpointing, roomy.per_device_train_batch_size) == (False, 4)
    assert roomy.gradient_accumulation_steps == 1 and len(roomy.tried) == 1
    # A budget just under the fastest candidate's plan (at the data's labelled share, not the upper bound that
    # roomy needed): the next one in the order, and the reason printed.
    fastest = plan.predict(recipe, device="cpu", batch_size=4, gradient_checkpointing=False).total
    tight = choose.choose(recipe, budget=fastest - 1)
    assert not (tight.gradient_checkpointing is False and tight.per_device_train_batch_size == 4)
    assert tight.per_device_train_batch_size * tight.gradient_accumulation_steps == 4
    assert tight.planned_bytes < roomy.planned_bytes and tight.tried[0]["fits"] is False
    assert "did not fit" in tight.describe()
    with pytest.raises(PipelineError, match="no setting fits the memory budget of 1.0 MiB"):
        choose.choose(recipe, budget=MIB)


def test_plan_predicts_the_choice_train_makes(tmp_path, cli_in_process):
    """`plan` and `train` choose alike on the same budget; the run trains with the choice, records it, keeps `auto`
    in its saved recipe, and a resume takes the first choice again rather than choosing anew."""
    short = ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"]
    recipe = load_recipe(TINY_RECIPE, short)
    fastest = plan.predict(recipe, device="cpu", batch_size=2, gradient_checkpointing=False).total
    # A budget under the fastest candidate's plan (batch 2, no checkpointing), over some slower one.
    budget = f"{fastest // MIB - 1}MiB"
    common = ["--memory_budget", budget, *short]
    planned = cli_in_process("plan", str(TINY_RECIPE), "--json", *common)
    assert planned.returncode == 0, planned.stderr[-2000:]
    predicted = json.loads(planned.stdout)["auto_settings"]
    assert predicted["budget_source"] == f"memory_budget {budget}"
    assert (predicted["gradient_checkpointing"], predicted["per_device_train_batch_size"]) != (False, 2)

    run_dir = tmp_path / "run"
    trained = run_cli("train", str(TINY_RECIPE), "--output_dir", str(run_dir), "--generation_metric", "none", *common)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    chosen = summary["auto_settings"]
    for key in ("gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps"):
        assert chosen[key] == predicted[key], key
    assert "auto (gradient_checkpointing, per_device_train_batch_size)" in trained.stdout
    rows = chosen["per_device_train_batch_size"]
    assert f"batch: {rows} per device x 1 processes x {chosen['gradient_accumulation_steps']} accumulation" in (
        trained.stdout
    )
    assert json.loads((run_dir / "auto_settings.json").read_text()) == chosen
    card = (run_dir / "adapter" / "README.md").read_text()
    assert f"| per_device_train_batch_size | {rows} (auto: chosen by the memory planner) |" in card
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["per_device_train_batch_size"] == saved["gradient_checkpointing"] == "auto"
    assert "gradient_accumulation_steps" not in saved and saved["effective_batch_size"] == 2

    # A resume reads the first choice back, though the planner would now choose otherwise (a roomier budget).
    from accelerate import PartialState

    from qlora_pipeline.stages.train import settle_auto

    roomier = ["--memory_budget", "64GiB"]
    again = load_recipe(run_dir / "recipe.yaml", roomier)
    kept = settle_auto(again, run_dir, resumed=True, state=PartialState())
    assert kept.to_dict() == chosen
    assert again.training.per_device_train_batch_size == chosen["per_device_train_batch_size"]
    assert again.training.gradient_checkpointing == chosen["gradient_checkpointing"]
    fresh = settle_auto(load_recipe(run_dir / "recipe.yaml", roomier), tmp_path, resumed=False, state=PartialState())
    assert (fresh.gradient_checkpointing, fresh.per_device_train_batch_size) == (False, 2)


def test_plan_says_when_nothing_fits(cli_in_process):
    result = cli_in_process("plan", str(TINY_RECIPE), "--memory_budget", "1MiB")
    assert result.returncode == 1
    assert "nothing fits; the smallest is planned" in result.stdout


def test_train_stops_cleanly_when_nothing_fits(tmp_path, cli_in_process):
    result = cli_in_process("train", str(TINY_RECIPE), "--output_dir", str(tmp_path / "run"), "--memory_budget", "1MiB")
    # The data is read and tokenized first (its progress bars are on stderr), then the plan stops the run.
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no setting fits the memory budget of 1.0 MiB (memory_budget 1MiB)" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "auto_settings.json").exists()
