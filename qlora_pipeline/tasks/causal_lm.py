"""Causal LM: instruction SFT, the main job (Starling on Llama2-MedTuned-Instructions; DistilGPT-2 symptoms).

Rows (instruction, optional input, output) are rendered with the recipe's prompt template and tokenized with a
completion mask (data/tokenize.py); the pipeline packs them into rows of at most max_length with per-example
positions (data/packing.py) and trains through TRL's SFTTrainer (training/trainer.py: loss on the labelled positions
only). The eval loss is the metric; `generation_metric` adds one on generated answers: `symptoms`
(metrics/symptoms.py) or `medtuned` (metrics/medtuned.py: NER, relation extraction, NLI, document classification,
scored per subtask, with several held-out files at once).
"""

from __future__ import annotations

import copy
import dataclasses

from qlora_pipeline.data import checks as data_checks
from qlora_pipeline.data import mixture
from qlora_pipeline.data import rows as data_mod
from qlora_pipeline.data import tokenize as tokens
from qlora_pipeline.data.templates import PromptTemplate, get_template
from qlora_pipeline.errors import DataError
from qlora_pipeline.model import loading
from qlora_pipeline.recipe.mixture import short_name
from qlora_pipeline.tasks.base import PreparedData, Split, Task
from qlora_pipeline.tasks.fidelity import LogitProbe
from qlora_pipeline.tasks.metrics import generation_metric_names, medtuned

