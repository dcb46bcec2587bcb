"""The corpus of broken inputs (tests/corpus/, listed in its README.md): each file ends in one clear `error:` line
naming the file and the line or key, a non-zero exit and no traceback; or, where the input is fine after all (a
byte-order mark, extra columns, a blank line) or the recipe says `on_bad_rows: skip`, in exit 0 and notes that
account for every row.

Most cases run in this process through `qlora_pipeline.cli.main` (what `qlora-pipeline` runs), which returns the exit
code and prints the error line, because each subprocess pays the ~7 s torch import; a few run the real CLI in a
subprocess to show the same end to end. Data cases use `preprocess`, which loads the tokenizer and never the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, run_cli, write_recipe

CORPUS = Path(__file__).resolve().parent / "corpus"
DATA = CORPUS / "data"
RECIPES = CORPUS / "recipes"
ADAPTERS = CORPUS / "adapters"
TMP = "{tmp}"  # in a case's arguments and fragments: the test's tmp_path


# ---------------------------------------------------------------- the cases


def _preprocess(name: str, *extra: str) -> list[str]:
    return ["preprocess", str(TINY_RECIPE), "--dataset_name", str(DATA / name), "--eval_split_size", "0.25", *extra]


def bad_data(name: str, fragments: list[str], *extra: str, id: str, subprocess: bool = False):
    """A data file that `preprocess` refuses: exit 2, the error line holds each fragment ({file}: the data file)."""
    file = DATA / name
    return pytest.param(_preprocess(name, *extra), 2, [f.format(file=file) for f in fragments], subprocess, id=id)


def good_data(name: str, fragments: list[str], *extra: str, id: str):
    """A data file that `preprocess` accepts: exit 0, stdout holds each fragment (notes, counts)."""
    file = DATA / name
    return pytest.param(_preprocess(name, *extra), 0, [f.format(file=file) for f in fragments], False, id=id)


def bad_recipe(name: str, fragments: list[str], id: str):
    """A recipe that `train` refuses while reading it (the run folder goes under tmp_path, should it get further)."""
    file = RECIPES / name
    argv = ["train", str(file), "--output_dir", f"{TMP}/run"]
    return pytest.param(argv, 2, [f.format(file=file) for f in fragments], False, id=id)


def bad_adapter(command: str, folder: str, fragments: list[str], id: str, subprocess: bool = False):
    """A run folder (copied under tmp_path first) whose adapter does not belong to its recipe's base model."""
    run = f"{TMP}/adapters/{folder}"
    argv = [command, run] + (["--prompt", "Name the hallmark."] if command == "generate" else [])
    return pytest.param(argv, 2, [f.format(run=run) for f in fragments], subprocess, id=id)


