"""Tasks: what differs between causal-LM SFT, extractive QA, text classification and generative (seq2seq) QA.

Every task runs through the same flow (`train.run`): recipe → data → model → trainer → evaluate → run folder. A task
module answers the few questions that differ, as a subclass of `Task`:

- `check(values, fail)`: task-specific recipe checks, before anything loads (columns named, impossible combinations);
- `prepare_data(recipe)`: tokenizer and checked, tokenized train/eval splits (`PreparedData`), no model;
- `load_model(recipe, prepared)`: the base model (4-/8-bit as the recipe says) of the task's Auto class, with its
  head where the task adds one; `train.run` wraps it in LoRA (`peft_task_type`, the head in `modules_to_save`);
- `build_trainer(recipe, model, prepared, callbacks)`: the transformers/TRL trainer, dynamic padding;
- `evaluate(model, prepared, recipe)`: the task's metric on the held-out rows, a flat dict of numbers.

Adding a task means one module here, one entry in `TASKS`, and its recipes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

# Task name → "module:class", imported only when the task is used (each pulls in transformers/torch).
TASKS = {
    "causal_lm": "qlora_pipeline.tasks.causal_lm:CausalLMTask",
    "extractive_qa": "qlora_pipeline.tasks.extractive_qa:ExtractiveQATask",
    "classification": "qlora_pipeline.tasks.classification:ClassificationTask",
    "seq2seq": "qlora_pipeline.tasks.seq2seq:Seq2SeqTask",
}


@dataclass
class PreparedData:
    """What a task's data step hands to the model and trainer steps: everything checked, nothing loaded on a GPU."""

    tokenizer: Any
    template: Any  # the prompt template (causal LM); None for the other tasks
    train: Any  # data.TokenizedSplit
    eval: Any  # data.TokenizedSplit | None
    notes: list[str]
    skipped: list[dict] | None = None  # rows left out under on_bad_rows: skip (data.Where.record)
    accounting: dict | None = None  # rows read, skipped, unused (data.accounting)
    eval_rows: Any = None  # the held-out rows as read (datasets.Dataset): gold answers and labels for the metric
    extra: dict = field(default_factory=dict)  # task-specific facts (e.g. label names), saved nowhere by the flow


class Task:
    """One task's answers to the flow's questions. Subclasses set the class attributes and override the methods."""

    name: str = ""
    peft_task_type: str = "CAUSAL_LM"  # peft's TaskType: CAUSAL_LM, QUESTION_ANS, SEQ_CLS, SEQ_2_SEQ_LM
    # The metric that decides whether training helped, first; evaluate() returns these keys (and may add more).
    metric_names: tuple[str, ...] = ()
    # Modules that stay fully trainable beside the LoRA adapter (a head the task adds), unless the recipe names its
    # own lora_modules_to_save.
    modules_to_save: tuple[str, ...] = ()

    def check(self, values: dict, fail) -> list[str]:
        """Recipe checks for this task. `values`: the flat recipe; `fail(key, message)` raises a RecipeError. Returns
        notes for settings it adjusted."""
        return []

    def prepare_data(self, recipe) -> PreparedData:
        raise NotImplementedError

    def load_model(self, recipe, prepared: PreparedData):
        """(model, notes): the base model, quantized as the recipe says, prepared for k-bit training."""
        raise NotImplementedError

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        raise NotImplementedError

    def metric_names_for(self, recipe) -> tuple[str, ...]:
        """The metrics that say whether training helped, headline first (a task may pick them by recipe)."""
        return self.metric_names

    def evaluate(self, model, prepared: PreparedData, recipe) -> dict[str, float]:
        """The task metric on `prepared.eval_rows`; {} where the task has none beyond the eval loss."""
        return {}


def get_task(name: str) -> Task:
    from qlora_pipeline.errors import RecipeError

    if name not in TASKS:
        raise RecipeError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
