"""Task metrics on generated or predicted answers: SQuAD EM/F1 (squad.py), symptoms and diseases (symptoms.py),
the MedTuned subtasks (medtuned.py)."""

from __future__ import annotations


def generation_metric_names(recipe) -> tuple[str, ...]:
    """The headline names of a causal LM's generation metric (`generation_metric`), first the one that decides;
    () for none."""
    if recipe.task.generation_metric == "symptoms":
        from qlora_pipeline.tasks.metrics.symptoms import METRIC_NAMES

        return METRIC_NAMES
    if recipe.task.generation_metric == "medtuned":
        from qlora_pipeline.tasks.metrics.medtuned import METRIC_NAMES

        return METRIC_NAMES
    return ()
