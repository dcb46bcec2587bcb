"""Every command's options answer to `--some_option` as well as `--some-option` (recipe overrides are written with
underscores, as HfArgumentParser spells them; people coming from transformers type them for every option)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline.cli.parser import build_parser

REPO = Path(__file__).resolve().parent.parent


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def long_options(parser: argparse.ArgumentParser) -> list[list[str]]:
    return [[o for o in a.option_strings if o.startswith("--")] for a in parser._actions if a.option_strings]


def test_every_option_of_every_command_has_both_spellings():
    commands = subcommands(build_parser())
    expected = {"train", "preprocess", "merge", "publish", "report", "evaluate", "generate", "chat", "plan"}
    assert expected <= set(commands)
    checked = 0
    for name, parser in commands.items():
        for options in long_options(parser):
            for option in options:
                if "-" in option[2:] or "_" in option[2:]:
                    for spelled in (option.replace("_", "-"), "--" + option[2:].replace("-", "_")):
                        assert spelled in options, f"{name}: {option} has no {spelled}"
                    checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    "argv, dest, value",
    [
        (["generate", "run", "--max_new_tokens", "7"], "max_new_tokens", 7),
        (["generate", "run", "--max-new-tokens", "7"], "max_new_tokens", 7),
        (["chat", "run", "--top_p", "0.5", "--do_sample"], "top_p", 0.5),
        (["merge", "run", "--base_mode", "original"], "base_mode", "original"),
        (["publish", "dir", "--repo_id", "me/x", "--dry_run"], "repo_id", "me/x"),
        (["plan", "recipe.yaml", "--gpu_memory", "24GiB"], "gpu_memory", "24GiB"),
    ],
)
def test_both_spellings_parse_to_the_same_setting(argv, dest, value):
    args, extra = build_parser().parse_known_args(argv)
    assert extra == [] and getattr(args, dest) == value


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_scripts_take_both_spellings(script):
    """Each benchmark's --help lists its dashed options beside their underscore spelling."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dashed = {o for o in result.stdout.split() if o.startswith("--") and "-" in o[2:]}
    for option in dashed:
        option = option.rstrip(",")
        assert "--" + option[2:].replace("-", "_") in result.stdout, f"{script}: {option}"
