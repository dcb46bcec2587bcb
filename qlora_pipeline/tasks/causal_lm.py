"""Causal LM: instruction SFT, the main job (Starling on Llama2-MedTuned-Instructions; DistilGPT-2 symptoms).

Rows (instruction, optional input, output) are rendered with the recipe's prompt template and tokenized with a
completion mask (data.tokenize); the pipeline packs them into rows of at most max_length with per-example positions
(packing.py) and trains through TRL's SFTTrainer (trainer.PipelineSFTTrainer: loss on the labelled positions only).
The eval loss is the metric; `generation_metric` adds one on generated answers: `symptoms` (symptoms_metric.py) or
`medtuned` (medtuned_metric.py: NER, relation extraction, NLI, document classification, scored per subtask, with
several held-out files at once).
"""

from __future__ import annotations

import copy
import dataclasses

from qlora_pipeline import data as data_mod
from qlora_pipeline import modeling
from qlora_pipeline.errors import DataError, PipelineError
from qlora_pipeline.tasks import PreparedData, Task, medtuned_metric
from qlora_pipeline.templates import get_template


class CausalLMTask(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"

    def check(self, values: dict, fail) -> list[str]:
        metric = values["generation_metric"]
        if values["metric_family_column"] and metric != "medtuned":
            fail("metric_family_column", "is read by generation_metric: medtuned only")
        if metric == "none" or values["eval_split_size"] or values["eval_file"]:
            return []
        if metric == "symptoms":
            fail("generation_metric", "needs held-out rows: set eval_split_size or eval_file")
        # The main recipes score MedTuned rows by default; a run without held-out rows simply has no scores.
        return ["generation_metric medtuned: no held-out rows (eval_split_size 0, no eval_file): no task scores"]

    def metric_names_for(self, recipe) -> tuple[str, ...]:
        if recipe.task.generation_metric == "symptoms":
            from qlora_pipeline.tasks.symptoms_metric import METRIC_NAMES

            return METRIC_NAMES
        if recipe.task.generation_metric == "medtuned":
            return medtuned_metric.METRIC_NAMES
        return ()

    def prepare_data(self, recipe) -> PreparedData:
        """Tokenizer and tokenized train/eval splits, without loading the model."""
        from accelerate import PartialState

        template = get_template(recipe.data.template)
        tokenizer, notes = modeling.load_tokenizer(recipe.model, recipe.training, template)
        max_length = recipe.training.max_length
        medtuned = recipe.task.generation_metric == "medtuned"
        family = recipe.task.metric_family_column if medtuned else None
        columns = data_mod.instruction_columns(recipe.data)
        if family:
            columns = dataclasses.replace(columns, optional=(*columns.optional, ("metric_family_column", family)))
        files = recipe.data.eval_files
        # The main process tokenizes and fills the datasets cache; the others then read it.
        with PartialState().main_process_first():
            train_rows = data_mod.load_rows(recipe.data.dataset_name, recipe.data, columns=None if files else columns)
            eval_rows = None
            if len(files) == 1:
                eval_rows = data_mod.load_rows(files[0], recipe.data, columns=columns)
            elif files:
                loaded = [data_mod.load_rows(name, recipe.data, columns=columns) for name in files]
                names = _unique_names([medtuned_metric.source_name(name) for name in files])
                eval_rows = data_mod.combine_sources(loaded, names, recipe.data.max_eval_samples)
            train_set, eval_set = data_mod.split_train_eval(
                train_rows, recipe.data, recipe.training.seed, eval_rows, locate=medtuned
            )
            found = None
            if medtuned and eval_set is not None:
                eval_set, found, found_notes = _recognise_medtuned(recipe, eval_set, eval_rows or train_rows)
                notes += found_notes
            train = data_mod.tokenize(train_set, tokenizer, template, recipe.data, max_length, "train")
            evaluation = (
                data_mod.tokenize(eval_set, tokenizer, template, recipe.data, max_length, "eval") if eval_set else None
            )
        if recipe.task.generation_metric == "symptoms" and eval_set is not None:
            from qlora_pipeline.tasks.symptoms_metric import check_rows

            where = ", ".join(files) or recipe.data.dataset_name
            notes += check_rows(eval_set, recipe.data.instruction_column, recipe.data.output_column, where)
        for split in filter(None, (train, evaluation)):
            if len(split.dataset) == 0:
                raise PipelineError(
                    f"{recipe.data.dataset_name}: every example is longer than max_length {max_length} "
                    f"({split.overlong} of {split.rows_in}); raise max_length or set overlong: truncate"
                )
        sources = [s for s in (train_rows, eval_rows) if s is not None]
        notes += [note for source in sources for note in source.notes]
        skipped = [record for source in sources for record in source.skipped]
        accounting = data_mod.accounting(train_rows, eval_rows, train_set, eval_set)
        extra = {"medtuned_rows": found} if medtuned else {}
        return PreparedData(
            tokenizer, template, train, evaluation, notes, skipped, accounting, eval_rows=eval_set, extra=extra
        )

    def load_model(self, recipe, prepared: PreparedData):
        return modeling.load_model(recipe.model, recipe.training, prepared.tokenizer, prepared.template)

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        from qlora_pipeline import packing
        from qlora_pipeline.trainer import PipelineSFTTrainer

        args, collator = recipe.training, None
        train_set = prepared.train.dataset.remove_columns(["n_tokens"])
        eval_set = prepared.eval.dataset.remove_columns(["n_tokens"]) if prepared.eval else None
        if args.packing:
            # The pipeline packs: rows of at most max_length with per-example positions (TRL would flatten each
            # batch into one row). TRL gets the finished rows and trains on them as they are.
            completion_only = bool(args.completion_only_loss)
            train_set = packing.pack(train_set, args.max_length, completion_only)
            if eval_set is not None and args.eval_packing is not False:
                eval_set = packing.pack(eval_set, args.max_length, completion_only)
            collator = packing.PackedRowsCollator(prepared.tokenizer.pad_token_id)
            args = copy.copy(args)
            args.packing = False
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        return PipelineSFTTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=prepared.tokenizer,
            callbacks=callbacks,
        )

    def evaluate(self, model, prepared: PreparedData, recipe) -> dict[str, float]:
        if prepared.eval_rows is None:
            return {}
        if recipe.task.generation_metric == "medtuned":
            found = prepared.extra["medtuned_rows"]
            return medtuned_metric.evaluate_medtuned(model, prepared.tokenizer, prepared.template, found, recipe)
        if recipe.task.generation_metric == "symptoms":
            from qlora_pipeline.tasks.symptoms_metric import evaluate_symptoms

            return evaluate_symptoms(model, prepared.tokenizer, prepared.template, prepared.eval_rows, recipe)
        return {}


