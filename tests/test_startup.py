"""Start-up: `--help` and a recipe's unknown key cost no torch import.

`--help` of every subcommand, and importing the CLI and the config module, must not import torch, transformers, trl,
peft, datasets or accelerate. With the recipe-key cache warm (qlora_pipeline/recipe/keys.py), an unknown key in the
recipe or on the command line is refused with the very message of the full check, before trl or torch is imported;
a cache for other versions, or a corrupt one, is never trusted. Checked in subprocesses by looking at sys.modules;
how long it takes is a benchmark figure (benchmarks/startup.py), not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_RECIPE

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.recipe import keys as recipe_keys

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")

# Runs cli.main(ARGS) and prints what it returned, what it wrote to stderr and which heavy modules it imported.
PROBE = f"""
import contextlib, io, json, sys
from qlora_pipeline.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(sys.argv[1:])
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps({{"code": code, "stderr": err.getvalue(), "heavy": heavy}}))
"""


def run_python(code: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if cache is not None:
        env["QLORA_PIPELINE_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


def probe(*args: str, cache: Path) -> dict:
    result = run_python(PROBE, *args, cache=cache)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture
def key_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder of this test's own, for this process and the subprocesses it starts."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("QLORA_PIPELINE_CACHE", str(folder))
    return folder


@pytest.fixture
def recipe(tmp_path):
    """recipe(**changes) -> path of a copy of the tiny recipe with keys changed (None removes a key)."""

    def make(**changes) -> Path:
        values = yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))
        values["output_dir"] = str(tmp_path / "run")
        for key, value in changes.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        return path

    return make


def full_check(path: Path, overrides: list[str] | None = None, bypass_cache: bool = False) -> str:
    """load_recipe's outcome: 'ok' or the error message. bypass_cache: the cache is neither read nor written, so the
    full check runs even where the cache is warm."""
    from qlora_pipeline.recipe import load_recipe

    with pytest.MonkeyPatch.context() as patch:
        if bypass_cache:
            patch.setattr(recipe_keys, "load", lambda: None)
            patch.setattr(recipe_keys, "store", lambda fields, parser: None)
        try:
            load_recipe(path, overrides)
        except RecipeError as exc:
            return str(exc)
    return "ok"


def cache_path() -> Path:
    versions = recipe_keys.fingerprint()
    assert versions is not None, "the pinned libraries are regular installs: their keys are cached"
    return recipe_keys.cache_file(versions)


# ---------------------------------------------------------------- nothing heavy at import or for --help


def test_importing_the_cli_and_the_config_imports_nothing_heavy():
    code = (
        "import sys, qlora_pipeline.cli, qlora_pipeline.recipe, qlora_pipeline.recipe.keys; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_of_every_subcommand_imports_nothing_heavy():
    code = f"""
import argparse, contextlib, io, json, sys
from qlora_pipeline.cli import build_parser, main
commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
report = {{}}
for command in [None, *commands]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(([command] if command else []) + ["--help"])
            code = None
        except SystemExit as exc:
            code = exc.code
    report[command or "(none)"] = [code, out.getvalue()[:40]]
