"""Seq2seq: generative question answering with an encoder-decoder model (T5), trained with LoRA (or QLoRA).

Each row holds a context, a question and an answer (the columns `context_column`, `question_column`,
`answer_column`). The encoder reads "question: {question} context: {context}", T5's own SQuAD format; the decoder
learns to write the answer. Nothing is padded at tokenization: DataCollatorForSeq2Seq pads each batch to its longest
input and its longest answer, the answer's padding as -100 so the loss skips it.

Lengths: an input longer than `max_length` follows the recipe's `overlong` policy (drop it, truncate it, or stop
naming the row); an answer longer than `max_target_length` is truncated (its `</s>` kept). Both are counted.

Trained with transformers' Seq2SeqTrainer, which generates during evaluation (greedy, `eval_max_new_tokens`) and
logs the metric next to the eval loss. The metric: exact match and token F1 as SQuAD defines them (normalised
answers; squad.py) and ROUGE-L F-measure (the `rouge-score` package), each 0..100 over the held-out rows.
"""

from __future__ import annotations

import json

from qlora_pipeline.data import rows as data_mod
from qlora_pipeline.data import tokenize as tokens
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.tasks.base import PreparedData, Split, Task, trainer_arguments

# Bump when `tokenize_split` changes what it writes, so cached results from older code are not reused.
TOKENIZE_VERSION = "1"
METRIC_NAMES = ("f1", "exact_match", "rougeL")


def model_input(question: str, context: str) -> str:
    """The encoder's text: T5's SQuAD format."""
    return f"question: {question} context: {context}"


# ---------------------------------------------------------------- the metric


def answer_scores(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """f1 and exact_match (SQuAD: normalised, bag-of-tokens F1) and rougeL (ROUGE-L F-measure of rouge-score's
    tokens: lower case, letters and digits), each the mean over the rows in 0..100; n: the rows scored."""
    from rouge_score import rouge_scorer

    from qlora_pipeline.tasks.metrics.squad import exact_match, token_f1

    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} answers")
    if not golds:
        return {"f1": 0.0, "exact_match": 0.0, "rougeL": 0.0, "n": 0}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(zip(predictions, golds, strict=True))
    rouge = [scorer.score(gold, prediction)["rougeL"].fmeasure for prediction, gold in pairs]
    return {
        "f1": _percent([token_f1(prediction, [gold]) for prediction, gold in pairs]),
        "exact_match": _percent([exact_match(prediction, [gold]) for prediction, gold in pairs]),
        "rougeL": _percent(rouge),
        "n": len(golds),
    }


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


# ---------------------------------------------------------------- data


