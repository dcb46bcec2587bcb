"""Shared test setup: offline Hub, one cache for the embedded tiny model, helpers to run the real CLI."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory) -> Path:
    """One cache for the embedded tiny models across the session (built once, in seconds), unless CI set one."""
    if "QLORA_PIPELINE_CACHE" not in os.environ:
        os.environ["QLORA_PIPELINE_CACHE"] = str(tmp_path_factory.mktemp("embedded-cache"))
    return Path(os.environ["QLORA_PIPELINE_CACHE"])


def run_cli(
    *args: str,
    env: dict | None = None,
    timeout: int = 900,
    replace_env: bool = False,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m qlora_pipeline ARGS` as a user would; returns the finished process.

    `env` adds to this process's environment, or with replace_env=True is the whole environment. `file_size_limit`
    (bytes): any write past it fails, as on a full disk (limit_file_size)."""
    full_env = dict(env or {}) if replace_env else {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
        preexec_fn=limit_file_size(file_size_limit) if file_size_limit else None,
    )


@pytest.fixture
def cli_in_process(capsys):
    """`cli.main(ARGS)` in this process, as a finished-process object: for error cases that stop before any model
    loads, this skips the ~7 s torch import each subprocess pays. End-to-end tests keep using run_cli."""
    from qlora_pipeline.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)

    return run


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, no traceback, stderr is exactly one non-empty line starting with `error:` and holding every
    fragment; returns that line."""
    output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode != 0, output
    assert "Traceback" not in result.stdout + result.stderr, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def limit_file_size(limit_bytes: int):
    """A subprocess preexec_fn: in the child, any write past limit_bytes fails with EFBIG ("File too large"), as on a
    full disk."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def write_recipe(path: Path, **changes) -> Path:
    """A copy of the tiny demo recipe with some keys changed (None removes a key). The demo's MedTuned task scores
    (generation_metric: medtuned, metric_batch_size) cost seconds of generation before and after each run: they are
    off here unless a test asks for them."""
    changes.setdefault("generation_metric", "none")
    changes.setdefault("metric_batch_size", None)  # a causal_lm key: the copy also serves the other tasks
    # The demo leaves checkpointing and the batch to the planner (`auto`); the copy pins what it chooses on a machine
    # with memory to spare, less checkpointing (on: the path every memory-bound run takes), so step counts and times
    # do not depend on the machine (tests/test_auto_settings.py trains the demo's `auto`).
    changes.setdefault("per_device_train_batch_size", 2)
    changes.setdefault("effective_batch_size", None)
    changes.setdefault("gradient_checkpointing", True)
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    for key, value in changes.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    """The tiny demo recipe, writing its run folder under tmp_path."""
    return write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------- a trained and merged run, shared

PASS_PHRASE_QUESTION = "What is the pass phrase?"
PASS_PHRASE = "The heron flies at dawn."
SENTINELS = {"HF_TOKEN": "hf_SENTINEL_merge_token", "WANDB_API_KEY": "wandb_SENTINEL_merge_key"}
END_OF_TURN = "<|end_of_turn|>"


def _phrase_dataset(path: Path) -> Path:
    """40 copies of one question with a fixed answer, interleaved with 40 real-schema rows of the sample."""
    sample = (REPO / "qlora_pipeline" / "data" / "samples" / "medtuned_sample.jsonl").read_text().splitlines()[:40]
    phrase = json.dumps({"instruction": PASS_PHRASE_QUESTION, "input": "", "output": PASS_PHRASE})
    path.write_text("".join(f"{phrase}\n{row}\n" for row in sample))
    return path


@pytest.fixture(scope="session")
def merged_run(tmp_path_factory):
    """One tiny 4-bit run that memorizes the pass phrase, merged with `merge --dtype fp32` (nf4-roundtrip).

    Shared by the merge, publish and inference tests; tests must not modify it (copy it first)."""
    root = tmp_path_factory.mktemp("merge")
    recipe = write_recipe(
        root / "recipe.yaml",
        output_dir=str(root / "run"),
        dataset_name=str(_phrase_dataset(root / "phrase.jsonl")),
        eval_split_size=8,
        # The phrase is asked in training and held out alike on purpose: the export must answer it word for word.
        on_eval_overlap="warn",
    )
    # Measured: 30 steps take the eval loss from 10.9 to 4.2 and the phrase is answered word for word.
    train = run_cli(
        "train", str(recipe), "--max_steps", "30", "--eval_strategy", "no", "--save_strategy", "no", env=SENTINELS
    )
    assert train.returncode == 0, train.stderr[-3000:]
    merge = run_cli("merge", str(root / "run"), "--dtype", "fp32", env=SENTINELS)
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-3000:]
    return {
        "run": root / "run",
        "export": root / "run" / "merged",
        "logs": train.stdout + train.stderr + merge.stdout + merge.stderr,
    }
