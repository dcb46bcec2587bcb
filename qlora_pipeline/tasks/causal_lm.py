"""Causal LM: instruction SFT, the main job (Starling on Llama2-MedTuned-Instructions; DistilGPT-2 symptoms).

Rows (instruction, optional input, output) are rendered with the recipe's prompt template and tokenized with a
completion mask (data.tokenize); the pipeline packs them into rows of at most max_length with per-example positions
(packing.py) and trains through TRL's SFTTrainer (trainer.PipelineSFTTrainer: loss on the labelled positions only).
The eval loss is the metric; `generation_metric: symptoms` adds one on generated answers (symptoms_metric.py).
"""

from __future__ import annotations

import copy

from qlora_pipeline import data as data_mod
from qlora_pipeline import modeling
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.tasks import PreparedData, Task
from qlora_pipeline.templates import get_template


class CausalLMTask(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"

    def check(self, values: dict, fail) -> list[str]:
        if values["generation_metric"] == "symptoms" and values["eval_split_size"] == 0 and not values["eval_file"]:
            fail("generation_metric", "needs held-out rows: set eval_split_size or eval_file")
        return []

    def metric_names_for(self, recipe) -> tuple[str, ...]:
        if recipe.task.generation_metric == "symptoms":
            from qlora_pipeline.tasks.symptoms_metric import METRIC_NAMES

            return METRIC_NAMES
        return ()

    def prepare_data(self, recipe) -> PreparedData:
        """Tokenizer and tokenized train/eval splits, without loading the model."""
        from accelerate import PartialState

        template = get_template(recipe.data.template)
        tokenizer, notes = modeling.load_tokenizer(recipe.model, recipe.training, template)
        max_length = recipe.training.max_length
        # The main process tokenizes and fills the datasets cache; the others then read it.
        with PartialState().main_process_first():
            train_rows = data_mod.load_rows(recipe.data.dataset_name, recipe.data)
            eval_rows = data_mod.load_rows(recipe.data.eval_file, recipe.data) if recipe.data.eval_file else None
            train_set, eval_set = data_mod.split_train_eval(train_rows, recipe.data, recipe.training.seed, eval_rows)
            train = data_mod.tokenize(train_set, tokenizer, template, recipe.data, max_length, "train")
            evaluation = (
                data_mod.tokenize(eval_set, tokenizer, template, recipe.data, max_length, "eval") if eval_set else None
            )
        if recipe.task.generation_metric == "symptoms" and eval_set is not None:
            from qlora_pipeline.tasks.symptoms_metric import check_rows

            where = recipe.data.eval_file or recipe.data.dataset_name
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
        return PreparedData(tokenizer, template, train, evaluation, notes, skipped, accounting, eval_rows=eval_set)

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
        if recipe.task.generation_metric != "symptoms" or prepared.eval_rows is None:
            return {}
        from qlora_pipeline.tasks.symptoms_metric import evaluate_symptoms

        return evaluate_symptoms(model, prepared.tokenizer, prepared.template, prepared.eval_rows, recipe)
