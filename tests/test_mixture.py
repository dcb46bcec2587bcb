"""Data mixtures (`dataset_mixture`) and the data checks before training (duplicates, train/eval overlap).

The mixture tests run the pipeline's own data step (`tasks.prepare_data`, what `preprocess` and `train` run) on real
files: the embedded samples everywhere, and the real Llama2-MedTuned rows of ../shared/data in CI. What training
sees is read from the trainer's own dataloader (packed rows split at their position resets). Errors go through the
real CLI in this process: they stop before any model loads.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, assert_clean_error, write_recipe

MEDTUNED = SHARED_DATA / "medtuned"
SAMPLE = "embedded:medtuned-sample"
SYMPTOMS = "embedded:symptoms-sample"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(n: int, tag: str = "passage") -> list[dict]:
    return [
        {"instruction": f"Name the hallmark in {tag} {i}.", "input": f"Text of {tag} {i}.", "output": f"Label {i % 3}"}
        for i in range(n)
    ]


def _mixture_recipe(tmp_path: Path, sources: list[dict], **changes) -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml",
        output_dir=str(tmp_path / "run"),
        dataset_name=None,
        dataset_mixture=sources,
        **changes,
    )


def _prepare(recipe: Path, *overrides: str):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import prepare_data

    return prepare_data(load_recipe(recipe, list(overrides)))


def _adds_up(accounting: dict) -> None:
    """Per source: rows read = train + eval + skipped + unused, none negative; the totals add up the same way."""
    for name, counts in accounting["sources"].items():
        parts = [counts[key] for key in ("train", "eval", "skipped", "unused")]
        assert min(parts) >= 0 and sum(parts) == counts["rows_read"], (name, counts)
        assert counts["draws"] >= counts["train"], (name, counts)


# ---------------------------------------------------------------- recipe errors: before anything loads


@pytest.mark.parametrize(
    ("sources", "fragments"),
    [
        (
            [{"path": SAMPLE, "weight": 1}, {"path": SYMPTOMS, "weight": 0}],
            ["source 2 (embedded:symptoms-sample)", "above 0"],
        ),
        ([{"path": SAMPLE, "weight": -0.5}], ["source 1", "'weight' must be a number above 0, got -0.5"]),
        ([{"path": SAMPLE, "weight": 1}, {"path": SYMPTOMS}], ["give every source a weight or none"]),
        ([{"path": SAMPLE, "wieght": 1}], ["unknown key 'wieght'", "did you mean 'weight'"]),
        ([{"path": SAMPLE, "rows": 10, "fraction": 0.5}], ["give 'rows' or 'fraction', not both"]),
        ([{"path": SAMPLE, "streaming": True}], ["'streaming' needs 'rows'"]),
        ([{"path": SAMPLE, "fraction": 2}], ["set replace: true"]),
        ([{"path": SAMPLE}, {"path": SAMPLE}], ["two sources are named 'medtuned-sample'"]),
        ([{"weight": 1}], ["needs `path`"]),
        ([], ["must be a list of sources"]),
    ],
)
def test_a_bad_mixture_entry_is_one_error_naming_the_source(tmp_path, cli_in_process, sources, fragments):
    recipe = _mixture_recipe(tmp_path, sources)
    assert_clean_error(cli_in_process("preprocess", str(recipe)), "dataset_mixture", *fragments)


def test_dataset_name_and_a_mixture_together_are_refused(tmp_path, cli_in_process):
    recipe = _mixture_recipe(tmp_path, [{"path": SAMPLE}])
    result = cli_in_process("preprocess", str(recipe), "--dataset_name", SAMPLE)
    assert_clean_error(result, "dataset_mixture", "both set")


# ---------------------------------------------------------------- data errors: named by file and source


def test_a_source_with_no_rows_or_a_missing_column_is_named(tmp_path, cli_in_process):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = _mixture_recipe(tmp_path, [{"path": SAMPLE, "weight": 1}, {"path": str(empty), "weight": 1}])
    assert_clean_error(cli_in_process("preprocess", str(recipe)), "empty.jsonl", "empty")

    notes = _jsonl(tmp_path / "notes.jsonl", [{"question": "q", "answer": "a"}] * 3)
    recipe = _mixture_recipe(tmp_path, [{"path": SAMPLE}, {"path": str(notes), "output_column": "answer"}])
    assert_clean_error(
        cli_in_process("preprocess", str(recipe)),
        "notes.jsonl",
        "missing column 'instruction'",
        "of source 'notes' in dataset_mixture",
    )


def test_more_rows_than_a_source_has_needs_replacement(tmp_path, cli_in_process):
    recipe = _mixture_recipe(tmp_path, [{"path": SAMPLE, "rows": 1000}])
    assert_clean_error(cli_in_process("preprocess", str(recipe)), "rows 1000", "medtuned-sample", "replace: true")


def test_a_source_renders_with_its_own_template_and_must_end_answers_alike(tmp_path, cli_in_process):
    symptoms = {"path": SYMPTOMS, "input_column": None, "template": "alpaca"}
    recipe = _mixture_recipe(tmp_path, [{"path": SAMPLE}, symptoms])
    prepared = _prepare(recipe)
    texts = {
        source: prepared.tokenizer.decode(ids)
        for ids, source in zip(prepared.train.dataset["input_ids"], prepared.train.example_sources)
    }
    symptoms_text, medtuned_text = texts["symptoms-sample"], texts["medtuned-sample"]
    assert "Below is an instruction" in symptoms_text[:30] and "### Response:\n" in symptoms_text
    assert "GPT4 Correct User: " in medtuned_text[:25] and "### Response" not in medtuned_text
    assert all(text.endswith("<|end_of_turn|>") for text in texts.values()), "Starling's EOS ends both"

    # GPT-2's EOS is not the Starling template's end of turn: two ways to stop, refused.
    gpt2 = cli_in_process("preprocess", str(recipe), "--model_name_or_path", "embedded:tiny-distilgpt2")
    assert_clean_error(gpt2, "symptoms-sample", "'alpaca' ends answers with '<|endoftext|>'", "one way to stop")


# ---------------------------------------------------------------- the data checks


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    """20 training rows with two planted copies (line 8 = line 3 up to whitespace; line 20 = line 4) and an eval
    file whose line 2 asks training line 6's question (instruction and input) with another answer."""
    train = _rows(18)
    train.insert(7, {**train[2], "instruction": "  " + train[2]["instruction"].replace(" ", "\n ", 1)})
    train.append(dict(train[3]))
    held_out = _rows(3, tag="held-out text")
    held_out[1] = {**train[5], "output": "Another label"}
    return _jsonl(tmp_path / "train.jsonl", train), _jsonl(tmp_path / "eval.jsonl", held_out)


