"""The MedTuned generation metric: recognising each row's family, parsing answers, and the scores against
hand-computed cases (NER equal to seqeval called directly); the held-out rows checked before any model loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from conftest import SHARED_DATA, assert_clean_error, write_recipe

from qlora_pipeline.tasks.metrics import medtuned as mm

DATA = SimpleNamespace(instruction_column="instruction", input_column="input", output_column="output")

NER_INSTRUCTION = "Tag the diseases in the sentence using the BIO scheme: B, I and O, one 'word : label' per line."
GAD_INSTRUCTION = (
    "Classify the relationship between @GENE$ and @DISEASE$ as either:\n"
    "Positive: If there is an evident relation.\nNegative: If there is no discernible relation."
)
NLI_INSTRUCTION = "Label the premise and hypothesis pair as entailment, contradiction or neutral."
HALLMARKS = ["Sustaining proliferative signaling (PS)", "Evading growth suppressors (GS)", "Resisting cell death (CD)"]
HOC_INSTRUCTION = (
    "This task is a multi-class classification, and you are required to assign one or more labels from the "
    "following list to the input text if they are applicable:\n" + "\n".join(HALLMARKS) + "\nNone"
)


def ner_row(words: list[str], tags: list[str]) -> dict:
    return {
        "instruction": NER_INSTRUCTION,
        "input": " ".join(words),
        "output": "\n".join(f"{w} : {t}" for w, t in zip(words, tags)),
    }


def ner_answer(words: list[str], tags: list[str]) -> str:
    return "\n".join(f"{w} : {t}" for w, t in zip(words, tags))


SENTENCE_A = ["Iron", "deficiency", "anemia", "and", "heart", "failure", "."]
TAGS_A = ["B", "I", "I", "O", "B", "I", "O"]
SENTENCE_B = ["BRCA1", "causes", "breast", "cancer"]
TAGS_B = ["O", "O", "B", "I"]


def found_rows(rows: list[dict], family_column: str | None = None) -> list[mm.ScoredRow]:
    def bad(index, reason):
        raise AssertionError(f"row {index}: {reason}")

    dataset = datasets.Dataset.from_list(rows)
    return mm.scored_rows(dataset, DATA, family_column, "sample", lambda i: f"sample.jsonl:{i + 1}", bad)


def scores(rows: list[dict], answers: list[str]) -> tuple[dict, list[dict]]:
    found = found_rows(rows)
    return mm.score(found, {row.index: answers[row.index] for row in found}, mm.label_sets(found))


# ---------------------------------------------------------------- recognising rows


def test_each_family_is_recognised_from_the_gold_answer_and_the_instruction():
    rows = [
        ner_row(SENTENCE_A, TAGS_A),
        {"instruction": GAD_INSTRUCTION, "input": "@GENE$ in @DISEASE$.", "output": "Positive"},
        {"instruction": NLI_INSTRUCTION, "input": "P / H", "output": "neutral"},
        {"instruction": "Answer with yes, no or maybe.", "input": "Q", "output": "maybe"},
        {"instruction": HOC_INSTRUCTION, "input": "Text.", "output": "None"},
        {"instruction": HOC_INSTRUCTION, "input": "Text.", "output": f"{HALLMARKS[0]}, {HALLMARKS[2]}"},
        {"instruction": "Pick one:\n- Alpha\n- Beta", "input": "x", "output": "Beta"},
        {"instruction": "Answer briefly: what is asthma?", "input": "", "output": "A chronic airway disease."},
    ]
    found = found_rows(rows)
    assert [row.subtask for row in found] == [
        "ner",
        "re",
        "nli",
        "qa",
        "multilabel",
        "multilabel",
        "classification",
        None,
    ]
    assert found[4].gold == set() and found[5].gold == {HALLMARKS[0], HALLMARKS[2]}
    assert found[0].gold == list(zip(SENTENCE_A, TAGS_A))


def test_the_family_column_overrides_recognition():
    rows = [
        {"instruction": "Say it.", "input": "x", "output": "Beta", "family": "single_label"},
        {"instruction": GAD_INSTRUCTION, "input": "x", "output": "Positive", "family": "none"},
        {"instruction": GAD_INSTRUCTION, "input": "x", "output": "Negative", "family": None},
    ]
    rows.append({"instruction": "Tag it.", "input": "x", "output": "Alpha, Beta", "family": "multi_label"})
    found = found_rows(rows, family_column="family")
    assert [row.family for row in found] == ["single_label", None, "single_label", "multi_label"]
    assert found[3].gold == {"Alpha", "Beta"}, "no labels listed: the gold answer's parts are the labels"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"instruction": HOC_INSTRUCTION, "input": "x", "output": "Curing cancer (CC)"}, "not 'None' or labels"),
        ({"instruction": "x", "input": "x", "output": "Iron B\nanemia I", "family": "ner"}, "word : B|I|O"),
        ({"instruction": "x", "input": "x", "output": "a label", "family": "no_such"}, "is none of ner"),
    ],
)
def test_a_gold_answer_that_does_not_parse_as_its_family_is_named(row, reason):
    with pytest.raises(ValueError, match=reason):
        mm.recognise(row["instruction"], row["output"], row.get("family"))


def test_labels_are_read_from_the_instruction_with_their_abbreviations():
    assert mm.listed_options(GAD_INSTRUCTION) == ["Positive", "Negative"]
    assert mm.listed_options(HOC_INSTRUCTION) == [*HALLMARKS, "None"]
    labels = mm.LabelSet()
    for option in mm.listed_options(HOC_INSTRUCTION):
        labels.add(option)
    assert labels.labels == HALLMARKS, "None is the empty set, not a label"
    assert labels.parse_many("PS; resisting cell death") == ({HALLMARKS[0], HALLMARKS[2]}, True)
    assert labels.parse_many("none") == (set(), True)
    assert labels.parse_many("PS, cures cancer") == ({HALLMARKS[0]}, False)
    assert labels.parse_many("") == (set(), False)


# ---------------------------------------------------------------- scores, hand-computed


def test_gold_answers_score_100_in_every_family():
    rows = [
        ner_row(SENTENCE_A, TAGS_A),
        ner_row(SENTENCE_B, TAGS_B),
        {"instruction": GAD_INSTRUCTION, "input": "x", "output": "Positive"},
        {"instruction": GAD_INSTRUCTION, "input": "y", "output": "Negative"},
        {"instruction": HOC_INSTRUCTION, "input": "z", "output": "None"},
        {"instruction": HOC_INSTRUCTION, "input": "w", "output": f"{HALLMARKS[1]}, {HALLMARKS[2]}"},
    ]
    metrics, records = scores(rows, [row["output"] for row in rows])
    assert metrics["task_score"] == 100 and metrics["parsed"] == 100 and metrics["n"] == 6
    for name in ("ner/entity_f1", "ner/token_accuracy", "re/accuracy", "re/macro_f1", "re/micro_f1"):
        assert metrics[name] == 100, name
    assert metrics["multilabel/micro_f1"] == 100 and metrics["multilabel/example_f1"] == 100
    assert all(record["parsed"] and record["score"] == 100 for record in records)


def test_ner_a_wrong_boundary_and_a_missing_entity():
    rows = [ner_row(SENTENCE_A, TAGS_A), ner_row(SENTENCE_B, TAGS_B)]
    wrong_boundary = ["B", "I", "O", "O", "B", "I", "O"]  # "Iron deficiency" instead of "Iron deficiency anemia"
    missing = ["O", "O", "O", "O"]  # "breast cancer" not found
    metrics, records = scores(rows, [ner_answer(SENTENCE_A, wrong_boundary), ner_answer(SENTENCE_B, missing)])
    # Gold entities 3, predicted 2 (one right): precision 1/2, recall 1/3, F1 0.4; tokens right 6/7 + 2/4 = 8/11.
    assert metrics["ner/entity_precision"] == 50.0
    assert metrics["ner/entity_recall"] == 33.33
    assert metrics["ner/entity_f1"] == 40.0
    assert metrics["ner/token_accuracy"] == 72.73
    assert metrics["ner/parsed"] == 100.0
    assert [record["score"] for record in records] == [50.0, 0.0]


def test_ner_figures_equal_seqeval_called_directly():
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    rows = [ner_row(SENTENCE_A, TAGS_A), ner_row(SENTENCE_B, TAGS_B)]
    predicted = [["B", "I", "I", "O", "O", "B", "O"], ["I", "O", "B", "I"]]  # a stray I counts as nothing (strict)
    metrics, _ = scores(rows, [ner_answer(SENTENCE_A, predicted[0]), ner_answer(SENTENCE_B, predicted[1])])
    truth = [[t if t == "O" else f"{t}-ENT" for t in tags] for tags in (TAGS_A, TAGS_B)]
    guess = [[t if t == "O" else f"{t}-ENT" for t in tags] for tags in predicted]
    strict = {"mode": "strict", "scheme": IOB2}
    assert metrics["ner/entity_f1"] == round(100 * f1_score(truth, guess, **strict), 2)
    assert metrics["ner/entity_precision"] == round(100 * precision_score(truth, guess, **strict), 2)
    assert metrics["ner/entity_recall"] == round(100 * recall_score(truth, guess, **strict), 2)
    assert metrics["ner/token_accuracy"] == round(100 * accuracy_score(truth, guess), 2)


def test_ner_lines_are_aligned_to_the_input_words():
    rows = [ner_row(SENTENCE_A, TAGS_A)]
    # One word left out and one made up: the rest still lines up; the row does not count as parsed.
    shuffled = "Iron : B\ndeficiency : I\nanemia : I\nand : O\nheart : B\nfailures : I\n. : O"
    metrics, records = scores(rows, [shuffled])
    assert metrics["ner/parsed"] == 0.0 and records[0]["parsed"] is False
    # "heart" is a lone B (its I was on the misspelt word): gold 2 entities, predicted 2, 1 right.
    assert metrics["ner/entity_f1"] == 50.0
    unparseable, _ = scores(rows, ["I cannot tag this sentence."])
    assert unparseable["ner/parsed"] == 0.0 and unparseable["ner/entity_f1"] == 0.0


def test_single_label_a_wrong_and_an_invalid_label():
    rows = [
        {"instruction": GAD_INSTRUCTION, "input": str(i), "output": gold}
        for i, gold in enumerate(["Positive", "Negative", "Negative", "Positive"])
    ]
    answers = ["positive.", "Positive", "Negative: no relation is stated", "maybe?"]
    metrics, records = scores(rows, answers)
    # Right: rows 1 and 3. Positive: TP 1, FP 1, FN 1 → F1 0.5; Negative: TP 1, FP 0, FN 1 → F1 2/3.
    assert metrics["re/accuracy"] == 50.0
    assert metrics["re/macro_f1"] == 58.33
    # Micro over the two labels: TP 2, FP 1, FN 2 → 2·2 / (2·2 + 1 + 2) = 4/7 (the invalid answer is no label).
    assert metrics["re/micro_f1"] == 57.14
    assert metrics["re/parsed"] == 75.0
    assert [record["parsed"] for record in records] == [True, True, True, False]


def test_multi_label_a_partly_right_set_and_an_invalid_part():
    rows = [
        {"instruction": HOC_INSTRUCTION, "input": "a", "output": f"{HALLMARKS[0]}, {HALLMARKS[1]}"},
        {"instruction": HOC_INSTRUCTION, "input": "b", "output": "None"},
        {"instruction": HOC_INSTRUCTION, "input": "c", "output": HALLMARKS[2]},
    ]
    answers = [HALLMARKS[0], "None", "CD, banana"]
    metrics, records = scores(rows, answers)
    # Micro over the labels: TP 2 (PS, CD), FP 0, FN 1 (GS) → 0.8. Per example: 2/3, 1 (None for None), and
    # {CD} against {CD, invalid}: 2/3 → mean 7/9.
    assert metrics["multilabel/micro_f1"] == 80.0
    assert metrics["multilabel/example_f1"] == 77.78
    assert metrics["multilabel/parsed"] == 66.67
    assert [record["score"] for record in records] == [66.67, 100.0, 66.67]


def test_an_unparseable_answer_is_never_right_not_even_for_none():
    rows = [{"instruction": HOC_INSTRUCTION, "input": "b", "output": "None"}]
    metrics, _ = scores(rows, ["Negative"])
    assert metrics["multilabel/example_f1"] == 0.0 and metrics["multilabel/parsed"] == 0.0


def test_the_overall_line_and_unscored_rows():
    rows = [
        ner_row(SENTENCE_B, TAGS_B),
        {"instruction": GAD_INSTRUCTION, "input": "x", "output": "Positive"},
        {"instruction": "Answer briefly.", "input": "", "output": "A long free-text answer about asthma."},
    ]
    metrics, records = scores(rows, [ner_answer(SENTENCE_B, TAGS_B), "Negative", "whatever"])
    assert metrics["task_score"] == 50.0, "the mean of NER F1 100 and the RE macro-F1 0"
    assert metrics["parsed"] == 100.0 and metrics["n"] == 2 and metrics["n_unscored"] == 1
    assert "sample.jsonl:3" in metrics["notes"][0]
    assert records[2]["subtask"] is None and records[2]["prediction"] is None


def test_token_budgets_come_from_the_input_and_the_labels_never_the_gold_answer():
    from conftest import TINY_RECIPE

    from qlora_pipeline.data.templates import get_template
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import causal_lm as modeling

    recipe = load_recipe(TINY_RECIPE)
    tokenizer, _ = modeling.load_tokenizer(recipe.model, recipe.training, get_template("starling"))
    long_row, short_row = found_rows([ner_row(SENTENCE_A, TAGS_A), ner_row(SENTENCE_A[:2], TAGS_A[:2])])
    short_row.input = long_row.input  # same input, a gold answer of two lines: the budget stays the same
    assert mm.token_budget(long_row, None, tokenizer) == mm.token_budget(short_row, None, tokenizer)
    answer_tokens = len(tokenizer(ner_answer(SENTENCE_A, TAGS_A), add_special_tokens=False)["input_ids"])
    assert mm.token_budget(long_row, None, tokenizer) >= answer_tokens + 1
    hoc = found_rows([{"instruction": HOC_INSTRUCTION, "input": "x", "output": "None"}])
    sets = mm.label_sets(hoc)
    everything = ", ".join(HALLMARKS)
    assert mm.token_budget(hoc[0], sets["multilabel"], tokenizer) > len(tokenizer(everything)["input_ids"])


# ---------------------------------------------------------------- the held-out rows, before any model loads


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_several_eval_files_are_scored_under_their_own_names(tmp_path):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import prepare_data

    gad = _jsonl(
        tmp_path / "re_gad.jsonl",
        [{"instruction": GAD_INSTRUCTION, "input": str(i), "output": "Positive"} for i in range(5)],
    )
    ner = _jsonl(tmp_path / "ner_ncbi.jsonl", [ner_row(SENTENCE_B, TAGS_B)] * 3)
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            output_dir=str(tmp_path / "run"),
            generation_metric="medtuned",
            eval_file=[str(gad), str(ner)],
            max_eval_samples=4,
        )
    )
    prepared = prepare_data(recipe)
    found = prepared.extra["medtuned_rows"]
    assert [row.subtask for row in found] == ["re_gad/re"] * 4 + ["ner_ncbi/ner"] * 3, "at most 4 of each file"
    assert found[4].where == f"{ner}:1"
    assert prepared.accounting["unused"] == 1  # the fifth GAD row
    assert len(prepared.eval.dataset) == 7


def test_a_bad_gold_answer_is_named_by_file_and_line_or_skipped_and_listed(tmp_path, cli_in_process):
    rows = [{"instruction": HOC_INSTRUCTION, "input": "x", "output": "None"}] * 3
    rows.insert(1, {"instruction": HOC_INSTRUCTION, "input": "y", "output": "Curing cancer"})
    held_out = _jsonl(tmp_path / "hoc.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=str(tmp_path / "run"), generation_metric="medtuned", eval_file=str(held_out)
    )
    result = cli_in_process("preprocess", str(recipe))
    assert_clean_error(result, f"{held_out}:2", "generation_metric medtuned", "Curing cancer")

    result = cli_in_process("preprocess", str(recipe), "--on_bad_rows", "skip")
    assert result.returncode == 0, result.stderr
    assert "1 held-out rows whose gold answer does not parse were skipped" in result.stdout
    assert "skipped 1" in result.stdout


def test_held_out_rows_of_no_scorable_family_leave_the_run_without_task_scores(tmp_path, cli_in_process):
    held_out = _jsonl(tmp_path / "qa.jsonl", [{"instruction": "Answer briefly.", "input": "", "output": "Asthma."}] * 2)
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=str(tmp_path / "run"), generation_metric="medtuned", eval_file=str(held_out)
    )
    result = cli_in_process("preprocess", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "none of the 2 held-out rows" in result.stdout and "no task scores" in result.stdout


def test_recipe_combinations_the_metric_cannot_serve(tmp_path, cli_in_process):
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=str(tmp_path / "run"), generation_metric=None, metric_family_column="family"
    )
    assert_clean_error(cli_in_process("preprocess", str(recipe)), "metric_family_column", "medtuned only")
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=str(tmp_path / "run"), generation_metric="medtuned", eval_split_size=0
    )
    result = cli_in_process("preprocess", str(recipe))
    assert result.returncode == 0 and "no held-out rows" in result.stdout and "no task scores" in result.stdout


# ---------------------------------------------------------------- the real MedTuned rows, end to end (CI)

MEDTUNED = SHARED_DATA / "medtuned"
STEPS = "50"  # measured: 50 steps take GAD and HoC answers to 100% parsed
REAL_FILES = {"ner_ncbi_disease": 6, "re_gad-train": 16, "cls_hoc-sample": 16}  # file → held-out rows (its first)


def _real_rows(tmp_path):
    """Training rows from the end of each real file (NER 40, GAD 150, HoC 240, shuffled) and each file's first rows
    as its own held-out file, named as the source. The NER rows held out are the first of at most 12 words: an
    answer that never parses runs to its budget (a line per word) in each of the test's seven generation passes."""
    import random

    loaded = {name: [json.loads(line) for line in open(MEDTUNED / f"{name}.jsonl")] for name in REAL_FILES}
    train = loaded["ner_ncbi_disease"][-40:] + loaded["re_gad-train"][-150:] + loaded["cls_hoc-sample"][60:]
    random.Random(0).shuffle(train)
    loaded["ner_ncbi_disease"] = [row for row in loaded["ner_ncbi_disease"] if len(row["input"].split()) <= 12]
    held_out = [_jsonl(tmp_path / f"{name}.jsonl", loaded[name][:count]) for name, count in REAL_FILES.items()]
    return _jsonl(tmp_path / "train.jsonl", train), held_out


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_medtuned_rows_train_merge_and_evaluate_with_task_scores(tmp_path, cli_in_process):
    """Through the real commands, in this process (the torch import paid once for the three)."""
    if not (MEDTUNED / "cls_hoc-sample.jsonl").is_file():
        pytest.skip(f"{MEDTUNED} is absent: the real rows are in CI's ../shared/data only")
    train_file, held_out = _real_rows(tmp_path)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        output_dir=str(tmp_path / "run"),
        generation_metric="medtuned",
        metric_batch_size=8,
        merge_fidelity_prompts=2,  # the logit comparison; the task scores compare every held-out row
        dataset_name=str(train_file),
        eval_file=[str(path) for path in held_out],
        num_train_epochs=None,
    )
    # Measured: GAD and HoC answers go from unparseable to 100% parsed (GAD accuracy 0 → 31% at 50 steps).
    train = cli_in_process("train", str(recipe), "--max_steps", STEPS, "--eval_strategy", "no", "--save_strategy", "no")
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["task_metrics"]["before"], summary["task_metrics"]["after"]
    assert before["parsed"] <= 10, "the untrained model's answers are mostly unparseable"
    for subtask in ("re_gad-train/re", "cls_hoc-sample/multilabel"):
        assert after[f"{subtask}/parsed"] >= 90, (subtask, after)
    assert after["re_gad-train/re/accuracy"] > before["re_gad-train/re/accuracy"]
    assert (
        after["ner_ncbi_disease/ner/n"] == 6
        and after["re_gad-train/re/n"] == after["cls_hoc-sample/multilabel/n"] == 16
    )
    for subtask in ("ner_ncbi_disease/ner", "re_gad-train/re", "cls_hoc-sample/multilabel"):
        assert f"**{subtask}**" in train.stdout

    merge = cli_in_process("merge", str(run), "--dtype", "fp32")
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-3000:]
    fidelity = json.loads((run / "merged" / "fidelity.json").read_text())["task_metrics"]
    assert fidelity["passed"] and fidelity["compared"] == 38
    assert fidelity["identical_predictions"] == 38, "nf4-roundtrip in fp32: the export answers as the trained model"
    assert "answers     38 of 38 identical" in merge.stdout

    evaluate = cli_in_process("evaluate", str(run))
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    table = json.loads((run / "evaluation.json").read_text())["models"]
    assert list(table) == ["before", "after", "merged"]
    numbers = {
        key: {k: v for k, v in column["metrics"].items() if isinstance(v, (int, float))}
        for key, column in table.items()
    }
    assert numbers["before"] == {k: v for k, v in before.items() if isinstance(v, (int, float))}, (
        "reproduces training's"
    )
    assert numbers["after"] == {k: v for k, v in after.items() if isinstance(v, (int, float))}
    assert numbers["merged"] == numbers["after"]
    assert table["merged"]["identical_to"] == ["after", 38, 38]
    assert "merged: 38 of 38 answers identical to after's" in evaluate.stdout
    assert sorted(p.name for p in (run / "generations").iterdir()) == sorted(
        f"{key}-{name}.jsonl" for key in ("before", "after", "merged") for name in REAL_FILES
    )