def tokenize_split(dataset, tokenizer, recipe, name: str) -> tuple[tokens.TokenizedSplit, list[int], list[str]]:
    """input_ids, attention_mask and labels (the answer's ids, ending with </s>) per row, unpadded; n_tokens: the
    input's length before truncation. The split's `truncated` counts inputs cut at max_length; answers cut at
    max_target_length are counted in a note. Returns (split, indices of the rows kept, notes)."""
    task, max_length, policy = recipe.task, recipe.training.max_length, recipe.data.overlong
    max_target = task.max_target_length

    def encode(batch):
        inputs = [model_input(q, c) for q, c in zip(batch[task.question_column], batch[task.context_column])]
        full = tokenizer(inputs)
        targets = tokenizer(text_target=batch[task.answer_column])["input_ids"]
        cut = tokenizer(text_target=batch[task.answer_column], truncation=True, max_length=max_target)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": [], "n_tokens": [], "answer_cut": []}
        for i, ids in enumerate(full["input_ids"]):
            over = max_length is not None and len(ids) > max_length
            if over and policy == "truncate":  # truncated by the tokenizer, so its end token is kept
                kept = tokenizer(inputs[i], truncation=True, max_length=max_length)
                ids, mask = kept["input_ids"], kept["attention_mask"]
            else:
                mask = full["attention_mask"][i]
            out["input_ids"].append(ids)
            out["attention_mask"].append(mask)
            out["labels"].append(cut[i])
            out["n_tokens"].append(len(full["input_ids"][i]))
            out["answer_cut"].append(len(targets[i]) > len(cut[i]))
        return out

    key = tokens.fingerprint(
        dataset,
        tokenizer,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(max_length),
        str(max_target),
        policy,
        task.context_column,
        task.question_column,
        task.answer_column,
        TOKENIZE_VERSION,
    )
    encoded, from_cache = tokens.map_rows(dataset, encode, key, f"Tokenizing {name}", quiet=policy == "error")
    lengths = encoded["n_tokens"]
    over = tokens.over_max_length(
        encoded,
        lengths,
        max_length,
        policy,
        f"{name} rows are over",
        "input of {n} tokens (question and context)",
        "drop or truncate",
    )
    dropped = set(over) if policy == "drop" else set()
    keep = [i for i in range(len(encoded)) if i not in dropped]
    answer_cut = encoded["answer_cut"]
    notes = []
    if over:
        done = "dropped" if policy == "drop" else "truncated (the end of the context is cut)"
        notes.append(f"{name}: {len(over)} of {len(encoded)} inputs over max_length {max_length} tokens: {done}")
    if any(answer_cut):
        notes.append(
            f"{name}: {sum(answer_cut)} of {len(encoded)} answers over max_target_length {max_target} tokens: truncated"
        )
    kept = encoded.select(keep) if len(keep) != len(encoded) else encoded
    helpers = [c for c in ("answer_cut", data_mod.ROW_COLUMN) if c in kept.column_names]
    split = tokens.TokenizedSplit(
        dataset=kept.remove_columns(helpers),
        rows_in=len(dataset),
        overlong=len(over),
        dropped=len(encoded) - len(keep),
        truncated=len(over) if policy == "truncate" else 0,  # inputs cut at max_length (answers: in the notes)
        from_cache=from_cache,
        lengths=list(lengths),  # before truncation: the data's own length distribution
    )
    return split, keep, notes


# ---------------------------------------------------------------- the task