print(json.dumps({{"help": report, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.splitlines()[-1])
    assert {"(none)", "train", "preprocess", "merge", "keys"} <= set(data["help"])
    for command, (code, text) in data["help"].items():
        assert code == 0 and text.startswith("usage: qlora-pipeline"), (command, code, text)
    assert data["heavy"] == []


# ---------------------------------------------------------------- a warm cache refuses unknown keys early


@pytest.mark.parametrize(
    "changes, overrides",
    [
        pytest.param({"lerning_rate": 1e-3}, [], id="unknown-key-in-recipe"),
        pytest.param({"totally_unrelated": 1}, [], id="unknown-key-no-hint"),
        pytest.param({}, ["--not_a_key", "3"], id="unknown-option"),
        pytest.param({}, ["--max_steps", "3", "--not_a_key=3"], id="unknown-option-with-equals"),
        pytest.param({"hub_token": "hf_SENTINEL"}, [], id="credential-in-recipe"),
    ],
)
def test_warm_cache_refuses_with_the_same_message_without_torch(recipe, key_cache, changes, overrides):
    path = recipe(**changes)
    assert not cache_path().exists()
    expected = full_check(path, overrides)  # cold: the full check, which writes the cache
    assert expected != "ok"
    assert cache_path().is_file(), "the full check wrote the key cache, even though the recipe was refused"

    result = probe("train", str(path), *overrides, cache=key_cache)
    assert result["heavy"] == [], "refused from the cache, before trl/torch load"
    assert result["code"] == 2
    assert result["stderr"] == f"error: {expected}\n"
    assert "hf_SENTINEL" not in result["stderr"]


def test_cold_cache_refuses_too_and_leaves_the_cache_warm(recipe, key_cache):
    path = recipe(lerning_rate=1e-3)
    result = probe("train", str(path), cache=key_cache)
    assert result["code"] == 2
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in result["stderr"]
    assert "torch" in result["heavy"], "without a cache the full check runs"
    assert cache_path().is_file()
    assert probe("train", str(path), cache=key_cache) == {**result, "heavy": []}


def test_valid_recipe_still_loads_with_a_warm_cache(recipe, key_cache):
    from qlora_pipeline.recipe import load_recipe

    path = recipe()
    load_recipe(path)  # warms the cache
    assert recipe_keys.load() is not None
    loaded = load_recipe(path, ["--learning_rate", "1e-4", "--lora_target_modules", "q_proj", "v_proj"])
    assert loaded.training.learning_rate == pytest.approx(1e-4)
    assert loaded.model.lora_target_modules == ["q_proj", "v_proj"]
    assert loaded.model.model_name_or_path == "embedded:tiny-starling" and loaded.data.template == "starling"


# ---------------------------------------------------------------- a cache that must not be trusted


def stale_copy(versions: dict) -> dict:
    """Keys as an older version set might have had them: learning_rate missing."""
    return {
        "format": recipe_keys.FORMAT,
        "versions": versions,
        "fields": ["model_name_or_path", "dataset_name"],
        "options": {"--model_name_or_path": None},
    }


def test_a_cache_for_other_versions_is_not_used(recipe, key_cache):
    from qlora_pipeline.recipe import load_recipe

    other = {**recipe_keys.fingerprint(), "trl": "0.0.1"}
    stale = recipe_keys.cache_file(other)
    assert stale != cache_path(), "other versions, another file"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps(stale_copy(other)))
    assert recipe_keys.load() is None
    assert load_recipe(recipe()).training.learning_rate > 0  # learning_rate is a key here, whatever the stale file says
    assert recipe_keys.load() is not None and "learning_rate" in recipe_keys.load().fields
    assert json.loads(stale.read_text()) == stale_copy(other), "another version set's file is left alone"


def test_a_file_holding_other_versions_under_this_name_is_not_used(recipe, key_cache):
    from qlora_pipeline.recipe import load_recipe

    path = cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stale_copy({**recipe_keys.fingerprint(), "trl": "0.0.1"})))
    assert recipe_keys.load() is None
    assert load_recipe(recipe()).training.learning_rate > 0
    assert "learning_rate" in recipe_keys.load().fields, "rewritten for these versions"


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"\xff\xfe\x00", b"[]", b'{"format": 1}', b'{"format": 1, "fields": "x", "options": {}}'],
    ids=["empty", "truncated", "not-utf8", "a-list", "no-fields", "wrong-shapes"],
)
def test_a_corrupt_cache_falls_back_to_the_full_check_and_is_rewritten(recipe, key_cache, content):
    path = cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert recipe_keys.load() is None
    message = full_check(recipe(lerning_rate=1e-3))
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in message
    assert recipe_keys.load() is not None, "rewritten by the full check"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"], "no temporary file left behind"


def test_an_unwritable_cache_folder_only_costs_the_fast_path(recipe, tmp_path, monkeypatch):
    from qlora_pipeline.recipe import load_recipe

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QLORA_PIPELINE_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    assert load_recipe(recipe()).training.learning_rate > 0
    assert recipe_keys.load() is None
    assert "unknown key" in full_check(recipe(lerning_rate=1e-3))


def test_a_source_install_of_a_library_is_not_cached(monkeypatch):
    from importlib import metadata

    real = metadata.distribution

    class Dev:
        version = "5.99.0.dev0"

        def read_text(self, name):
            return None

    monkeypatch.setattr(metadata, "distribution", lambda name: Dev() if name == "transformers" else real(name))
    assert recipe_keys.fingerprint.__wrapped__() is None


# ---------------------------------------------------------------- the command line, read from the cache


@pytest.mark.parametrize(
    "overrides, first",
    [
        (["--not_a_key", "3"], "--not_a_key"),
        (["--not_a_key=3"], "--not_a_key=3"),
        (["--max_steps", "3", "--zzz", "a", "b", "--yyy"], "--zzz"),
        (["--use_peft", "--zzz"], "--zzz"),
        (["--use_peft", "false", "--zzz"], "--zzz"),
        (["--lora_target_modules", "q_proj", "v_proj", "--zzz"], "--zzz"),
        (["--learning_rate", "-1", "--zzz"], "--zzz"),
        (["--zzz", "--learning-rate", "0.1"], "--zzz"),
        (["--max_steps", "3"], None),  # nothing unknown
        (["--learn", "1"], None),  # an abbreviation: argparse's call (here: ambiguous)
        (["--learning_rat", "1", "--zzz"], None),  # an unambiguous abbreviation, then argparse decides
        (["--max_steps", "3", "4", "--zzz"], None),  # a stray value comes first
        (["--zzz", "--max_steps"], None),  # a missing value is argparse's error
        (["--zzz", "--lr", "1"], None),  # so is an ambiguous abbreviation
        (["-x", "--zzz"], None),
        (["--", "--zzz"], None),
        (["--help", "--zzz"], None),
    ],
)
def test_the_cached_options_name_what_argparse_names(recipe, key_cache, overrides, first):
    path = recipe()
    full_check(path)  # warms the cache
    keys = recipe_keys.load()
    assert recipe_keys.first_unknown_option(overrides, keys.options) == first
    if first is not None:
        expected = f"command line: unknown option {first!r}; 'qlora-pipeline keys' lists the keys"
        assert full_check(path, overrides, bypass_cache=True) == expected
