"""Every kind of broken recipe ends in one `error:` line naming the file (or the command line) and the key.

Each case runs the real CLI (`python -m qlora_pipeline train RECIPE …`) in a subprocess; all of them fail while
the recipe is checked, before any model or dataset is loaded, so each run costs only the imports (~7 s).
The in-process tests at the end call `load_recipe` directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE, run_cli
from conftest import assert_clean_error as assert_one_error_line

from qlora_pipeline.errors import RecipeError

# ---------------------------------------------------------------- helpers


def load_tiny_recipe(tmp_path: Path) -> dict:
    """The tiny demo recipe as a dict, its run folder moved under tmp_path."""
    values = yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))
    values["output_dir"] = str(tmp_path / "run")
    return values


def write_yaml(path: Path, values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def cache(embedded_cache) -> Path:
    """The session-wide embedded-model cache (tests/conftest.py), so the tiny tokenizer is built once."""
    return embedded_cache


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe(**changes) -> path of a copy of the tiny recipe with keys changed (None removes a key)."""

    def make(**changes) -> Path:
        values = load_tiny_recipe(tmp_path)
        for key, value in changes.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        return write_yaml(tmp_path / "recipe.yaml", values)

    return make


# ---------------------------------------------------------------- the file itself


def test_missing_recipe_file(tmp_path, cache):
    path = tmp_path / "no-such-recipe.yaml"
    result = run_cli("train", str(path))
    assert_one_error_line(result, f"error: {path}:", "not found")


def test_invalid_yaml(tmp_path, cache):
    text = TINY_RECIPE.read_text(encoding="utf-8") + "lora_target_modules: [q_proj, v_proj\nseed: 1\n"
    text = text.replace("output_dir: runs/tiny-starling-medtuned", f"output_dir: {tmp_path / 'run'}")
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("train", str(path))
    assert_one_error_line(result, f"error: {path}:", "not valid YAML", "at line")


def test_yaml_list_instead_of_mapping(tmp_path, cache):
    path = write_yaml(tmp_path / "list.yaml", [load_tiny_recipe(tmp_path)])
    result = run_cli("train", str(path))
    assert_one_error_line(result, f"error: {path}:", "mapping", "list")


# ---------------------------------------------------------------- one key wrong

RECIPE_CASES = [
    pytest.param(
        {"lerning_rate": 1e-3}, "lerning_rate", ["unknown key", "did you mean 'learning_rate'"], id="unknown-key"
    ),
    pytest.param(
        {"learning_rate": "fast"}, "learning_rate", ["must be a number", "'fast'"], id="learning_rate-not-a-number"
    ),
    pytest.param({"lora_r": 1.5}, "lora_r", ["must be an integer", "1.5"], id="lora_r-not-an-integer"),
    pytest.param({"model_name_or_path": None}, "model_name_or_path", ["is required"], id="no-model"),
    pytest.param({"dataset_name": None}, "dataset_name", ["is required"], id="no-dataset"),
    pytest.param({"fp16": True, "bf16": True}, "bf16", ["fp16 and bf16"], id="fp16-and-bf16"),
    pytest.param(
        {"load_in_4bit": True, "load_in_8bit": True},
        "load_in_8bit",
        ["load_in_4bit and load_in_8bit"],
        id="4bit-and-8bit",
    ),
    pytest.param({"load_in_4bit": True, "use_peft": False}, "load_in_4bit", ["use_peft"], id="4bit-without-peft"),
    pytest.param({"learning_rate": -1e-4}, "learning_rate", ["must be positive"], id="negative-learning_rate"),
    pytest.param({"template": "chatml"}, "template", ["'chatml'", "starling", "alpaca"], id="unknown-template"),
    pytest.param({"packing_strategy": "wrapped"}, "packing_strategy", ["'bfd'"], id="packing-wrapped"),
    pytest.param(
        {"hub_token": "hf_SENTINEL_in_recipe"}, "hub_token", ["credential", "HF_TOKEN"], id="hub_token-in-recipe"
    ),
    pytest.param({"push_to_hub": True}, "push_to_hub", ["needs hub_model_id"], id="push-without-repo"),
    pytest.param(
        {"push_to_hub": True, "hub_model_id": "no owner"}, "hub_model_id", ["not a valid repo id"], id="bad-repo-id"
    ),
    pytest.param(
        {"merge_base_mode": "nf4"}, "merge_base_mode", ["'nf4-roundtrip'", "'original'"], id="unknown-merge-mode"
    ),
    pytest.param(
        {"merge_max_ppl_increase": -0.1}, "merge_max_ppl_increase", ["must be 0 or more"], id="negative-drift"
    ),
]