class Seq2SeqTask(Task):
    name = "seq2seq"
    metric_names = METRIC_NAMES
    auto_class = "AutoModelForSeq2SeqLM"

    def columns(self, recipe) -> data_mod.Columns:
        task = recipe.task
        return data_mod.Columns(
            required=(
                ("context_column", task.context_column),
                ("question_column", task.question_column),
                ("answer_column", task.answer_column),
            )
        )

    def prepare_data(self, recipe) -> PreparedData:
        from accelerate import PartialState

        tokenizer, notes = self.load_tokenizer(recipe)
        columns = self.columns(recipe)
        # The main process tokenizes and fills the datasets cache; the others then read it.
        with PartialState().main_process_first():
            train_rows, eval_rows = data_mod.load_train_and_eval(recipe.data, columns)
            train_set, eval_set = data_mod.split_train_eval(train_rows, recipe.data, recipe.training.seed, eval_rows)
            train, _, train_notes = tokenize_split(train_set, tokenizer, recipe, "train")
            evaluation, eval_kept, eval_notes = (
                tokenize_split(eval_set, tokenizer, recipe, "eval") if eval_set is not None else (None, [], [])
            )
        tokens.check_rows_left((train, evaluation), recipe.data.dataset_name, recipe.training.max_length, "input")
        # The gold answers of the eval split's examples, in its order: the trainer's metric during evaluation.
        eval_answers = [eval_set[i][recipe.task.answer_column] for i in eval_kept] if eval_set is not None else []
        train_split, held_out = Split(train_rows, train_set, train), Split(eval_rows, eval_set, evaluation)
        after, extra = train_notes + eval_notes, {"eval_answers": eval_answers}
        return PreparedData.from_splits(tokenizer, None, notes, train_split, held_out, after=after, extra=extra)

    def fit_tokenizer(self, tokenizer, recipe) -> list[str]:
        """The tokenizer as it ships (T5's has <pad>, </s> and its sentinels); answers must be able to end."""
        if tokenizer.eos_token is None:
            raise PipelineError(
                f"{tokenizer.name_or_path}: the tokenizer has no end-of-sequence token, so answers could not end"
            )
        if tokenizer.pad_token is not None:
            return []
        # Labels are padded with -100, so the pad token only fills the encoder's batches (and starts T5's decoder).
        tokenizer.pad_token = tokenizer.eos_token
        return [f"pad token: {tokenizer.eos_token!r} (the tokenizer had none)"]

    def configure_model(self, model, recipe, prepared: PreparedData) -> list[str]:
        model.config.use_cache = False  # no KV cache in training; generation asks for it
        model.generation_config.pad_token_id = prepared.tokenizer.pad_token_id
        model.generation_config.eos_token_id = prepared.tokenizer.eos_token_id
        return []

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

        tokenizer = prepared.tokenizer
        train_set = prepared.train.dataset.remove_columns(["n_tokens"])
        eval_set = prepared.eval.dataset.remove_columns(["n_tokens"]) if prepared.eval else None
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        return Seq2SeqTrainer(
            model=model,
            args=seq2seq_arguments(recipe),
            data_collator=collator,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            compute_metrics=_trainer_metric(tokenizer, prepared.extra.get("eval_answers") or []),
            callbacks=callbacks,
        )

    def evaluate(self, model, prepared: PreparedData, recipe) -> dict[str, float]:
        """Greedy answers to the held-out questions (at most metric_max_samples), scored against the gold answers."""
        rows = prepared.eval_rows
        if rows is None:
            return {}
        limit = recipe.task.metric_max_samples
        if limit is not None and limit < len(rows):
            rows = rows.select(range(limit))
        task = recipe.task
        inputs = [model_input(q, c) for q, c in zip(rows[task.question_column], rows[task.context_column])]
        predictions = generate_answers(
            model,
            prepared.tokenizer,
            inputs,
            max_input_length=recipe.training.max_length,
            max_new_tokens=task.eval_max_new_tokens,
            batch_size=recipe.training.per_device_eval_batch_size,
        )
        return answer_scores(predictions, list(rows[task.answer_column]))


def seq2seq_arguments(recipe):
    """Seq2SeqTrainingArguments from the recipe's training settings, generating during evaluation: greedy, at most
    eval_max_new_tokens answer tokens."""
    from transformers import Seq2SeqTrainingArguments

    return trainer_arguments(
        recipe,
        Seq2SeqTrainingArguments,
        # The pipeline asks causal-LM evaluation for the loss only; here the eval loop generates for the metric.
        prediction_loss_only=False,
        predict_with_generate=True,
        # max_length counts the decoder's start token: one more than the answer tokens generated.
        generation_max_length=recipe.task.eval_max_new_tokens + 1,
        generation_num_beams=1,
    )


def _trainer_metric(tokenizer, golds: list[str]):
    """compute_metrics for the Seq2SeqTrainer: its generated ids (in eval-set order) decoded and scored against the
    eval split's gold answers; the decoded labels where the counts differ (an eval set the trainer was handed)."""
    import numpy as np

    def compute(prediction) -> dict[str, float]:
        generated = np.where(prediction.predictions == -100, tokenizer.pad_token_id, prediction.predictions)
        answers = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        references = golds
        if len(references) != len(answers):
            labels = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
            references = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return answer_scores(answers, references)

    return compute


def generate_answers(model, tokenizer, inputs: list[str], *, max_input_length, max_new_tokens: int, batch_size: int):
    """Greedy generation, batch by batch, each batch padded to its longest input (truncated at max_input_length)."""
    import torch

    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(inputs), batch_size):
        batch = tokenizer(
            inputs[start : start + batch_size],
            truncation=max_input_length is not None,
            max_length=max_input_length,
            padding="longest",
            return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                # The decoder's length, its start token included. Not max_new_tokens: the Seq2SeqTrainer writes
                # max_length into the model's generation config, and generate() then warns at every batch.
                max_length=max_new_tokens + 1,
                num_beams=1,
                do_sample=False,
                use_cache=True,
            )
        answers += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return answers
