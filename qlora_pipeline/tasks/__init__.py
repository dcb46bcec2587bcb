"""Tasks: what differs between causal-LM SFT, extractive QA, text classification and generative (seq2seq) QA.

Every task runs through the same flow (stages/train.py): recipe → data → model → trainer → evaluate → run folder.
The skeleton every task shares (tokenizer, model of the task's class, training arguments) is written once in
`base.Task`; a task module (causal_lm, extractive_qa, classification, seq2seq) holds only what differs. Its recipe
checks and LoRA facts are in recipe/task_settings.py, so a bad task setting is refused before anything loads.

Adding a task means one module here, one entry in `TASKS` and in recipe/task_settings.py, and its recipes.
"""

from __future__ import annotations

import importlib

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.tasks.base import PreparedData, Task

# Task name → "module:class", imported only when the task is used (each pulls in transformers/torch).
TASKS = {
    "causal_lm": "qlora_pipeline.tasks.causal_lm:CausalLMTask",
    "extractive_qa": "qlora_pipeline.tasks.extractive_qa:ExtractiveQATask",
    "classification": "qlora_pipeline.tasks.classification:ClassificationTask",
    "seq2seq": "qlora_pipeline.tasks.seq2seq:Seq2SeqTask",
}

__all__ = ["TASKS", "PreparedData", "Task", "get_task", "prepare_data"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise RecipeError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def prepare_data(recipe) -> PreparedData:
    """Tokenizer and checked, tokenized train/eval splits, as the recipe's task makes them; no model loads."""
    return get_task(recipe.task.task).prepare_data(recipe)
