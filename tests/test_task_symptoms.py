"""The symptoms → disease task: the parsers and the metric against hand-computed cases, generation as in training,
a tiny DistilGPT-2 run whose metric improves, and the recipe on the shared real rows (CI)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, SHARED_DATA

from qlora_pipeline.errors import DataError
from qlora_pipeline.tasks.metrics import symptoms as sm

TINY_RECIPE = REPO / "recipes" / "tiny-distilgpt2-symptoms.yaml"
SHARED_SYMPTOMS = SHARED_DATA / "symptoms" / "symptoms_disease_instruction_output.jsonl"


# ---------------------------------------------------------------- parsers


def test_the_list_is_read_after_the_colon_normalised():
    answer = "The following are the symptoms of Flu:  Fever,Sore   THROAT ; muscle aches."
    assert sm.parse_symptoms(answer) == ["fever", "sore throat", "muscle aches"]


def test_a_list_without_a_colon_is_read_after_include_or_whole():
    assert sm.parse_symptoms("The symptoms of flu include fever, cough.") == ["fever", "cough"]
    assert sm.parse_symptoms("fever, cough") == ["fever", "cough"]


def test_and_before_the_last_item():
    assert sm.parse_symptoms("X: fever, cough, and sore throat") == ["fever", "cough", "sore throat"]
    # Without the comma, "cough and sore throat" is one item unless the gold names tell it apart: real symptom
    # names hold "and" (the shared data has "nausea and vomiting").
    assert sm.parse_symptoms("X: fever, cough and sore throat") == ["fever", "cough and sore throat"]
    known = {"fever", "cough", "sore throat", "nausea and vomiting"}
    assert sm.parse_symptoms("X: fever, cough and sore throat", known) == ["fever", "cough", "sore throat"]
    assert sm.parse_symptoms("X: nausea and vomiting, fever", known) == ["nausea and vomiting", "fever"]


def test_duplicates_bullets_and_blank_items_count_once():
    assert sm.parse_symptoms("X: fever, Fever , fever., , - cough\n2. fever") == ["fever", "cough"]


def test_a_prediction_stops_where_the_model_starts_another_section():
    answer = "The following are the symptoms of flu: fever, cough\n\n### Instruction:\nWhat are the symptoms of"
    assert sm.parse_symptoms(answer) == ["fever", "cough"]
    assert sm.parse_symptoms("") == [] and sm.parse_symptoms("   ") == []


@pytest.mark.parametrize(
    ("answer", "disease"),
    [
        ("Influenza", "influenza"),
        ("  influenza. ", "influenza"),
        ("The disease is Influenza.", "influenza"),
        ("It is most likely the common cold", "common cold"),
        ("Answer: Crohn's disease", "crohn's disease"),
        ("gout\nThe following are", "gout"),
        ("", ""),
    ],
)
def test_the_disease_is_read_from_the_answer(answer, disease):
    assert sm.parse_disease(answer) == disease


@pytest.mark.parametrize(
    ("instruction", "kind"),
    [
        ("What are the symptoms of influenza?", "forward"),
        ("what are the common symptoms of GOUT", "forward"),
        ("Which disease has these symptoms: fever, cough?", "reverse"),
        ("What disease has the following symptoms: fever?", "reverse"),
        ("What is the capital of France?", None),
    ],
)
def test_questions_are_sorted_by_direction(instruction, kind):
    assert sm.question_kind(instruction) == kind


# ---------------------------------------------------------------- scores, by hand


def test_set_scores_by_hand():
    precision, recall, f1 = sm.set_scores({"a", "b", "c", "d"}, {"a", "b", "x"})
    assert (precision, recall) == pytest.approx((2 / 3, 1 / 2))
    assert f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # 4/7
    assert sm.set_scores({"a"}, set()) == (0.0, 0.0, 0.0), "an empty prediction scores 0, not an error"
    assert sm.set_scores({"a"}, {"a"}) == (1.0, 1.0, 1.0)


def test_macro_and_micro_scores_by_hand():
    gold = [["a", "b", "c", "d"], ["e"]]
    predicted = [["a", "b", "x"], []]
    scores = sm.symptom_scores(gold, predicted)
    # Macro: row 1 has P 2/3, R 1/2, F1 4/7; row 2 (empty prediction) 0, 0, 0; averaged over the 2 rows.
    assert scores["symptom_precision"] == pytest.approx(100 * (2 / 3) / 2, abs=0.01)
    assert scores["symptom_recall"] == pytest.approx(100 * (1 / 2) / 2, abs=0.01)
    assert scores["symptom_f1"] == pytest.approx(100 * (4 / 7) / 2, abs=0.01)
    # Micro: 2 hits among 3 predicted and 5 gold symptoms.
    assert scores["symptom_precision_micro"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert scores["symptom_recall_micro"] == pytest.approx(100 * 2 / 5, abs=0.01)
    assert scores["symptom_f1_micro"] == pytest.approx(100 * 2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5), abs=0.01)
    assert scores["n_forward"] == 2


def test_disease_accuracy_by_hand_and_none_without_reverse_rows():
    scores = sm.disease_scores(["influenza", "malaria", "gout"], ["influenza", "measles", "gout"])
    assert scores == {"disease_top1": pytest.approx(100 * 2 / 3, abs=0.01), "n_reverse": 3}
    assert sm.disease_scores([], []) == {"disease_top1": None, "n_reverse": 0}


def test_scoring_generated_answers_end_to_end():
    rows = [
        {
            "instruction": "What are the symptoms of flu?",
            "output": "The following are the symptoms of flu: fever, cough",
        },
        {
            "instruction": "What are the symptoms of gout?",
            "output": "The following are the symptoms of gout: joint pain",
        },
        {"instruction": "Which disease has these symptoms: fever, cough?", "output": "flu"},
        {"instruction": "Which disease has these symptoms: joint pain?", "output": "The disease is gout."},
        {"instruction": "Tell me a joke.", "output": "No."},
    ]
    found = sm.scored_rows(rows, "instruction", "output")
    assert [len(found.forward), len(found.reverse), found.unrecognised] == [2, 2, 1]
    answers = {
        0: "The following are the symptoms of flu: Fever, cough, and headache.",  # P 2/3, R 1, F1 0.8
        1: "",  # nothing generated: 0
        2: "The disease is Flu.",  # right
        3: "arthritis",  # wrong
    }
    scores = sm.score_answers(found, answers)
    assert scores["symptom_f1"] == pytest.approx(40.0)
    assert scores["symptom_recall"] == pytest.approx(50.0)
    assert scores["disease_top1"] == pytest.approx(50.0)
    assert (scores["n_forward"], scores["n_reverse"], scores["n"]) == (2, 2, 4)
    assert "1 held-out rows are neither" in scores["notes"][0]
    forward_only = sm.score_answers(sm.scored_rows(rows[:2], "instruction", "output"), answers)
    assert forward_only["disease_top1"] is None and forward_only["n_reverse"] == 0
    assert forward_only["notes"] == [
        "no reverse question (symptoms → disease) among the held-out rows: disease_top1 not measured"
    ]


def test_rows_the_metric_cannot_score_are_refused_before_training():
    rows = [{"instruction": "Tell me a joke.", "output": "No."}]
    with pytest.raises(DataError, match=r"eval rows: none of the 1 held-out rows is a symptoms question"):
        sm.check_rows(rows, "instruction", "output")
    mixed = rows + [
        {"instruction": "What are the symptoms of flu?", "output": "The following are the symptoms of flu: a"}
    ]
    assert "1 of 2 held-out rows are neither" in sm.check_rows(mixed, "instruction", "output")[0]


def test_the_sample_is_in_the_schema_and_asks_every_disease_both_ways():
    rows = [
        json.loads(line) for line in (REPO / "qlora_pipeline" / "data" / "samples" / "symptoms_sample.jsonl").open()
    ]
    assert 150 <= len(rows) <= 250 and all(set(row) == {"instruction", "output"} for row in rows)
    found = sm.scored_rows(rows, "instruction", "output")
    assert found.unrecognised == 0
    forward = {question[len("What are the symptoms of ") : -1] for _, question, _, _ in found.forward}
    reverse = {disease for *_, disease in found.reverse}
    assert forward == reverse and len(forward) == len(found.forward) == len(found.reverse)
    for _, question, _, gold in found.forward:  # the output names the disease of the question, as the schema does
        disease = question[len("What are the symptoms of ") : -1]
        assert rows[[r["instruction"] for r in rows].index(question)]["output"].startswith(
            f"The following are the symptoms of {disease}: "
        )
        assert len(gold) >= 3


# ---------------------------------------------------------------- generation, on the real tiny model


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(embedded_cache):
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.data.templates import get_template
    from qlora_pipeline.model import tiny
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import causal_lm as modeling

    recipe = load_recipe(TINY_RECIPE)
    template = get_template(recipe.data.template)
    tokenizer, _ = modeling.load_tokenizer(recipe.model, recipe.training, template)
    model = AutoModelForCausalLM.from_pretrained(tiny.resolve_model("embedded:tiny-distilgpt2"))
    model.resize_token_embeddings(len(tokenizer))
    return model.eval(), tokenizer, template


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_model_and_tokenizer):
    model, tokenizer, template = tiny_model_and_tokenizer
    questions = [
        ("What are the symptoms of influenza?", None),
        ("Which disease has these symptoms: fever, chills, sweating, headache, nausea, muscle aches?", None),
        ("What are the symptoms of chronic obstructive pulmonary disease?", None),
    ]
    assert tokenizer.padding_side == "right"
    batched = sm.generate_answers(model, tokenizer, template, questions, max_new_tokens=8, batch_size=3)
    assert tokenizer.padding_side == "right", "the training padding side is put back"
    alone = [sm.generate_answers(model, tokenizer, template, [q], max_new_tokens=8)[0] for q in questions]
    assert batched == alone
    assert all(answer for answer in batched), "an untrained model writes something (garbage) for 8 tokens"


# ---------------------------------------------------------------- training, through the real flow


def _recipe(tmp_path, **changes):
    """The tiny symptoms recipe with some keys changed, writing its run folder under tmp_path."""
    values = yaml.safe_load(TINY_RECIPE.read_text())
    values.update(output_dir=str(tmp_path / "run"), **changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# The tiny recipe as shipped (10 epochs of one-row steps) gave symptom_f1 before → after, with one CPU thread:
# 0.0 → 11.90 (seed 42), 0.0 → 15.76 (seed 1), 0.0 → 4.56 (seed 2; the seed also draws the held-out rows), and
# 0.0 → 10.12 for seed 42 with two threads (other float rounding, other greedy tokens). The untrained model writes
# no symptom at all; the trained one answers every forward question with the commonest symptoms ("fever,
# fatigue"), so F1 moves in steps of a few points. With two threads: 10.12, 9.24, 6.47, 7.00 (seeds 42, 1, 2, 3);
# 20 epochs (14.29, 12.82, 7.81, 7.56) or 30% held out (6.91, 12.81, 6.28, 8.14) did not narrow the spread (see
# docs/recipe-distilgpt2-symptoms.md, "How strong the claim is"). 3 points sits under the smallest of all eleven
# runs: the test proves the model learned to answer with real symptoms (before: 0 at every seed), not how much.
F1_MARGIN = 3.0


@pytest.mark.slow
def test_tiny_recipe_learns_symptoms(tmp_path):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import train

    summary = train.run(load_recipe(_recipe(tmp_path)))
    before, after = summary["task_metrics"]["before"], summary["task_metrics"]["after"]
    assert before["symptom_f1"] == 0 and before["symptom_precision"] == 0, before
    assert after["symptom_f1"] >= before["symptom_f1"] + F1_MARGIN, (before, after)
    # Both directions were held out and scored: the sample asks every disease both ways.
    assert after["n_forward"] > 0 and after["n_reverse"] > 0
    assert after["n"] == after["n_forward"] + after["n_reverse"] <= 40
    table = (tmp_path / "run" / "evaluation.md").read_text()
    assert "**symptom_f1**" in table and "**disease_top1**" in table


@pytest.mark.slow
@pytest.mark.shared_data
def test_recipe_runs_on_the_shared_symptoms_rows(tmp_path):
    """The real rows (forward questions only): the run produces its metric table; disease accuracy is not made up."""
    if not SHARED_SYMPTOMS.is_file():
        pytest.skip(f"{SHARED_SYMPTOMS} is absent (a fresh clone has no ../shared/data)")
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import train

    recipe = _recipe(
        tmp_path,
        dataset_name=str(SHARED_SYMPTOMS),
        max_steps=10,
        metric_max_samples=8,
        eval_max_new_tokens=24,
        eval_split_size=0.1,
    )
    summary = train.run(load_recipe(recipe))
    assert summary["data"]["rows_read"] == 134
    for key in ("before", "after"):
        metrics = summary["task_metrics"][key]
        assert metrics["n_forward"] == 8 and metrics["n_reverse"] == 0 and metrics["disease_top1"] is None
        assert 0 <= metrics["symptom_f1"] <= 100
    assert "disease_top1 not measured" in (tmp_path / "run" / "evaluation.md").read_text()
    record = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert record["headline"] == ["symptom_f1", "disease_top1"]
    assert record["dataset"] == str(SHARED_SYMPTOMS)
