"""Text classification: one label per text (GPT-Neo 125M / 2.7B on school questions: Biology, Chemistry, Maths,
Physics), scored on held-out rows only.

Rows hold a text and a label (`text_column`, `label_column`; a label is text or a whole number, read as its text,
surrounding spaces removed). The classes are `class_names` in id order where the recipe gives them (a row with any
other label is a bad row, named file:line, under `on_bad_rows`), else the sorted labels of the training split (a
held-out label never seen in training is an error: no model could learn it). Their names go into the model config
(`id2label`, `label2id`), so a merged export names its classes.

The held-out split is stratified by label where it can be (every class gets its share of eval rows; plain
`rows.split_train_eval` otherwise, or the recipe's `eval_file`). Texts are tokenized without padding; each batch is
padded to its longest text by `DataCollatorWithPadding`; a text over `max_length` follows `overlong` (the tiny and
real recipes truncate: a classifier can still read the start of a long text). The model is
`AutoModelForSequenceClassification` with LoRA (or QLoRA) and its new head trained in full (`modules_to_save`).

GPT-style models have no pad token and classify from the last real token, which transformers finds as the rightmost
token that is not the pad token. The pad is EOS (as GPT-Neo classification does), padding goes right (GPT-Neo's
learned absolute positions would shift under left padding), and texts are tokenized with `split_special_tokens`, so a
text that contains the literal "<|endoftext|>" cannot produce the pad id and move the pooled position: the pad id
then never occurs inside a text. A tokenizer that adds EOS to every text itself gets a pad token of its own instead.

Metrics (`evaluate`, percentages 0..100 as the other tasks' so the merge's fidelity limit reads in points): accuracy,
macro-F1, one-vs-rest ROC AUC per class and macro (binary AUC on the second class for two classes), all by
scikit-learn on the softmax probabilities, and the confusion matrix (rows true, columns predicted).
"""

from __future__ import annotations

import json
from collections import Counter

from qlora_pipeline.data import rows as data_mod
from qlora_pipeline.data import tokenize as tokens
from qlora_pipeline.errors import DataError, PipelineError, RecipeError
from qlora_pipeline.model import loading
from qlora_pipeline.recipe.task_settings import label_text
from qlora_pipeline.tasks.base import PreparedData, Split, Task, trainer_arguments

# Bump when `tokenize_split` changes what it writes, so cached results from older code are not reused.
TOKENIZE_VERSION = "1"
METRIC_NAMES = ("macro_f1", "accuracy", "roc_auc_macro")


