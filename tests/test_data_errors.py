"""Bad training data ends in one `error:` line naming the file and, where there is one, the line.

Each case runs the real `preprocess` subcommand (`python -m qlora_pipeline preprocess RECIPE --dataset_name PATH`)
on a small file written under tmp_path. preprocess loads the tiny model's tokenizer (built once per session into
the shared cache) but never the model weights.

The runs keep warnings and progress bars on, as a user has them: the error must still be the only stderr line.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE, run_cli
from conftest import assert_clean_error as assert_one_error_line

SPLIT = ["--eval_split_size", "0.25"]


# ---------------------------------------------------------------- helpers


def run_preprocess(*args: str, datasets_cache: Path) -> subprocess.CompletedProcess:
    """`python -m qlora_pipeline ARGS` with its own datasets cache (the embedded-model cache is the session's)."""
    return run_cli(*args, env={"HF_DATASETS_CACHE": str(datasets_cache)}, timeout=300)


def valid_rows(n: int = 12) -> list[dict]:
    """Rows in the instruction/input/output schema; every other one has an empty input."""
    return [
        {
            "instruction": f"Name the hallmark of cancer in passage {i}.",
            "input": f"Passage {i}." if i % 2 else "",
            "output": f"Label {i}",
        }
        for i in range(n)
    ]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache(embedded_cache) -> Path:
    """The session-wide embedded-model cache (tests/conftest.py), with the tiny model built in it up front.

    Built here rather than by the first subprocess, so no test's stderr carries the one-time build's progress bar.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_PIPELINE_CACHE", str(embedded_cache))
        from qlora_pipeline.model import tiny

        tiny.resolve_model("embedded:tiny-starling")
    return embedded_cache


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-datasets-cache")


@pytest.fixture
def recipe(tmp_path) -> Path:
    """The tiny demo recipe, its run folder under tmp_path."""
    values = yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))
    values["output_dir"] = str(tmp_path / "run")
    return write(tmp_path / "recipe.yaml", yaml.safe_dump(values, sort_keys=False))


@pytest.fixture
def preprocess(recipe, cache, datasets_cache):
    """preprocess(data_path, *extra_args) -> the finished `preprocess` run on the tiny recipe."""

    def run(data: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("datasets_cache", datasets_cache)
        return run_preprocess("preprocess", str(recipe), "--dataset_name", str(data), *SPLIT, *extra, **kwargs)

    return run


# ---------------------------------------------------------------- bad files


# Every kind of broken data file is a case of the corpus in tests/corpus/ (tests/test_corpus.py, in-process);
# this file keeps what needs a real process: its own datasets cache, and the cache being read back.


def test_missing_dataset_file(tmp_path, preprocess):
    path = tmp_path / "no-such-data.jsonl"
    assert_one_error_line(preprocess(path), f"error: {path}:", "not found")


# ---------------------------------------------------------------- good files


def _stats_line(stdout: str, split: str) -> str:
    match = re.search(rf"^{split}\s+rows .*$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(0)


def test_column_mapping(tmp_path, preprocess):
    rows = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in valid_rows()]
    path = write(tmp_path / "mapped.jsonl", jsonl(rows))
    result = preprocess(
        path, "--instruction_column", "question", "--input_column", "context", "--output_column", "answer"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    # 12 rows, a quarter held out: 9 train, 3 eval, none over max_length.
    assert re.match(r"train\s+rows 9\s+examples 9\s", _stats_line(result.stdout, "train")), result.stdout
    assert re.match(r"eval\s+rows 3\s+examples 3\s", _stats_line(result.stdout, "eval")), result.stdout


def test_second_run_reads_tokenized_data_from_cache(tmp_path, preprocess):
    path = write(tmp_path / "data.jsonl", jsonl(valid_rows()))
    datasets_cache = tmp_path / "hf-datasets"
    first = preprocess(path, datasets_cache=datasets_cache)
    second = preprocess(path, datasets_cache=datasets_cache)
    for result in (first, second):
        assert result.returncode == 0, result.stderr[-3000:]
    for split in ("train", "eval"):
        assert "(tokenized now" in _stats_line(first.stdout, split), first.stdout
        assert "(tokenized data read from cache)" in _stats_line(second.stdout, split), second.stdout