def _unique_names(names: list[str]) -> list[str]:
    """Held-out file names, numbered where two files share one ('dev', 'dev-2')."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _recognise_medtuned(recipe, eval_set, owner):
    """Before the model loads: each held-out row's MedTuned family and gold answer. A gold answer that does not
    parse as its family is a bad row: an error naming file and line, or (on_bad_rows: skip) left out of the eval
    set and listed with the skipped rows of `owner`, the RowSource it came from. Returns (eval rows, recognised
    rows, notes)."""
    data = recipe.data
    default = medtuned_metric.source_name(data.eval_files[0] if data.eval_files else data.dataset_name)
    locations = eval_set[data_mod.ROW_COLUMN]
    dropped: list[int] = []

    def bad(index: int, reason: str) -> None:
        where = data_mod.Where.parse(locations[index])
        if data.on_bad_rows != "skip":
            raise DataError(f"{where}: {reason}")
        owner.skipped.append(where.record(reason))
        dropped.append(index)

    def recognise(rows, where):
        return medtuned_metric.scored_rows(rows, data, recipe.task.metric_family_column, default, where, bad)

    found = recognise(eval_set, locations.__getitem__)
    notes = []
    if dropped:
        skipped = set(dropped)
        eval_set = eval_set.select([i for i in range(len(eval_set)) if i not in skipped])
        locations = eval_set[data_mod.ROW_COLUMN]
        found = recognise(eval_set, locations.__getitem__)
        notes.append(
            f"generation_metric medtuned: {len(dropped)} held-out rows whose gold answer does not parse were skipped"
        )
    notes += medtuned_metric.check_found(found, ", ".join(data.eval_files) or data.dataset_name)
    return eval_set, found, notes