CASES = [
    # -- files that cannot be read at all (an error even with on_bad_rows: skip)
    bad_data("malformed.json", ["error: {file}:5:", "malformed JSON", "','"], id="json-malformed"),
    bad_data("latin1.jsonl", ["error: {file}:3:", "not UTF-8", "0xe9", "offset 397"], id="jsonl-latin1"),
    bad_data("latin1.csv", ["error: {file}:3:", "not UTF-8", "0xef"], id="csv-latin1"),
    bad_data("latin1.jsonl", ["error: {file}:3:", "not UTF-8"], "--on_bad_rows", "skip", id="latin1-even-with-skip"),
    bad_data("empty.jsonl", ["error: {file}:", "empty"], id="jsonl-empty"),
    bad_data("empty.csv", ["error: {file}:", "empty", "no header"], id="csv-empty"),
    bad_data("header-only.csv", ["error: {file}:", "header but no rows"], id="csv-header-only"),
    bad_data(
        "header-only.csv",
        ["error: {file}:", "header but no rows"],
        "--on_bad_rows",
        "skip",
        id="header-only-even-with-skip",
    ),
    bad_data(
        "missing-column.jsonl",
        ["error: {file}:", "missing column 'instruction'", "question, context, answer", "instruction_column"],
        id="jsonl-missing-column",
    ),
    bad_data(
        "missing-column.csv", ["error: {file}:", "missing column 'output'", "output_column"], id="csv-missing-column"
    ),
    bad_data("does-not-exist.jsonl", ["error: {file}:", "not found"], id="file-not-found"),
    # -- one bad row: the file and line named
    bad_data(
        "malformed.jsonl", ["error: {file}:3:", "malformed JSON line"], id="jsonl-malformed-line", subprocess=True
    ),
    bad_data("not-an-object.jsonl", ["error: {file}:2:", "expected a JSON object", "a list"], id="jsonl-not-an-object"),
    bad_data("ragged.csv", ["error: {file}:4:", "2 fields where the header has 3"], id="csv-ragged"),
    bad_data(
        "ragged-after-multiline.csv",
        ["error: {file}:5:", "4 fields where the header has 3"],
        id="csv-ragged-after-a-quoted-line-break",
    ),
    bad_data("empty-string.jsonl", ["error: {file}:5:", "'output' is empty"], id="jsonl-empty-string"),
    bad_data("whitespace-only.csv", ["error: {file}:3:", "'instruction' is empty"], id="csv-whitespace-only"),
    bad_data("null.jsonl", ["error: {file}:2:", "'output' is null"], id="jsonl-null"),
    bad_data("null-in-array.json", ["error: {file}: row 3:", "'instruction' is null"], id="json-array-null"),
    bad_data("missing-field.jsonl", ["error: {file}:4:", "'output' is missing"], id="jsonl-row-without-a-field"),
    bad_data("wrong-type.jsonl", ["error: {file}:3:", "'output' must be text", "a number (42)"], id="jsonl-number"),
    bad_data("wrong-type-input.jsonl", ["error: {file}:6:", "'input' must be text or null", "a list"], id="jsonl-list"),
    bad_data("duplicate-ids.jsonl", ["error: {file}:6:", "duplicate id 'r3'", "first at line 3"], id="jsonl-dup-ids"),
    bad_data("duplicate-ids.csv", ["error: {file}:6:", "duplicate id '2'", "first at line 3"], id="csv-dup-ids"),
    bad_data(
        "overlong.jsonl",
        ["error: {file}:7:", "over max_length 512", "overlong: error", "1 of 8"],
        "--eval_split_size",
        "0",
        "--overlong",
        "error",
        id="overlong-error",
    ),
    bad_data(
        "all-bad.jsonl",
        ["error: {file}:", "no rows left", "all 3 rows were skipped", "{file}:1: 'output' is null"],
        "--on_bad_rows",
        "skip",
        id="skip-leaves-nothing",
    ),
    # -- fine after all, and said so
    good_data("bom.csv", ["train rows 6  examples 6", "eval  rows 2  examples 2"], id="csv-bom"),
    good_data("bom.jsonl", ["train rows 6  examples 6", "eval  rows 2  examples 2"], id="jsonl-bom"),
    good_data(
        "extra-columns.jsonl",
        ["note: {file}: columns 'source', 'label_id' not used by the task; ignored", "train rows 6"],
        id="jsonl-extra-columns",
    ),
    good_data(
        "extra-columns.csv", ["note: {file}: column 'source' not used by the task; ignored"], id="csv-extra-columns"
    ),
    good_data(
        "blank-line.jsonl",
        ["note: {file}: 1 blank line ignored (line 4)", "rows  read 8 = train 6 + eval 2 + skipped 0"],
        id="jsonl-blank-line",
    ),
    good_data(
        "overlong.jsonl",
        ["train rows 8  examples 7", "over max_length 1  dropped 1", "rows  read 8 = train 8 + eval 0"],
        "--eval_split_size",
        "0",
        id="overlong-dropped-and-counted",
    ),
    good_data(
        "mixed.jsonl",
        [
            "note: {file}: 5 of 20 rows skipped (on_bad_rows: skip); first: {file}:3: 'output' is null",
            "note: {file}: 1 blank line ignored (line 11)",
            "skipped: {file}:3: 'output' is null",
            "skipped: {file}:6: malformed JSON line",
            "skipped: {file}:9: duplicate id 'm2' (first at line 2)",
            "skipped: {file}:13: 'output' must be text, got a number (7)",
            "skipped: {file}:16: 'instruction' is empty",
            "over max_length 1  dropped 1",
            "rows  read 20 = train 11 + eval 4 + skipped 5 + unused 0",
        ],
        "--on_bad_rows",
        "skip",
        id="skip-mixed",
    ),
    # -- recipes: the file and the key named
    bad_recipe(
        "typo-key.yaml", ["error: {file}:", "unknown key 'lerning_rate'", "did you mean 'learning_rate'"], id="typo"
    ),
    bad_recipe(
        "wrong-type.yaml", ["error: {file}:", "key 'learning_rate' must be a number", "'fast'"], id="wrong-type"
    ),
    bad_recipe("wrong-type-list.yaml", ["error: {file}:", "key 'lora_r' must be an integer"], id="mapping-not-int"),
    bad_recipe(
        "negative-learning-rate.yaml", ["error: {file}:", "'learning_rate'", "must be positive"], id="negative-lr"
    ),
    bad_recipe("unknown-template.yaml", ["error: {file}:", "'template'", "'chatml'", "'starling'"], id="template"),
    bad_recipe(
        "model-path-missing.yaml",
        ["error: {file}:", "'model_name_or_path'", "'./models/none'", "no", "Hub id"],
        id="model-path-missing",
    ),
    bad_recipe(
        "model-path-absolute-missing.yaml",
        ["error: {file}:", "'model_name_or_path'", "'/nonexistent/model'"],
        id="model-path-absolute-missing",
    ),
    bad_recipe("unknown-on-bad-rows.yaml", ["error: {file}:", "'on_bad_rows'", "'skip'", "'ignore'"], id="on_bad_rows"),
    bad_recipe("unknown-overlong.yaml", ["error: {file}:", "'overlong'", "'error'", "'clip'"], id="overlong-policy"),
    bad_recipe("not-yaml.yaml", ["error: {file}:", "not valid YAML at line 5"], id="not-yaml"),
    bad_recipe("latin1.yaml", ["error: {file}:", "not UTF-8", "byte"], id="recipe-latin1"),
    # -- an adapter whose base is not the recipe's model
    bad_adapter(
        "merge",
        "wrong-base",
        ["error: {run}/adapter:", "trained on 'meta-llama/Llama-3.2-1B'", "'embedded:tiny-starling'", "recipe.yaml"],
        id="merge-adapter-of-another-base",
        subprocess=True,
    ),
    bad_adapter(
        "generate",
        "wrong-base",
        ["error: {run}/adapter:", "trained on 'meta-llama/Llama-3.2-1B'", "model_name_or_path"],
        id="generate-adapter-of-another-base",
    ),
    bad_adapter(
        "generate",
        "wrong-shape",
        ["error: {run}/adapter:", "does not fit the base model 'embedded:tiny-starling'", "size mismatch"],
        id="generate-adapter-of-another-shape",
    ),
]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def built(embedded_cache) -> Path:
    """The tiny model built up front, so that no case's stderr carries the one-time build."""
    from qlora_pipeline.model import tiny

    tiny.resolve_model("embedded:tiny-starling")
    return embedded_cache


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory) -> Path:
    """A datasets cache of this module's own, in this process and in the subprocesses."""
    import datasets

    folder = tmp_path_factory.mktemp("hf-datasets-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
        yield folder


@pytest.fixture
def in_process(built, datasets_cache, cli_in_process):
    """in_process(argv) -> (exit code, stdout, stderr) of `qlora-pipeline ARGV` run in this process."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()

    def run(argv: list[str]) -> tuple[int, str, str]:
        result = cli_in_process(*argv)
        return result.returncode, result.stdout, result.stderr

    yield run
    if bars:  # generate turns the weight-loading bars off for the process
        hf_logging.enable_progress_bar()


def the_error_line(code: int, out: str, err: str, expected_code: int, notes_allowed: bool = False) -> str:
    """Exit `expected_code`, no traceback, one `error:` line on stderr and nothing else there (but `note:` lines,
    where the command prints its notes to stderr); returns that line."""
    output = f"--- exit {code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    assert code == expected_code, output
    assert "Traceback" not in out + err, output
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output
    others = [line for line in lines if not line.startswith("error:")]
    assert not others or (notes_allowed and all(line.startswith("note:") for line in others)), output
    return errors[0]


# ---------------------------------------------------------------- the corpus


def test_the_corpus_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("argv, expected_code, fragments, via_subprocess", CASES)
def test_corpus_case(argv, expected_code, fragments, via_subprocess, tmp_path, in_process, datasets_cache):
    argv = [arg.replace(TMP, str(tmp_path)) for arg in argv]
    fragments = [fragment.replace(TMP, str(tmp_path)) for fragment in fragments]
    if any(str(tmp_path / "adapters") in arg for arg in argv):
        shutil.copytree(ADAPTERS, tmp_path / "adapters")  # a merge that got too far must not write into the repo
    if via_subprocess:
        result = run_cli(*argv, env={"HF_DATASETS_CACHE": str(datasets_cache)}, timeout=300)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = in_process(argv)
    if expected_code == 0:
        output = f"--- exit {code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        assert code == 0, output
        assert "Traceback" not in out + err and "error:" not in err, output
        for fragment in fragments:
            assert fragment in out, f"{fragment!r} not in stdout\n{output}"
    else:
        line = the_error_line(code, out, err, expected_code, notes_allowed=argv[0] == "generate")
        for fragment in fragments:
            assert fragment in line, f"{fragment!r} not in {line!r}"


@pytest.mark.parametrize(
    "name, extra",
    [
        pytest.param("malformed.jsonl", [], id="malformed-line"),
        pytest.param("null.jsonl", [], id="null"),
        pytest.param("duplicate-ids.csv", [], id="duplicate-id"),
        pytest.param("missing-column.jsonl", [], id="missing-column"),
        pytest.param("overlong.jsonl", ["--overlong", "error", "--eval_split_size", "0"], id="overlong"),
    ],
)
def test_train_stops_on_bad_data_before_the_model_loads(name, extra, tmp_path, in_process, monkeypatch):
    from qlora_pipeline.model import loading as modeling

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(modeling, "load_model", load_model)
    argv = ["train", str(TINY_RECIPE), "--dataset_name", str(DATA / name), "--output_dir", str(tmp_path / "run")]
    line = the_error_line(*in_process(argv + extra), expected_code=2)
    assert line.startswith(f"error: {DATA / name}"), line


def test_skipped_rows_are_tokenized_from_cache_the_second_time(tmp_path, in_process, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    runs = [in_process(_preprocess("mixed.jsonl", "--on_bad_rows", "skip")) for _ in range(2)]
    assert [code for code, _, _ in runs] == [0, 0], runs
    assert "(tokenized now" in runs[0][1] and "(tokenized data read from cache)" in runs[1][1], runs[1][1]


# ---------------------------------------------------------------- on_bad_rows: skip, through training


def test_train_skips_bad_rows_and_accounts_for_every_row(tmp_path, in_process):
    """rows in the file = rows trained on + rows held out + rows skipped (listed) + examples dropped as too long."""
    data = DATA / "mixed.jsonl"
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        output_dir=str(tmp_path / "run"),
        dataset_name=str(data),
        on_bad_rows="skip",
        eval_split_size=0.25,
        optim="adamw_torch",
    )
    code, out, err = in_process(
        ["train", str(recipe), "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"]
    )
    assert code == 0, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    assert f"note: {data}: 5 of 20 rows skipped (on_bad_rows: skip)" in out, out
    listing = tmp_path / "run" / "skipped_rows.jsonl"
    assert f"listed in {listing}" in out, out

    skipped = [json.loads(line) for line in listing.read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in skipped] == [(str(data), n) for n in (3, 6, 9, 13, 16)], skipped
    assert all(r["reason"] for r in skipped)

    rows_in_file = sum(1 for line in data.read_text().splitlines() if line.strip())
    stats = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    train, evaluation = stats["train"], stats["eval"]
    assert stats["rows_read"] == rows_in_file == 20
    assert stats["skipped"] == len(skipped) == 5
    assert train["rows"] + evaluation["rows"] + stats["skipped"] + stats["unused"] == rows_in_file
    assert stats["unused"] == 0
    for split in (train, evaluation):
        assert split["examples"] + split["dropped"] == split["rows"], split
    assert train["dropped"] + evaluation["dropped"] == 1  # line 19, over max_length, dropped and counted
    used = train["examples"] + evaluation["examples"]
    assert used + stats["skipped"] + train["dropped"] + evaluation["dropped"] == rows_in_file
