"""Text classification (qlora_pipeline/tasks/classification.py): the metrics against scikit-learn, the label set and
the held-out split, the pad token, a tiny QLoRA run on the embedded sample through the real flow, and the two-class
re_gad rows of ../shared/data (CI)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from conftest import REPO, SHARED_DATA, assert_clean_error
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from qlora_pipeline.errors import DataError, PipelineError, RecipeError
from qlora_pipeline.tasks.classification import ClassificationTask, classification_metrics

TINY_RECIPE = REPO / "recipes" / "tiny-gpt-neo-classification.yaml"
RE_GAD = SHARED_DATA / "medtuned" / "re_gad-train.jsonl"
SUBJECTS = ["Biology", "Chemistry", "Maths", "Physics"]


def load(tmp_path, **changes):
    """The tiny classification recipe with some keys changed, run folder under tmp_path, loaded and checked."""
    from qlora_pipeline.recipe import load_recipe

    values = yaml.safe_load(TINY_RECIPE.read_text())
    values.update(output_dir=str(tmp_path / "run"), **changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return load_recipe(path)


def write_csv(path, rows: list[tuple[str, str]]):
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


# ---------------------------------------------------------------- metrics against scikit-learn


def test_metrics_match_scikit_learn_on_four_classes():
    rng = np.random.default_rng(0)
    gold = np.concatenate([np.arange(4).repeat(5), rng.integers(0, 4, 20)])
    scores = rng.dirichlet(np.ones(4), size=len(gold))
    scores[np.arange(len(gold)), gold] += rng.uniform(0, 0.6, len(gold))  # better than chance, not perfect
    scores /= scores.sum(axis=1, keepdims=True)

    metrics = classification_metrics(gold.tolist(), scores, SUBJECTS)

    predicted = scores.argmax(axis=1)
    assert metrics["roc_auc_macro"] == pytest.approx(100 * roc_auc_score(gold, scores, multi_class="ovr"))
    for k, name in enumerate(SUBJECTS):
        assert metrics[f"roc_auc_{name}"] == pytest.approx(100 * roc_auc_score(gold == k, scores[:, k]))
    assert metrics["accuracy"] == pytest.approx(100 * accuracy_score(gold, predicted))
    assert metrics["macro_f1"] == pytest.approx(100 * f1_score(gold, predicted, average="macro"))
    assert metrics["confusion_matrix"] == {
        "labels": SUBJECTS,
        "matrix": confusion_matrix(gold, predicted).tolist(),
    }
    assert metrics["n"] == len(gold) and "notes" not in metrics
    assert 50 < metrics["roc_auc_macro"] < 100  # the case is neither trivial nor random


def test_binary_auc_is_the_positive_class_auc_by_hand_and_by_scikit_learn():
    # Of the 4 (positive, negative) pairs, 3 are ranked right: AUC 0.75.
    gold = [0, 0, 1, 1]
    positive = np.array([0.1, 0.4, 0.35, 0.8])
    scores = np.stack([1 - positive, positive], axis=1)

    metrics = classification_metrics(gold, scores, ["Negative", "Positive"])

    assert metrics["roc_auc_macro"] == pytest.approx(75.0)
    assert metrics["roc_auc_macro"] == pytest.approx(100 * roc_auc_score(gold, positive))
    assert metrics["roc_auc_Positive"] == metrics["roc_auc_Negative"] == pytest.approx(75.0)
    assert metrics["accuracy"] == pytest.approx(75.0)  # argmax: 0, 0, 0, 1
    assert metrics["confusion_matrix"]["matrix"] == [[2, 0], [1, 1]]


def test_a_class_absent_from_the_eval_rows_has_no_auc_and_is_said():
    rng = np.random.default_rng(1)
    gold = np.array([0, 1] * 8)  # no row of class 2
    scores = rng.dirichlet(np.ones(3), size=len(gold))

    metrics = classification_metrics(gold.tolist(), scores, ["a", "b", "c"])

    assert metrics["roc_auc_c"] is None
    assert any("roc_auc_c" in note and "no c" in note for note in metrics["notes"])
    per_class = [100 * roc_auc_score(gold == k, scores[:, k]) for k in (0, 1)]
    assert metrics["roc_auc_a"] == pytest.approx(per_class[0])
    assert metrics["roc_auc_macro"] == pytest.approx(sum(per_class) / 2)
    assert metrics["confusion_matrix"]["matrix"][2] == [0, 0, 0]


def test_confusion_matrix_plot_is_written(tmp_path):
    from qlora_pipeline.tasks.classification import plot_confusion_matrix

    metrics = classification_metrics([0, 1, 1, 2], np.eye(3)[[0, 1, 2, 2]], ["a", "b", "c"])
    plot_confusion_matrix(metrics, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- labels and the split


def test_class_names_give_the_id_order_in_the_data_and_the_model_config(tmp_path):
    from transformers import set_seed

    order = ["Physics", "Maths", "Chemistry", "Biology"]
    recipe = load(tmp_path, class_names=order)
    task = ClassificationTask()
    prepared = task.prepare_data(recipe)
    assert prepared.extra["class_names"] == order
    first = prepared.eval_rows[0]
    assert prepared.eval.dataset[0]["labels"] == order.index(first["label"])

    set_seed(0)
    model, _ = task.load_model(recipe, prepared)
    assert model.config.id2label == dict(enumerate(order))
    assert model.config.label2id == {name: i for i, name in enumerate(order)}
    assert model.config.pad_token_id == prepared.tokenizer.eos_token_id  # GPT-2's BPE has no pad: EOS


def test_a_label_outside_class_names_is_a_bad_row_named_by_file_and_line(tmp_path, cli_in_process):
    data = write_csv(tmp_path / "q.csv", [("What is a cell?", "Biology"), ("Solve 2x = 4.", "Maths")] * 3)
    lines = data.read_text().splitlines()
    lines[4] = "Who was Napoleon?,History"  # line 5 of the file
    data.write_text("\n".join(lines) + "\n")

    recipe = load(tmp_path, dataset_name=str(data), class_names=["Biology", "Maths"], eval_split_size=0.25)
    with pytest.raises(DataError) as error:
        ClassificationTask().prepare_data(recipe)
    assert str(error.value) == f"{data}:5: label 'History' is not one of class_names (Biology, Maths)"
    assert_clean_error(cli_in_process("train", recipe.source), f"{data}:5: label 'History'")  # before any model loads

    recipe = load(tmp_path, dataset_name=str(data), class_names=["Biology", "Maths"], on_bad_rows="skip")
    prepared = ClassificationTask().prepare_data(recipe)
    assert [(r["line"], r["reason"]) for r in prepared.skipped] == [
        (5, "label 'History' is not one of class_names (Biology, Maths)")
    ]
    assert prepared.accounting["skipped"] == 1
    assert len(prepared.train.dataset) + len(prepared.eval.dataset) == 5


def test_a_held_out_label_never_seen_in_training_is_an_error(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("What is a cell?", "Biology"), ("Solve 2x = 4.", "Maths")] * 3)
    held_out = write_csv(tmp_path / "eval.csv", [("What is a gene?", "Biology"), ("What is a volt?", "Physics")])
    recipe = load(tmp_path, dataset_name=str(train), eval_file=str(held_out))
    with pytest.raises(DataError) as error:
        ClassificationTask().prepare_data(recipe)
    message = str(error.value)
    assert message.startswith(f"{held_out}:3: label 'Physics' is in the held-out rows but in no training row")
    assert "\n" not in message


def test_held_out_rows_are_disjoint_from_training_rows_and_stratified(tmp_path):
    from qlora_pipeline.data import rows as data_mod
    from qlora_pipeline.tasks.classification import columns, held_out_split

    recipe = load(tmp_path)
    prepared = ClassificationTask().prepare_data(recipe)
    source = data_mod.load_rows(recipe.data.dataset_name, recipe.data, columns=columns(recipe))
    train_rows, eval_rows, _ = held_out_split(source, recipe, None)

    assert list(eval_rows["text"]) == list(prepared.eval_rows["text"])  # the rows the metric reads
    assert not set(train_rows["text"]) & set(eval_rows["text"])
    assert len(train_rows) == len(prepared.train.dataset) == 246
    assert len(eval_rows) == len(prepared.eval.dataset) == 62  # 20% of the 308 rows
    counts = [list(eval_rows["label"]).count(name) for name in SUBJECTS]
    assert set(counts) <= {15, 16}  # 77 rows per class: a fifth of each is held out
    assert prepared.extra["class_names"] == SUBJECTS  # the training labels, sorted


def test_whole_number_labels_are_one_class_per_number_in_numeric_order(tmp_path):
    data = tmp_path / "numbers.jsonl"
    labels = [10, 2, "2", 1, "10", 1] * 3
    data.write_text("".join(json.dumps({"text": f"row {i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    prepared = ClassificationTask().prepare_data(load(tmp_path, dataset_name=str(data), eval_split_size=3))
    assert prepared.extra["class_names"] == ["1", "2", "10"]


def test_recipe_checks_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match="key 'class_names': names 'Maths' more than once"):
        load(tmp_path, class_names=["Maths", "Physics", "Maths"])
    with pytest.raises(RecipeError, match="key 'label_column': names the same column as text_column"):
        load(tmp_path, label_column="text")


# ---------------------------------------------------------------- the pad token


def test_padding_never_moves_the_token_the_classifier_reads(tmp_path):
    """pad = EOS and right padding: a text holding the literal EOS string still ends where it ends, and a row's
    probabilities are the same alone and in a padded batch."""
    from transformers import set_seed

    from qlora_pipeline.tasks.classification import _encode, predict_probabilities

    recipe = load(tmp_path)
    task = ClassificationTask()
    prepared = task.prepare_data(recipe)
    tokenizer = prepared.tokenizer
    texts = ["Why is the sky blue?<|endoftext|>", "<|endoftext|> What is 2 + 2?", "Define osmosis.", "Hi"]
    for ids in _encode(tokenizer, texts)["input_ids"]:
        assert tokenizer.pad_token_id not in ids

    set_seed(0)
    model, _ = task.load_model(recipe, prepared)
    model.eval()
    batched = predict_probabilities(model, tokenizer, texts, batch_size=4, max_length=64)
    alone = predict_probabilities(model, tokenizer, texts, batch_size=1, max_length=64)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert not np.allclose(batched[0], batched[2], atol=1e-3)  # different texts, different outputs


# ---------------------------------------------------------------- a tiny run through the real flow


def weight_snapshots():
    """A TrainerCallback (for train.run) that copies every weight as training starts and ends."""
    from transformers import TrainerCallback

    class WeightSnapshots(TrainerCallback):
        def __init__(self):
            self.start, self.end, self.trainable = {}, {}, set()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.end = {n: p.detach().clone() for n, p in model.named_parameters()}

    return WeightSnapshots()


@pytest.mark.slow
def test_tiny_qlora_run_learns_on_held_out_rows(tmp_path):
    """The tiny recipe as shipped (4-bit NF4 GPT-Neo, LoRA + head, 64 steps) through train.run, then merged.

    Observed on the held-out 62 rows (before → after, seeds 42 / 1 / 2 / 3): macro-F1 30.4 → 77.6, 12.8 → 78.3,
    13.4 → 75.5, 18.5 → 71.2 (gains 47 to 66 points); ROC AUC 52.1 → 90.1, 50.2 → 91.3, 45.5 → 89.9, 49.7 → 88.3
    (gains 38 to 44). Margins: 30 points of macro-F1 and 25 of AUC, well inside every seed's gain and far above what
    a model that learnt nothing could reach (it stays within a few points of its before)."""
    from qlora_pipeline.stages import train
    from qlora_pipeline.stages.evaluate import evaluate
    from qlora_pipeline.stages.merge import merge
    from qlora_pipeline.tasks.classification import _check_trained_head

    recipe = load(tmp_path)
    snapshots = weight_snapshots()
    summary = train.run(recipe, callbacks=[snapshots])

    before, after = summary["task_metrics"]["before"], summary["task_metrics"]["after"]
    assert after["macro_f1"] - before["macro_f1"] >= 30, (before, after)
    assert after["roc_auc_macro"] - before["roc_auc_macro"] >= 25, (before, after)
    assert after["n"] == before["n"] == 62
    assert "Confusion matrix, after" in (tmp_path / "run" / "evaluation.md").read_text()

    # Only the adapter and the head train; every base weight (4-bit layers, embeddings, norms) is as loaded.
    trainable = snapshots.trainable
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("score.modules_to_save" in n for n in trainable)
    for name, start in snapshots.start.items():
        changed = not np.array_equal(start.float().numpy(), snapshots.end[name].float().numpy())
        if name in trainable and ("lora_B" in name or "score" in name):
            assert changed, f"{name} did not train"
        elif name not in trainable:
            assert not changed, f"frozen {name} changed"

    # The saved tokenizer reads "<|endoftext|>" in a text as text, as training did (pad = EOS stays unambiguous).
    saved = json.loads((tmp_path / "run" / "adapter" / "tokenizer_config.json").read_text())
    assert saved["split_special_tokens"] is True and saved["pad_token"] == saved["eos_token"]

    # The export names its classes; `evaluate --model` scores it on the same rows, and a model for other classes (or
    # the same in another order) is refused before its weights load.
    merged = tmp_path / "run" / "merged"
    merge(tmp_path / "run")
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(SUBJECTS)}
    assert config["architectures"] == ["GPTNeoForSequenceClassification"]
    evaluate(str(tmp_path / "run"), model=str(merged))
    table = json.loads((tmp_path / "run" / "evaluation.json").read_text())["models"]
    assert table["model"]["metrics"]["macro_f1"] == pytest.approx(after["macro_f1"], abs=3)
    other_order = dataclasses.replace(recipe.model, model_name_or_path=str(merged))
    with pytest.raises(PipelineError, match=r"classes \(Biology, Chemistry, Maths, Physics\) are not the data's"):
        _check_trained_head(other_order, recipe.training, list(reversed(SUBJECTS)))


# ---------------------------------------------------------------- the two-class re_gad rows (CI)


@pytest.mark.shared_data
@pytest.mark.slow
def test_re_gad_two_class_rows_give_the_metric_table_with_a_binary_auc(tmp_path):
    if not RE_GAD.is_file():
        pytest.skip(f"{RE_GAD} is absent: the real rows are in CI's ../shared/data only")
    from qlora_pipeline.stages import train

    recipe = load(
        tmp_path,
        dataset_name=str(RE_GAD),
        text_column="input",
        label_column="output",
        eval_split_size=60,
        max_train_samples=160,
        max_length=128,
        num_train_epochs=1,
        eval_strategy="no",
    )
    summary = train.run(recipe)

    after = summary["task_metrics"]["after"]
    assert after["n"] == 60
    assert after["confusion_matrix"]["labels"] == ["Negative", "Positive"]
    assert np.array(after["confusion_matrix"]["matrix"]).sum() == 60
    # Two classes: the macro AUC is the binary AUC of Positive (and of Negative, its mirror image).
    assert after["roc_auc_macro"] == after["roc_auc_Positive"] == pytest.approx(after["roc_auc_Negative"])
    assert 0 <= after["roc_auc_macro"] <= 100
    table = (tmp_path / "run" / "evaluation.md").read_text()
    assert "| **roc_auc_macro** |" in table and "| Positive |" in table
    assert any("'instruction'" in note and "not used" in note for note in summary["notes"])