def test_planted_overlap_stops_the_run_and_every_finding_names_file_and_line(tmp_path, cli_in_process):
    train, held_out = _planted(tmp_path)
    recipe = write_recipe(
        tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), dataset_name=str(train), eval_file=str(held_out)
    )
    refused = assert_clean_error(cli_in_process("preprocess", str(recipe)), f"{train}:6 = {held_out}:2")
    assert "1 training row has the same instruction and input as a held-out row" in refused
    assert "on_eval_overlap: drop" in refused
    # train refuses the same way, before the model loads: no adapter, no checkpoint.
    assert_clean_error(cli_in_process("train", str(recipe)), f"{train}:6 = {held_out}:2")
    assert not (tmp_path / "run" / "adapter").exists()

    warned = cli_in_process("preprocess", str(recipe), "--on_eval_overlap", "warn")
    assert warned.returncode == 0, warned.stderr
    assert f"  {train}:8 = {train}:3\n  {train}:20 = {train}:4\n" in warned.stdout, "duplicates, whitespace aside"
    assert f"  {train}:6 = {held_out}:2\n" in warned.stdout
    assert "duplicates 2 (copy = first)  train/eval overlap 1" in warned.stdout
    assert "train rows 20 " in warned.stdout

    dropped = cli_in_process("preprocess", str(recipe), "--on_eval_overlap", "drop", "--on_duplicate_rows", "drop")
    assert dropped.returncode == 0, dropped.stderr
    assert f"skipped: {train}:6: same instruction and input as held-out row {held_out}:2" in dropped.stdout
    assert f"skipped: {train}:8: duplicate of {train}:3" in dropped.stdout
    assert "train rows 17 " in dropped.stdout and "skipped 3 " in dropped.stdout

    duplicates_refused = cli_in_process(
        "preprocess", str(recipe), "--on_eval_overlap", "warn", "--on_duplicate_rows", "error"
    )
    assert_clean_error(duplicates_refused, f"{train}:8 = {train}:3", "2 training rows repeat an earlier one")