@pytest.mark.parametrize("changes, key, fragments", RECIPE_CASES)
def test_recipe_key_error(make_recipe, cache, cli_in_process, changes, key, fragments):
    path = make_recipe(**changes)
    result = cli_in_process("train", str(path))
    assert_one_error_line(result, f"error: {path}:", f"'{key}'", *fragments)
    # A credential is refused without being echoed back.
    assert "hf_SENTINEL" not in result.stdout + result.stderr


# ---------------------------------------------------------------- command-line overrides


@pytest.mark.parametrize(
    "override, fragments",
    [
        pytest.param(["--not_a_key", "3"], ["--not_a_key"], id="unknown-option"),
        pytest.param(["--learning_rate", "abc"], ["learning_rate", "'abc'"], id="learning_rate-not-a-number"),
    ],
)
def test_bad_override(make_recipe, cache, cli_in_process, override, fragments):
    path = make_recipe()
    result = cli_in_process("train", str(path), *override)
    assert_one_error_line(result, "error: command line:", *fragments)


# ---------------------------------------------------------------- in process: load_recipe


def test_valid_recipe_parses(make_recipe):
    from qlora_pipeline.recipe import load_recipe

    path = make_recipe()
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    assert recipe.model.model_name_or_path == "embedded:tiny-starling"
    assert recipe.model.load_in_4bit and recipe.model.use_peft
    assert recipe.model.lora_r == 8 and recipe.model.lora_alpha == 16
    assert recipe.data.dataset_name == "embedded:medtuned-sample" and recipe.data.template == "starling"
    assert recipe.training.learning_rate == pytest.approx(1e-2)
    assert recipe.training.max_length == 512 and recipe.training.packing
    assert recipe.training.output_dir == str(path.parent / "run")


def test_override_beats_recipe(make_recipe):
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(make_recipe(), ["--learning_rate", "1e-4"])
    assert recipe.training.learning_rate == pytest.approx(1e-4)


def test_lora_target_modules_all_linear_is_accepted(make_recipe):
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(make_recipe(lora_target_modules="all-linear"))
    # The recipe's plain string means the one-item list; TRL/PEFT may keep it as the string itself.
    assert recipe.model.lora_target_modules in ("all-linear", ["all-linear"])


def test_saved_recipe_round_trips(make_recipe, tmp_path):
    """The run folder's recipe.yaml reloads as a recipe with the same settings."""
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(make_recipe(), ["--learning_rate", "1e-4"])
    saved = tmp_path / "resolved.yaml"
    recipe.save(saved)
    again = load_recipe(saved)
    assert again.training.learning_rate == pytest.approx(1e-4)
    assert again.model.lora_r == recipe.model.lora_r == 8
    assert again.data.template == recipe.data.template == "starling"
    assert again.training.max_length == recipe.training.max_length == 512
    assert again.to_dict() == recipe.to_dict(), "every saved key reloads to the same value"
    # TrainingArguments.to_dict() masks every *_token field as "<PAD_TOKEN>"; tokenizer tokens must survive as is.
    assert again.training.pad_token is None and again.training.eos_token is None
    assert "<" not in saved.read_text().split("eos_token:")[1].splitlines()[0]


def test_push_to_hub_is_done_by_the_pipeline_not_the_trainer(make_recipe, tmp_path):
    """push_to_hub: true means train → merge → publish once; the trainer must not create a repo or push checkpoints."""
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(make_recipe(push_to_hub=True, hub_model_id="me/tiny"))
    assert recipe.publish and recipe.training.push_to_hub is False
    saved = tmp_path / "resolved.yaml"
    recipe.save(saved)
    again = load_recipe(saved)
    assert again.publish and again.to_dict()["push_to_hub"] is True


def test_command_line_override_replaces_a_bad_recipe_value(make_recipe):
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(make_recipe(learning_rate="fast"), ["--learning_rate", "1e-3"])
    assert recipe.training.learning_rate == pytest.approx(1e-3)


def test_a_bad_value_from_the_file_is_blamed_on_the_file(make_recipe):
    from qlora_pipeline.recipe import load_recipe

    path = make_recipe(include_num_input_tokens_seen="sometimes")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(str(path)), caught.value
    assert "include_num_input_tokens_seen" in str(caught.value)
