"""Per task, what a recipe must say about it: the LoRA task type, the head trained in full, and the task's own key
checks. Recipe-level facts only (no model, no data), so `load_recipe` refuses a bad task setting before anything
loads; the task modules themselves (qlora_pipeline/tasks/) read their LoRA facts from here."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass


def label_text(value) -> str:
    """A label as the classification task names it: whole numbers by their digits (JSON 3 and CSV "3" are one
    class), spaces around it removed."""
    return str(value).strip()


def _causal_lm(values: dict, fail) -> list[str]:
    metric = values["generation_metric"]
    if values["metric_family_column"] and metric != "medtuned":
        fail("metric_family_column", "is read by generation_metric: medtuned only")
    if metric == "none" or values["eval_split_size"] or values["eval_file"]:
        return []
    if metric == "symptoms":
        fail("generation_metric", "needs held-out rows: set eval_split_size or eval_file")
    # The main recipes score MedTuned rows by default; a run without held-out rows simply has no scores.
    return ["generation_metric medtuned: no held-out rows (eval_split_size 0, no eval_file): no task scores"]


def _classification(values: dict, fail) -> list[str]:
    if values["text_column"] == values["label_column"]:
        fail("label_column", f"names the same column as text_column ({values['text_column']!r})")
    names = values["class_names"]
    if names is not None:
        cleaned = [label_text(name) for name in names]
        if len(cleaned) < 2:
            fail("class_names", f"needs at least two classes, got {names!r}")
        if "" in cleaned:
            fail("class_names", "holds an empty name")
        repeated = sorted({name for name in cleaned if cleaned.count(name) > 1})
        if repeated:
            fail("class_names", f"names {', '.join(map(repr, repeated))} more than once")
    if not values["eval_split_size"] and not values["eval_file"]:
        return ["classification: no held-out rows (eval_split_size 0, no eval_file): no accuracy, F1 or AUC"]
    return []


def _extractive_qa(values: dict, fail) -> list[str]:
    max_length, stride = values["max_length"], values["doc_stride"]
    if max_length is None:
        fail("max_length", "extractive_qa needs it: contexts are split into windows of max_length tokens")
    if stride > max_length // 2:
        fail(
            "doc_stride",
            f"{stride} is more than half of max_length {max_length}: consecutive windows would share most of "
            "their tokens (bert-base-uncased's usual setting: max_length 384, doc_stride 128)",
        )
    return []


def _seq2seq(values: dict, fail) -> list[str]:
    keys = ("context_column", "question_column", "answer_column")
    for first, second in itertools.combinations(keys, 2):
        if values[first] == values[second]:
            fail(second, f"names the same column as {first} ({values[first]!r}); each must be its own column")
    return []


@dataclass(frozen=True)
class TaskSettings:
    peft_task_type: str  # peft's TaskType: CAUSAL_LM, QUESTION_ANS, SEQ_CLS, SEQ_2_SEQ_LM
    # Modules that stay fully trainable beside the LoRA adapter (a head the task adds), unless the recipe names its
    # own lora_modules_to_save.
    modules_to_save: tuple[str, ...]
    # check(values, fail): the task's recipe checks. `values`: the flat recipe; `fail(key, message)` raises a
    # RecipeError. Returns notes for settings it adjusted.
    check: Callable[[dict, Callable], list[str]]


SETTINGS = {
    "causal_lm": TaskSettings("CAUSAL_LM", (), _causal_lm),
    "extractive_qa": TaskSettings("QUESTION_ANS", ("qa_outputs",), _extractive_qa),
    # GPT-style sequence classifiers name their head `score`. peft's SEQ_CLS adds "classifier" and "score" to any
    # list anyway, so BERT-like heads are covered too; the task checks that the model's actual head (every new
    # top-level module, e.g. DistilBERT's pre_classifier) is trained in full.
    "classification": TaskSettings("SEQ_CLS", ("score",), _classification),
    "seq2seq": TaskSettings("SEQ_2_SEQ_LM", (), _seq2seq),
}