def test_a_mixture_finds_overlap_across_sources_and_trains_with_it_dropped(tmp_path, cli_in_process):
    """The same question in two sources: source B's copy of a held-out row of the eval file is found and left out;
    the run then trains, and the summary, report and model card carry the per-source counts."""
    a = _jsonl(tmp_path / "a.jsonl", _rows(30))
    b_rows = _rows(20, tag="note")
    held_out_rows = _rows(4, tag="held-out text")
    b_rows[11] = {**held_out_rows[2], "output": "Label 0"}
    b = _jsonl(tmp_path / "b.jsonl", b_rows)
    held_out = _jsonl(tmp_path / "eval.jsonl", held_out_rows)
    sources = [{"path": str(a), "weight": 3}, {"path": str(b), "name": "notes", "weight": 1}]
    recipe = _mixture_recipe(tmp_path, sources, eval_file=str(held_out), on_eval_overlap="drop")
    train = cli_in_process(
        "train", str(recipe), "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--max_length", "64"
    )
    assert train.returncode == 0, train.stderr[-3000:]
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped_rows.jsonl").read_text().splitlines()]
    assert skipped == [
        {
            "file": str(b),
            "line": 12,
            "reason": f"same instruction and input as held-out row {held_out}:3 (on_eval_overlap: drop)",
        }
    ]
    findings = json.loads((tmp_path / "run" / "data_checks.json").read_text())
    assert findings["eval_overlap"] == [{"row": f"{b}:12", "held_out": f"{held_out}:3"}]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    data = summary["data"]
    _adds_up(data)
    assert data["sources"]["notes"]["skipped"] == 1 and data["checks"]["overlaps"] == 1
    assert set(data["train"]["sources"]) == {"a", "notes"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "### Sources" in report and "| notes | 1 | 20 |" in report
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "**Source notes:** b.jsonl (split train, weight 1)" in card and "| a | 3 | 30 |" in card


def test_streaming_reads_only_the_rows_it_takes(tmp_path, cli_in_process):
    """A source too large to read whole: `streaming: true` takes its first `rows` rows through datasets' streaming
    reader. The file's last line is malformed, past the reader's first block: read whole, it is an error."""
    big = tmp_path / "big.jsonl"
    rows = _rows(60_000, tag="long passage text to make the file larger than one block of the json reader")
    big.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n", encoding="utf-8")
    assert big.stat().st_size > 12 * 2**20
    whole = _mixture_recipe(tmp_path, [{"path": SAMPLE, "weight": 1}, {"path": str(big), "weight": 1}])
    assert_clean_error(cli_in_process("preprocess", str(whole)), f"{big}:60001", "malformed JSON")

    streamed = [{"path": SAMPLE, "weight": 1}, {"path": str(big), "weight": 1, "streaming": True, "rows": 40}]
    prepared = _prepare(_mixture_recipe(tmp_path, streamed, eval_split_size=0.25))
    counts = prepared.accounting["sources"]["big"]
    assert counts["rows_read"] == 40 and counts["eval"] == 10 and counts["train"] == 30
    _adds_up(prepared.accounting)


def test_rows_with_replacement_fraction_and_column_mapping(tmp_path):
    """An up-weighted small source (rows above its size, with replacement), half of another, and a source without
    an input column; no weights: concatenated and shuffled. The same recipe and seed give the same mixture."""
    sources = [
        {"path": SAMPLE, "rows": 500, "replace": True},
        {"path": SYMPTOMS, "input_column": None, "fraction": 0.5},
    ]
    recipe = _mixture_recipe(tmp_path, sources, max_length=256)
    prepared = _prepare(recipe)
    counts = prepared.accounting["sources"]
    _adds_up(prepared.accounting)
    assert counts["medtuned-sample"]["draws"] == 500 and counts["medtuned-sample"]["train"] < 216
    assert counts["medtuned-sample"]["eval"] == 24 and counts["symptoms-sample"]["eval"] == 19
    assert counts["symptoms-sample"]["draws"] == counts["symptoms-sample"]["train"] == round(0.5 * (190 - 19))
    order = prepared.train.example_sources
    assert order[:50].count("medtuned-sample") not in (0, 50), "the two sources are shuffled together"

    again = _prepare(recipe)
    assert again.train.dataset["input_ids"] == prepared.train.dataset["input_ids"]
    other_seed = _prepare(recipe, "--seed", "7")
    assert other_seed.train.dataset["input_ids"] != prepared.train.dataset["input_ids"]


# ---------------------------------------------------------------- real MedTuned rows (CI)


def _examples_in_batches(trainer, sources_by_tokens: dict) -> Counter:
    """The source of every example in the training dataloader's packed rows: each row split where its positions
    restart, each piece looked up by its tokens."""
    found = Counter()
    for batch in trainer.get_train_dataloader():
        for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for start, end in zip(starts, starts[1:]):
                piece = tuple(token for token in ids[start:end] if token != trainer.processing_class.pad_token_id)
                if piece:
                    found[sources_by_tokens[piece]] += 1
    return found


@pytest.mark.shared_data
@pytest.mark.skipif(not (MEDTUNED / "cls_hoc-sample.jsonl").is_file(), reason="../shared/data is in CI only")
def test_real_medtuned_mixture_matches_its_weights_in_the_packed_batches(tmp_path):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages.train import build_trainer

    weights = {"medtuned-sample": 0.4, "ner_ncbi_disease": 0.2, "re_gad-train": 0.3, "cls_hoc-sample": 0.1}
    sources = [
        {"path": SAMPLE, "weight": weights["medtuned-sample"]},
        {"path": str(MEDTUNED / "ner_ncbi_disease.jsonl"), "weight": weights["ner_ncbi_disease"]},
        {"path": str(MEDTUNED / "re_gad-train.jsonl"), "weight": weights["re_gad-train"], "rows": 1500},
        {"path": str(MEDTUNED / "cls_hoc-sample.jsonl"), "weight": weights["cls_hoc-sample"]},
    ]
    # GAD's real rows hold exact copies, some of which land on both sides of the split: dropped from training.
    recipe = _mixture_recipe(tmp_path, sources, on_eval_overlap="drop", num_train_epochs=1)
    prepared = _prepare(recipe)
    _adds_up(prepared.accounting)
    assert prepared.accounting["rows_read"] == 240 + 923 + 4796 + 300
    duplicates = prepared.checks.duplicates
    assert duplicates and all("re_gad-train.jsonl" in f.row and "re_gad-train.jsonl" in f.first for f in duplicates)
    held_out = Counter(prepared.eval_rows["__source__"])
    assert held_out == {"medtuned-sample": 24, "ner_ncbi_disease": 93, "re_gad-train": 480, "cls_hoc-sample": 30}

    # What training sees: the trainer's own packed batches over the run's one epoch.
    trainer, _ = build_trainer(load_recipe(recipe), prepared)
    by_tokens = dict(zip(map(tuple, prepared.train.dataset["input_ids"]), prepared.train.example_sources))
    seen = _examples_in_batches(trainer, by_tokens)
    total = sum(seen.values())
    assert total == len(prepared.train.dataset) > 400
    for name, weight in weights.items():
        error = 4 * math.sqrt(weight * (1 - weight) / total)  # four standard errors of a share of `total` draws
        assert abs(seen[name] / total - weight) <= error, (name, seen[name] / total, weight, error)

    again = _prepare(recipe)
    assert again.train.example_sources == prepared.train.example_sources
    assert again.train.dataset["input_ids"] == prepared.train.dataset["input_ids"]


def test_the_starling_recipes_commented_mixture_is_a_valid_one():
    """The Starling recipe's commented example, uncommented, passes the mixture's checks as written."""
    import yaml

    from qlora_pipeline.recipe.mixture import parse_mixture

    lines = (REPO / "recipes" / "starling-7b-medtuned-qlora.yaml").read_text().splitlines()
    start = lines.index("# dataset_mixture:")
    block = [lines[start][2:]]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    entries = yaml.safe_load("\n".join(block))["dataset_mixture"]

    def fail(key, message):
        raise AssertionError(f"{key}: {message}")

    sources = parse_mixture(entries, {"dataset_split": "train", "input_column": "input", "template": "starling"}, fail)
    assert sources[0].path == "nlpie/Llama2-MedTuned-Instructions" and len(sources) >= 2
    assert all(source.weight for source in sources), "the example weighs every source"
    assert "\n".join(["```yaml", *lines[start : start + len(block)], "```"]) in (REPO / "README.md").read_text(), (
        "the README shows the recipe's block as it is"
    )