# Pad tokens some tokenizers ship under other names; tried before adding a new one.
KNOWN_PAD_TOKENS = ("<|pad_0|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class CausalLMTask(Task):
    name = "causal_lm"

    def metric_names_for(self, recipe) -> tuple[str, ...]:
        return generation_metric_names(recipe)

    def prepare_data(self, recipe) -> PreparedData:
        """Tokenizer and tokenized train/eval splits, checked (data/checks.py), without loading the model."""
        from accelerate import PartialState

        data, template = recipe.data, get_template(recipe.data.template)
        tokenizer, notes = self.load_tokenizer(recipe)
        max_length, seed = recipe.training.max_length, recipe.training.seed
        scores_medtuned = recipe.task.generation_metric == "medtuned"
        family = recipe.task.metric_family_column if scores_medtuned else None
        extra_columns = (("metric_family_column", family),) if family else ()
        columns = data_mod.instruction_columns(data)
        columns = dataclasses.replace(columns, optional=(*columns.optional, *extra_columns))
        files, train_rows, parts = data.eval_files, None, None
        # The main process tokenizes and fills the datasets cache; the others then read it.
        with PartialState().main_process_first():
            # 1. Rows: the eval file(s); the training rows, one dataset split by seed or each source of a mixture.
            eval_rows = _load_eval_files(data, files, columns)
            if data.dataset_mixture is None:
                train_rows = data_mod.load_rows(data.dataset_name, data, columns=None if files else columns)
                train_set, eval_set = data_mod.split_train_eval(train_rows, data, seed, eval_rows, locate=True)
                candidates = train_set
            else:
                parts = mixture.load_sources(data, seed, extra_columns, hold_out=not files)
                eval_set = data_mod.held_out_rows(eval_rows, data, locate=True) if files else mixture.held_out(parts)
                candidates = mixture.candidates(parts)
            # 2. Checks: duplicates and train/eval overlap, before anything is drawn or tokenized.
            checks = data_checks.check_train_and_eval(candidates, eval_set, data)
            if parts is None:
                train_set = data_checks.leave_out(train_set, checks.dropped, train_rows)
            else:
                mixture.drop_rows(parts, checks.dropped)
                train_set = mixture.mix(parts, data, seed)
            # 3. The held-out rows' task families (generation_metric medtuned), then tokenization.
            found = None
            if scores_medtuned and eval_set is not None:
                owner = _skipped_rows_owner(eval_rows, train_rows, parts)
                eval_set, found, found_notes = _recognise_medtuned(recipe, eval_set, owner)
                notes += found_notes
            templates = _source_templates(parts, template, tokenizer)
            train = tokens.tokenize(train_set, tokenizer, template, data, max_length, "train", templates)
            evaluation = (
                tokens.tokenize(eval_set, tokenizer, template, data, max_length, "eval", templates)
                if eval_set
                else None
            )
        if recipe.task.generation_metric == "symptoms" and eval_set is not None:
            from qlora_pipeline.tasks.metrics.symptoms import check_rows

            where = ", ".join(files) or data.data_label
            notes += check_rows(eval_set, data.instruction_column, data.output_column, where)
        tokens.check_rows_left((train, evaluation), data.data_label, max_length, "example")
        # 4. Every row accounted for (per source in a mixture).
        train_source = train_rows if parts is None else mixture.combined_source(parts)
        train_split, held_out = Split(train_source, train_set, train), Split(eval_rows, eval_set, evaluation)
        extra = {"medtuned_rows": found} if scores_medtuned else {}
        prepared = PreparedData.from_splits(
            tokenizer, template, notes, train_split, held_out, after=checks.notes, extra=extra
        )
        prepared.checks = checks
        if parts is not None:
            prepared.accounting = mixture.accounting(parts, train_set, eval_set, eval_rows)
        return prepared

    def fit_tokenizer(self, tokenizer, recipe) -> list[str]:
        return fit_end_and_pad_tokens(tokenizer, get_template(recipe.data.template))

    def fidelity_probe(self, recipe, prepared: PreparedData):
        return LogitProbe(self, recipe, prepared)

    def prepare_export(self, model, prepared: PreparedData) -> None:
        """Inference settings for the merged export: KV cache on (training turned it off), generation stops at the
        template's end token, and the tokenizer keeps the training chat template."""
        tokenizer, template = prepared.tokenizer, prepared.template
        model.config.use_cache = True
        model.config.pad_token_id = tokenizer.pad_token_id
        generation = model.generation_config
        generation.eos_token_id = tokenizer.convert_tokens_to_ids(template.end_token_for(tokenizer))
        generation.pad_token_id = tokenizer.pad_token_id
        generation.bos_token_id = tokenizer.bos_token_id
        tokenizer.chat_template = template.chat_template_for(tokenizer)

    def configure_model(self, model, recipe, prepared: PreparedData) -> list[str]:
        # A KV cache is useless in training and breaks packed-sequence isolation (the mask is built from positions
        # only when there is no cache).
        model.config.use_cache = False
        tokenizer = prepared.tokenizer
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(
            prepared.template.end_token_for(tokenizer)
        )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return []

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        from qlora_pipeline.data import packing
        from qlora_pipeline.training.trainer import PipelineSFTTrainer

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
            return medtuned.evaluate_medtuned(model, prepared.tokenizer, prepared.template, found, recipe)
        if recipe.task.generation_metric == "symptoms":
            from qlora_pipeline.tasks.metrics.symptoms import evaluate_symptoms

            return evaluate_symptoms(model, prepared.tokenizer, prepared.template, prepared.eval_rows, recipe)
        return {}


def _load_eval_files(data, files: list[str], columns):
    """The recipe's eval file, or several as one set (each row named by its file), or None."""
    if len(files) == 1:
        return data_mod.load_rows(files[0], data, columns=columns)
    if not files:
        return None
    loaded = [data_mod.load_rows(name, data, columns=columns) for name in files]
    names = _unique_names([short_name(name) for name in files])
    return data_mod.combine_sources(loaded, names, data.max_eval_samples)


def _skipped_rows_owner(eval_rows, train_rows, parts):
    """owner(row's source name): the RowSource whose skipped rows list a held-out row left out: the eval file(s)'
    where the recipe gives them, else the one dataset's, else (a mixture) the row's own source's."""
    if eval_rows is not None or parts is None:
        source = eval_rows if eval_rows is not None else train_rows
        return lambda name: source
    by_name = {part.source.name: part.loaded for part in parts}
    return lambda name: by_name[name]


def _source_templates(parts, template: PromptTemplate, tokenizer) -> dict[str, PromptTemplate]:
    """A mixture's sources with a template of their own, by name. Every answer must end with the same token, or
    the model would learn two ways to stop and inference would know one."""
    found = {}
    end = template.end_token_for(tokenizer)
    for part in parts or []:
        if part.source.template == template.name:
            continue
        own = get_template(part.source.template)
        if own.end_token_for(tokenizer) != end:
            raise DataError(
                f"dataset_mixture: source '{part.source.name}': template '{own.name}' ends answers with "
                f"{own.end_token_for(tokenizer)!r}, the recipe's template '{template.name}' with {end!r}; a model "
                "learns one way to stop, so use one end token"
            )
        found[part.source.name] = own
    return found


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
    set and listed with the skipped rows of `owner(row's source name)`, the RowSource it came from. Returns (eval
    rows, recognised rows, notes)."""
    data = recipe.data
    default = short_name(data.eval_files[0] if data.eval_files else data.data_label)
    locations = data_mod.column_values(eval_set, data_mod.ROW_COLUMN)
    sources = (
        data_mod.column_values(eval_set, data_mod.SOURCE_COLUMN)
        if data_mod.SOURCE_COLUMN in eval_set.column_names
        else None
    )
    dropped: list[int] = []

    def bad(index: int, reason: str) -> None:
        where = data_mod.Where.parse(locations[index])
        if data.on_bad_rows != "skip":
            raise DataError(f"{where}: {reason}")
        owner(sources[index] if sources else None).skipped.append(where.record(reason))
        dropped.append(index)

    def recognise(rows, where):
        return medtuned.scored_rows(rows, data, recipe.task.metric_family_column, default, where, bad)

    found = recognise(eval_set, locations.__getitem__)
    notes = []
    if dropped:
        skipped = set(dropped)
        eval_set = eval_set.select([i for i in range(len(eval_set)) if i not in skipped])
        locations = data_mod.column_values(eval_set, data_mod.ROW_COLUMN)
        found = recognise(eval_set, locations.__getitem__)
        notes.append(
            f"generation_metric medtuned: {len(dropped)} held-out rows whose gold answer does not parse were skipped"
        )
    notes += medtuned.check_found(found, ", ".join(data.eval_files) or data.data_label)
    return eval_set, found, notes


def load_tokenizer(model_args, training_args, template: PromptTemplate):
    """The causal LM's tokenizer for `template` (the task's own rule, `fit_end_and_pad_tokens`), for callers that
    hold a template rather than a recipe (inference from an adapter saved without its tokenizer). Returns
    (tokenizer, notes)."""
    tokenizer = loading.load_pretrained_tokenizer(model_args, training_args)
    notes = fit_end_and_pad_tokens(tokenizer, template)
    tokenizer.padding_side = "right"
    return tokenizer, notes


def fit_end_and_pad_tokens(tokenizer, template: PromptTemplate) -> list[str]:
    """The template's end token in the vocabulary, a pad token distinct from EOS and from that end token, and the
    template as the tokenizer's chat template. Returns notes on what changed.

    With pad == EOS, masking padding out of the loss also masks every EOS, and the model never learns to stop:
    Starling ships exactly that, with `<|pad_0|>` unused beside it."""
    notes = []
    end_token = template.end_token_for(tokenizer)
    if end_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [end_token]})
        notes.append(f"template '{template.name}': added {end_token!r} to the tokenizer (embeddings are resized)")
    pad = tokenizer.pad_token
    if pad is None or pad in (tokenizer.eos_token, end_token):
        vocab = tokenizer.get_vocab()
        found = next((t for t in KNOWN_PAD_TOKENS if t in vocab and t not in (tokenizer.eos_token, end_token)), None)
        if found:
            tokenizer.pad_token = found
            notes.append(f"pad token: {found!r} (was {pad!r}, which would hide the end of each answer from the loss)")
        else:
            tokenizer.add_special_tokens({"pad_token": loading.ADDED_PAD_TOKEN})
            notes.append(
                f"pad token: added {loading.ADDED_PAD_TOKEN!r} (was {pad!r}); the embeddings are resized to fit it"
            )
    # Saved with the adapter and the merged export, so inference renders prompts exactly as training did.
    tokenizer.chat_template = template.chat_template_for(tokenizer)
    return notes