def _sorted_labels(labels) -> list[str]:
    """Distinct labels in id order: numerically where every label is a whole number ("2" before "10"), else by text."""
    distinct = set(labels)
    if all(_is_whole_number(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_whole_number(text: str) -> bool:
    return text.lstrip("-").isdigit()


# ---------------------------------------------------------------- tokenizer and rows


def _encode(tokenizer, texts: list[str], max_length: int | None = None):
    """Token ids of texts as the model reads them: special tokens the tokenizer adds (BERT's [CLS]/[SEP]), but none
    spelled inside a text (split_special_tokens), so no text holds the pad id."""
    truncate = {"truncation": True, "max_length": max_length} if max_length else {}
    return tokenizer(texts, split_special_tokens=True, **truncate)


def columns(recipe) -> data_mod.Columns:
    task = recipe.task
    return data_mod.Columns(
        required=(("text_column", task.text_column), ("label_column", task.label_column)), labels=(task.label_column,)
    )


def keep_known_labels(source: data_mod.RowSource, class_names: list[str], column: str, policy: str) -> None:
    """Rows whose label is not one of class_names are bad rows: an error naming the first (file:line) or, under
    on_bad_rows: skip, left out of `source` and listed with the other skipped rows."""
    allowed = set(class_names)
    keep, records = [], []
    for index, value in enumerate(source.dataset[column]):
        if label_text(value) in allowed:
            keep.append(index)
            continue
        where = source.rows[index] if source.rows is not None else data_mod.Where(source.name, row=index + 1)
        reason = f"label {label_text(value)!r} is not one of class_names ({', '.join(class_names)})"
        if policy != "skip":
            raise DataError(f"{where}: {reason}")
        records.append(where.record(reason))
    if not records:
        return
    if not keep:
        raise DataError(f"{source.name}: no rows left: every label is outside class_names ({', '.join(class_names)})")
    source.dataset = source.dataset.select(keep)
    if source.rows is not None:
        source.rows = [source.rows[i] for i in keep]
    source.skipped = sorted(source.skipped + records, key=lambda r: (r["file"], r["line"] or 0, r.get("row") or 0))
    source.notes.append(
        f"{source.name}: {len(records)} rows skipped for a label outside class_names (on_bad_rows: skip); "
        f"first: {records[0]['reason']}"
    )


def held_out_split(source: data_mod.RowSource, recipe, eval_source: data_mod.RowSource | None):
    """(train rows, eval rows or None, notes). The recipe's eval_file, else a split by seed: stratified by label where
    every class has two rows and each side can hold one of each (scikit-learn), else rows.split_train_eval's."""
    data_args, seed = recipe.data, recipe.training.seed
    if eval_source is not None or not data_args.eval_split_size:
        return (*data_mod.split_train_eval(source, data_args, seed, eval_source), [])
    from sklearn.model_selection import train_test_split

    labels = [label_text(v) for v in source.dataset[recipe.task.label_column]]
    size = data_args.eval_split_size
    try:
        train_index, eval_index = train_test_split(
            list(range(len(labels))),
            test_size=int(size) if size >= 1 else size,
            random_state=seed,
            shuffle=True,
            stratify=labels,
        )
    except ValueError:  # a class of one row, or fewer rows on a side than classes: split without strata
        train_set, eval_set = data_mod.split_train_eval(source, data_args, seed)
        rare = sorted(label for label, count in Counter(labels).items() if count < 2)
        reason = (
            f"class {rare[0]!r} has a single row" if rare else "a side would hold fewer rows than there are classes"
        )
        return train_set, eval_set, [f"held-out split not stratified by label: {reason}"]
    dataset = source.dataset
    if data_args.overlong == "error":  # each row carries its location, for the message that names an overlong one
        dataset = dataset.add_column(data_mod.ROW_COLUMN, [source.row(i) for i in range(len(dataset))])
    train_set, eval_set = dataset.select(train_index), dataset.select(eval_index)
    if data_args.max_train_samples:
        train_set = train_set.select(range(min(data_args.max_train_samples, len(train_set))))
    if data_args.max_eval_samples:
        eval_set = eval_set.select(range(min(data_args.max_eval_samples, len(eval_set))))
    return train_set, eval_set, [f"held-out split stratified by label: {len(eval_set)} eval rows (seed {seed})"]


def class_names_of(recipe, train_set, eval_set, locate) -> tuple[list[str], list[str]]:
    """(the classes in id order, notes). `locate(label)`: where a row with that label is, for an error message."""
    column = recipe.task.label_column
    train_labels = [label_text(v) for v in train_set[column]]
    if recipe.task.class_names:
        names = [label_text(name) for name in recipe.task.class_names]
    else:
        names = _sorted_labels(train_labels)
        if len(names) < 2:
            raise DataError(
                f"{recipe.data.dataset_name}: the training rows hold one label ({names[0]!r}); a classifier needs "
                "at least two"
            )
        unseen = _sorted_labels({label_text(v) for v in eval_set[column]} - set(names)) if eval_set else []
        if unseen:
            raise DataError(
                f"{locate(unseen[0])}: label {unseen[0]!r} is in the held-out rows but in no training row, so no "
                f"model could learn it (training labels: {', '.join(names)}); give it training rows, or list every "
                "class in class_names"
            )
    counts = {name: 0 for name in names}
    for label in train_labels:
        counts[label] += 1
    notes = [
        f"class {name!r} has {count} training row{'s' if count != 1 else ''}: the model can hardly learn it"
        for name, count in counts.items()
        if count < 2
    ]
    return names, notes


def _locator(train_source, eval_source, column: str):
    """locate(label): the first row holding that label, in the eval file if there is one, else in the dataset (a
    label held out but never trained on has all its rows in the held-out split, or past max_train_samples)."""

    def locate(label: str) -> str:
        source = eval_source or train_source
        for index, value in enumerate(source.dataset[column]):
            if label_text(value) == label:
                return source.row(index)
        return source.name

    return locate


# ---------------------------------------------------------------- tokenization


def tokenize_split(dataset, tokenizer, recipe, label2id: dict[str, int], name: str) -> tokens.TokenizedSplit:
    """input_ids, attention_mask (token_type_ids where the tokenizer makes them), labels and n_tokens per row, no
    padding. A text over max_length is dropped, truncated or an error, as `overlong` says, and counted."""
    text_column, label_column = recipe.task.text_column, recipe.task.label_column
    max_length, policy = recipe.training.max_length, recipe.data.overlong

    def encode(batch):
        texts = batch[text_column]
        encoded = dict(_encode(tokenizer, texts))
        lengths = [len(ids) for ids in encoded["input_ids"]]
        over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
        if over and policy == "truncate":  # the tokenizer cuts, so BERT-like models keep their closing [SEP]
            cut = _encode(tokenizer, [texts[i] for i in over], max_length)
            for key in encoded:
                for j, i in enumerate(over):
                    encoded[key][i] = cut[key][j]
        encoded["labels"] = [label2id[label_text(v)] for v in batch[label_column]]
        encoded["n_tokens"] = lengths
        return encoded

    key = tokens.fingerprint(
        dataset,
        tokenizer,
        str(tokenizer.pad_token),
        json.dumps(label2id, sort_keys=True),
        recipe.task.text_column,
        recipe.task.label_column,
        str(recipe.training.max_length),
        recipe.data.overlong,
        TOKENIZE_VERSION,
    )
    encoded, from_cache = tokens.map_rows(dataset, encode, key, f"Tokenizing {name}", quiet=policy == "error")
    lengths = encoded["n_tokens"]
    over = tokens.over_max_length(
        encoded, lengths, max_length, policy, f"{name} rows are over", "text of {n} tokens", "truncate"
    )
    kept = encoded
    if over and policy == "drop":
        dropped = set(over)
        kept = encoded.select([i for i in range(len(encoded)) if i not in dropped])
    if data_mod.ROW_COLUMN in kept.column_names:
        kept = kept.remove_columns([data_mod.ROW_COLUMN])
    return tokens.TokenizedSplit(
        dataset=kept,
        rows_in=len(dataset),
        overlong=len(over),
        dropped=len(over) if policy == "drop" else 0,
        truncated=len(over) if policy == "truncate" else 0,
        from_cache=from_cache,
        lengths=list(lengths),
    )


# ---------------------------------------------------------------- model and trainer


def head_modules(model) -> list[str]:
    """The task head: the model's top-level modules with weights outside its base model (GPT-Neo: score; BERT:
    classifier; DistilBERT: pre_classifier and classifier), all new and random until trained."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [
        name for name, module in model.named_children() if module is not base and any(True for _ in module.parameters())
    ]


def trainer_metrics(prediction) -> dict[str, float]:
    """compute_metrics for the Trainer's evaluations: accuracy and macro-F1 (percent) on the eval split."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(-1)
    gold = np.asarray(prediction.label_ids)
    return {
        "accuracy": 100.0 * float(accuracy_score(gold, predicted)),
        "macro_f1": 100.0 * float(f1_score(gold, predicted, average="macro", zero_division=0)),
    }


# ---------------------------------------------------------------- metrics


def classification_metrics(gold, probabilities, class_names: list[str]) -> dict:
    """accuracy, macro_f1, roc_auc_macro, roc_auc_<class> (percent), n, and the confusion matrix, by scikit-learn.

    `gold`: class ids; `probabilities`: one row per example, one column per class (softmax). Macro-F1 averages over
    the classes present in the gold labels or the predictions (scikit-learn's default). A class's one-vs-rest AUC is
    None where the eval rows hold none of it (or nothing else); the macro AUC is then the mean over the classes that
    have one, and `notes` says so. With two classes the macro AUC is the binary AUC of the second class."""
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(gold, dtype=np.int64)
    scores = np.asarray(probabilities, dtype=np.float64)
    scores = scores / scores.sum(axis=1, keepdims=True)  # float32 softmax rows, summed in float64: exactly 1
    ids = list(range(len(class_names)))
    predicted = scores.argmax(axis=1)
    per_class, notes = {}, []
    for k, name in enumerate(class_names):
        positives = y == k
        if positives.all() or not positives.any():
            per_class[name] = None
            notes.append(f"roc_auc_{name}: undefined, the eval rows hold {'only' if positives.any() else 'no'} {name}")
        else:
            per_class[name] = 100.0 * float(roc_auc_score(positives, scores[:, k]))
    defined = [value for value in per_class.values() if value is not None]
    if len(class_names) == 2:
        macro = per_class[class_names[1]]
    elif len(defined) == len(class_names):
        macro = 100.0 * float(roc_auc_score(y, scores, multi_class="ovr", average="macro", labels=ids))
    else:
        macro = sum(defined) / len(defined) if defined else None
        if defined:
            notes.append(f"roc_auc_macro: the mean over the {len(defined)} classes the eval rows hold")
    metrics = {
        "macro_f1": 100.0 * float(f1_score(y, predicted, average="macro", zero_division=0)),
        "accuracy": 100.0 * float(accuracy_score(y, predicted)),
        "roc_auc_macro": macro,
        **{f"roc_auc_{name}": value for name, value in per_class.items()},
        "n": len(y),
        "confusion_matrix": {
            "labels": list(class_names),
            "matrix": confusion_matrix(y, predicted, labels=ids).tolist(),
        },
    }
    if notes:
        metrics["notes"] = notes
    return metrics


def plot_confusion_matrix(metrics: dict, path) -> None:
    """The confusion matrix of `classification_metrics` as a PNG heat map with counts (rows true, columns
    predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = metrics["confusion_matrix"]["labels"], metrics["confusion_matrix"]["matrix"]
    size = max(3.0, 0.6 * len(labels) + 1.5)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.colorbar(image, ax=axes)
    axes.set_title(f"accuracy {metrics['accuracy']:.1f}%, macro-F1 {metrics['macro_f1']:.1f}%")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def predict_probabilities(model, tokenizer, texts: list[str], batch_size: int, max_length: int | None):
    """Softmax class probabilities (numpy, one row per text, in the texts' order). Texts over max_length are truncated
    (every held-out row gets a prediction); batches are formed by length so little padding is computed."""
    import numpy as np
    import torch

    encoded = _encode(tokenizer, texts, max_length)
    keys = [key for key in encoded if key in ("input_ids", "attention_mask", "token_type_ids")]
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    device = next(model.parameters()).device
    probabilities = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = tokenizer.pad([{key: encoded[key][i] for key in keys} for i in chosen], return_tensors="pt")
        with torch.no_grad():
            logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        probabilities[chosen] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probabilities


# ---------------------------------------------------------------- the task


class ClassificationTask(Task):
    name = "classification"
    metric_names = METRIC_NAMES
    auto_class = "AutoModelForSequenceClassification"
    # split_special_tokens is saved with the tokenizer (adapter folder, merged export): a pipeline built from either
    # reads "<|endoftext|>" in a text as training did, as text.
    tokenizer_options = {"split_special_tokens": True}
    resize_reason = " for the added pad token"

    def prepare_data(self, recipe) -> PreparedData:
        from accelerate import PartialState

        tokenizer, notes = self.load_tokenizer(recipe)
        task, wanted = recipe.task, columns(recipe)
        # The main process tokenizes and fills the datasets cache; the others then read it.
        with PartialState().main_process_first():
            train_source, eval_source = data_mod.load_train_and_eval(recipe.data, wanted)
            sources = [s for s in (train_source, eval_source) if s is not None]
            if task.class_names:
                allowed = [label_text(name) for name in task.class_names]
                for source in sources:
                    keep_known_labels(source, allowed, task.label_column, recipe.data.on_bad_rows)
            train_set, eval_set, split_notes = held_out_split(train_source, recipe, eval_source)
            locate = _locator(train_source, eval_source, task.label_column)
            class_names, label_notes = class_names_of(recipe, train_set, eval_set, locate)
            label2id = {name: i for i, name in enumerate(class_names)}
            train = tokenize_split(train_set, tokenizer, recipe, label2id, "train")
            evaluation = tokenize_split(eval_set, tokenizer, recipe, label2id, "eval") if eval_set else None
        tokens.check_rows_left((train, evaluation), recipe.data.dataset_name, recipe.training.max_length, "text")
        classes = f"classes: {', '.join(f'{i} {name}' for i, name in enumerate(class_names))}"
        extra = {"class_names": class_names, "label2id": label2id}
        train_split, held_out = Split(train_source, train_set, train), Split(eval_source, eval_set, evaluation)
        after = [*split_notes, *label_notes, classes]
        return PreparedData.from_splits(tokenizer, None, notes, train_split, held_out, after=after, extra=extra)

    def fit_tokenizer(self, tokenizer, recipe) -> list[str]:
        """A pad token that never occurs inside a text (see the module docstring)."""
        added = set(_encode(tokenizer, ["a b"])["input_ids"][0])  # what the tokenizer puts around every text
        if tokenizer.pad_token is None and tokenizer.eos_token is not None and tokenizer.eos_token_id not in added:
            tokenizer.pad_token = tokenizer.eos_token
            return [f"pad token: {tokenizer.eos_token!r} (EOS; the tokenizer had none)"]
        if tokenizer.pad_token is None or tokenizer.pad_token_id in added:
            # No EOS to use, or one the tokenizer adds to every text, where pooling would skip it: a token of its own.
            tokenizer.add_special_tokens({"pad_token": loading.ADDED_PAD_TOKEN})
            return [f"pad token: added {loading.ADDED_PAD_TOKEN!r}; the embeddings are resized to fit it"]
        return []

    def model_options(self, recipe, prepared: PreparedData) -> dict:
        class_names = prepared.extra["class_names"]
        _check_trained_head(recipe.model, recipe.training, class_names)
        return {
            "num_labels": len(class_names),
            "id2label": dict(enumerate(class_names)),
            "label2id": {name: i for i, name in enumerate(class_names)},
        }

    def configure_model(self, model, recipe, prepared: PreparedData) -> list[str]:
        # The classifier pools each row's last token that is not the pad token (see the module docstring): the pad
        # id is set by the loader.
        model.config.use_cache = False
        self._check_head_trains(model, recipe)
        return []

    def _check_head_trains(self, model, recipe) -> None:
        """A head module left out of modules_to_save would stay at its random initialisation: refuse."""
        if not recipe.model.use_peft:
            return
        trained = set(recipe.model.lora_modules_to_save or []) | {"classifier", "score"}  # peft's SEQ_CLS adds these
        missing = [name for name in head_modules(model) if name not in trained]
        if missing:
            wanted = ", ".join(sorted(set(recipe.model.lora_modules_to_save or []) | set(missing)))
            raise RecipeError(
                f"{recipe.source}: key 'lora_modules_to_save': the model's head has {', '.join(missing)}, which LoRA "
                f"would leave at its random initialisation; set lora_modules_to_save: [{wanted}]"
            )

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        from transformers import DataCollatorWithPadding, Trainer

        train_set = prepared.train.dataset.remove_columns(["n_tokens"])
        eval_set = prepared.eval.dataset.remove_columns(["n_tokens"]) if prepared.eval else None
        return Trainer(
            model=model,
            # The logits are kept for the accuracy and macro-F1 logged at each evaluation; a PeftModel's forward hides
            # the label name from the Trainer's signature check.
            args=trainer_arguments(recipe, prediction_loss_only=False, label_names=["labels"]),
            data_collator=DataCollatorWithPadding(prepared.tokenizer),  # each batch padded to its longest text
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=prepared.tokenizer,
            compute_metrics=trainer_metrics if eval_set is not None else None,
            callbacks=callbacks,
        )

    def evaluate(self, model, prepared: PreparedData, recipe) -> dict:
        """The metrics of `classification_metrics` on the held-out rows (at most metric_max_samples)."""
        rows = prepared.eval_rows
        if rows is None or len(rows) == 0:
            return {}
        if recipe.task.metric_max_samples:
            rows = rows.select(range(min(recipe.task.metric_max_samples, len(rows))))
        class_names, label2id = prepared.extra["class_names"], prepared.extra["label2id"]
        _check_model_classes(model, class_names)
        gold = [label2id[label_text(value)] for value in rows[recipe.task.label_column]]
        probabilities = predict_probabilities(
            model,
            prepared.tokenizer,
            list(rows[recipe.task.text_column]),
            recipe.training.per_device_eval_batch_size,
            recipe.training.max_length,
        )
        return classification_metrics(gold, probabilities, class_names)


def _check_trained_head(model_args, training_args, class_names: list[str]) -> None:
    """A checkpoint that already is a sequence classifier (a merged export, a model given to `evaluate --model`) must
    be one for the data's classes, in their order: from_pretrained would otherwise relabel its head with ours."""
    from transformers import AutoConfig

    name = loading.resolve_model_path(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except Exception:  # loading the model reports it, with its own message
        return
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return  # a base model: the head is new
    _check_classes(name, [config.id2label[i] for i in range(config.num_labels)], class_names)


def _check_classes(name: str, names: list, class_names: list[str]) -> None:
    if [str(n) for n in names] != class_names:
        raise PipelineError(
            f"{name}: the model's classes ({', '.join(map(str, names)) or 'none'}) are not the data's "
            f"({', '.join(class_names)}): its head was trained for other labels"
        )


def _check_model_classes(model, class_names: list[str]) -> None:
    """A model given to `evaluate` must have the data's classes, in the same order."""
    config = model.config
    names = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else []
    _check_classes(getattr(config, "name_or_path", "") or "the model", names, class_names)