# ---------------------------------------------------------------- where the scores go: card, merge verdict


def test_the_card_carries_the_scores_as_model_index_one_group_per_subtask():
    from conftest import TINY_RECIPE

    from qlora_pipeline.outputs.card import build_card
    from qlora_pipeline.recipe import load_recipe

    after = {"task_score": 50.0, "parsed": 90.0, "n": 8, "re/accuracy": 75.0, "re/n": 4, "ner/entity_f1": 25.0}
    summary = {"task_metrics": {"before": {"task_score": 0.0}, "after": {**after, "notes": ["a note"]}}}
    card = build_card("adapter", load_recipe(TINY_RECIPE), summary, None, repo_id="me/medtuned")
    found = {(e.dataset_config, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert found == {
        (None, "task_score"): 50.0,
        (None, "parsed"): 90.0,
        ("re", "accuracy"): 75.0,
        ("ner", "entity_f1"): 25.0,
    }
    assert "model-index:" in card.content
    assert "re/accuracy (held out)" in card.content, "the results table lists the subtask scores too"


def test_a_task_score_that_moves_past_the_limit_fails_the_merge():
    from conftest import TINY_RECIPE

    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks.fidelity import task_fidelity as _task_fidelity

    recipe = load_recipe(TINY_RECIPE, ["--merge_max_metric_change", "1"])
    rows = [{"subtask": "re", "prediction": p} for p in ("Positive", "Negative")]
    reference = {"task_score": 60.0, "parsed": 100.0, "rows": rows}
    same = _task_fidelity(recipe, dict(reference), {"task_score": 60.0, "parsed": 100.0, "rows": list(rows)})
    assert same["passed"] and same["identical_predictions"] == same["compared"] == 2
    moved = [{"subtask": "re", "prediction": "Positive"}, {"subtask": "re", "prediction": "Positive"}]
    worse = _task_fidelity(recipe, dict(reference), {"task_score": 55.0, "parsed": 100.0, "rows": moved})
    assert not worse["passed"] and worse["identical_predictions"] == 1
    assert worse["failure"] == "task metric task_score moved by -5.00 > allowed 1 points"


def test_generation_benchmark_batched_answers_equal_one_row_at_a_time(tmp_path):
    """benchmarks/generation.py at CI size (the tiny model, 12 rows): batched answers are the one-row loop's."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("generation_benchmark", REPO / "benchmarks" / "generation.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.main(
        ["--model", "embedded:tiny-starling", "--rows", "12", "--batch-size", "4", "--out", str(tmp_path / "g.json")]
    )
    assert result["rows"] == 12 and result["identical_answers"] == 12
    assert result["batched_rows_per_s"] > 0 and result["one_row_rows_per_s"] > 0
    assert json.loads((tmp_path / "g.json").read_text())["speedup"] == result["speedup"]


def test_the_task_scores_reach_the_wandb_run_summary(tmp_path, monkeypatch):
    """A real offline W&B run: the end-of-run summary holds every task score, before and after, by subtask."""
    import wandb
    from test_tracking import history_and_config

    from qlora_pipeline.outputs import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="qlora-pipeline-test", dir=str(tmp_path), settings=wandb.Settings(silent=True))
    train = {"rows": 4, "examples": 4, "tokens": 40, "dropped": 0, "truncated": 0}
    before = {"task_score": 0.0, "re/accuracy": 0.0, "re/n": 4, "notes": ["not a number"]}
    after = {"task_score": 37.5, "re/accuracy": 75.0, "re/n": 4, "generations": ["after-x.jsonl"]}
    summary = {"data": {"train": train}, "task_metrics": {"before": before, "after": after}}
    where = tracking.finish(run, summary, tmp_path, log_artifacts=False)
    _, _, logged = history_and_config(Path(where["dir"]))
    assert logged["task_after/re/accuracy"] == 75.0 and logged["task_before/re/accuracy"] == 0.0
    assert logged["task_after/task_score"] == 37.5 and logged["task_after/re/n"] == 4
    assert not any("notes" in key or "generations" in key for key in logged)
