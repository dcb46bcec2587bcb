"""Extractive QA: BERT-style span prediction on SQuAD v1/v2 data (the diabetes example; bert-base-uncased).

Data. A SQuAD JSON file (`data[].paragraphs[].qas[]`, v1 or v2) is read by this module, which names a bad question by
file, line, its place in the file and its id: a missing question or context, answers that are not a list, an answer
whose text is not in the context, a duplicate id. An `answer_start` a few characters off its text (public sets have
off-by-one slips, and answer texts with a leading space) is moved onto it (`align_answer`), counted and listed. Flat
rows (JSONL, CSV, parquet, the Hub's `rajpurkar/squad_v2`) go through `rows.load_rows` with `question_column`,
`context_column` and `answers_column` ({text: [...], answer_start: [...]}, empty lists for an unanswerable question;
in a CSV, that object as JSON text). `on_bad_rows` applies to every one of those problems. Each question becomes one
example {id, context, question, answers}; the held-out split is by question (`rows.split_train_eval`).

Features. A context longer than a window is split into windows of `max_length` tokens (question + context) that
overlap by `doc_stride` tokens: `tokenizer(question, context, truncation="only_second", stride=doc_stride,
return_overflowing_tokens=True, return_offsets_mapping=True)`, unpadded (the collator pads each batch to its longest
window). The answer's start and end tokens come from the offset mapping; a window that does not hold the whole
answer, and every window of an unanswerable question, points both at [CLS].

Evaluation. Every window of a question is run through the model; over all of them, the `n_best_size` best start and
end tokens form candidate spans (inside the context, end after start, at most `max_answer_length` tokens), and the best
span's text is cut from the original context by its character offsets. Where the data has unanswerable questions
(SQuAD v2), the question is answered "" when the [CLS] score (start + end) beats the best span's by more than
`null_score_diff_threshold`, as the official v2 evaluation expects. Metrics (squad.py): exact match and F1 in
percent (0..100, like the official script), with the HasAns_/NoAns_ breakdown when there are unanswerable questions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qlora_pipeline.data import rows as data_mod
from qlora_pipeline.data import samples
from qlora_pipeline.data import tokenize as tokens
from qlora_pipeline.errors import DataError, PipelineError
from qlora_pipeline.tasks.base import PreparedData, Split, Task, trainer_arguments
from qlora_pipeline.tasks.metrics import squad

# Bump when the window features change, so cached tokenizations from older code are not reused.
FEATURES_VERSION = "1"
# The columns a window carries besides the model inputs: for the metric and the summary, never for the model.
BOOKKEEPING = ("n_tokens", "example_id", "offset_mapping", "cls_index")
# How far (in characters) an answer_start may be from its answer's text and still be moved onto it. Public
# SQuAD-format sets have off-by-one slips (offsets counted from one character early, a leading space kept in the
# text); farther off, the nearest mention of the text may be a different one, so only a text found once in the
# context is moved farther than this.
REALIGN_WINDOW = 20
REALIGNED = "answer realigned"


class ExtractiveQATask(Task):
    name = "extractive_qa"
    metric_names = ("f1", "exact_match")
    auto_class = "AutoModelForQuestionAnswering"
    resize_reason = ""

    # ------------------------------------------------------------ data

    def prepare_data(self, recipe) -> PreparedData:
        from accelerate import PartialState

        tokenizer, notes = self.load_tokenizer(recipe)
        with PartialState().main_process_first():
            train_source = load_examples(recipe.data.dataset_name, recipe, tokenizer)
            eval_source = load_examples(recipe.data.eval_files[0], recipe, tokenizer) if recipe.data.eval_file else None
            train_set, eval_set = data_mod.split_train_eval(
                train_source, recipe.data, recipe.training.seed, eval_source
            )
            train_set, eval_set = (_without_row_names(s) for s in (train_set, eval_set))
            train = tokenize_split(train_set, tokenizer, recipe, "train")
            evaluation = tokenize_split(eval_set, tokenizer, recipe, "eval") if eval_set is not None else None
        unanswerable = any(_has_unanswerable(s) for s in (train_set, eval_set) if s is not None)
        windows = [windows_note(split, name) for split, name in ((train, "train"), (evaluation, "eval")) if split]
        train_split, held_out = Split(train_source, train_set, train), Split(eval_source, eval_set, evaluation)
        extra = {"unanswerable": unanswerable}
        return PreparedData.from_splits(tokenizer, None, notes, train_split, held_out, after=windows, extra=extra)

    # ------------------------------------------------------------ model and trainer

    def fit_tokenizer(self, tokenizer, recipe) -> list[str]:
        """It must be a fast (Rust) tokenizer: the windows' character offsets come from it."""
        if not tokenizer.is_fast:
            raise PipelineError(
                f"{tokenizer.name_or_path}: extractive_qa needs a fast (Rust) tokenizer for character offsets; "
                f"{type(tokenizer).__name__} has none"
            )
        if tokenizer.pad_token is not None:
            return []
        # Encoder QA never scores padding (the attention mask hides it), so any existing token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return [f"pad token: {tokenizer.pad_token!r} (the tokenizer had none)"]

    def unquantized_modules(self, recipe) -> list[str]:
        # The new head stays a plain float layer: quantizing a randomly initialised head would leave it untrained,
        # and modules_to_save trains a full copy of it.
        return list(recipe.model.lora_modules_to_save or self.modules_to_save)

    def configure_model(self, model, recipe, prepared: PreparedData) -> list[str]:
        head = [n for n in self.modules_to_save if hasattr(model, n)]
        if head:
            return [f"{', '.join(head)}: the answer-span head, new (initialised from seed {recipe.training.seed})"]
        return []

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        from transformers import DataCollatorWithPadding, Trainer

        # Only model inputs and start/end positions reach the Trainer (model_inputs), named as its labels.
        args = trainer_arguments(recipe, label_names=["start_positions", "end_positions"], remove_unused_columns=False)
        half = args.fp16 or args.bf16
        return Trainer(
            model=model,
            args=args,
            # Pads each batch to its longest window (to a multiple of 8 for tensor cores in half precision).
            data_collator=DataCollatorWithPadding(prepared.tokenizer, pad_to_multiple_of=8 if half else None),
            train_dataset=model_inputs(prepared.train.dataset),
            eval_dataset=model_inputs(prepared.eval.dataset) if prepared.eval else None,
            processing_class=prepared.tokenizer,
            callbacks=callbacks,
        )

    # ------------------------------------------------------------ metric

    def evaluate(self, model, prepared: PreparedData, recipe) -> dict[str, float]:
        rows = prepared.eval_rows
        if rows is None or len(rows) == 0:
            return {}
        limit = recipe.task.metric_max_samples
        if limit and len(rows) > limit:
            rows = rows.select(range(limit))
        predictions = predict(model, prepared.tokenizer, rows, recipe, prepared.extra.get("unanswerable", True))
        golds = [answers["text"] for answers in rows["answers"]]
        return squad.squad_scores([predictions[i] for i in rows["id"]], golds)


# ---------------------------------------------------------------- reading examples


@dataclass
class _Problems:
    """Bad rows: an error naming the first (on_bad_rows: error), or left out and listed (skip)."""

    skip: bool
    records: list
    repaired: list = field(default_factory=list)  # answers moved onto their text: kept, listed, counted

    def __call__(self, where: data_mod.Where, reason: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {reason}")
        self.records.append(where.record(reason))

    def realigned(self, where: data_mod.Where, label: str, fixes: list[str]) -> None:
        self.repaired += [{**where.record(f"{label}: {fix}"), "fix": REALIGNED} for fix in fixes]


def load_examples(name: str, recipe, tokenizer=None) -> data_mod.RowSource:
    """The questions of a SQuAD JSON file or of flat rows, checked, as a RowSource whose dataset holds
    {id, context, question, answers: {text, answer_start}}. With `tokenizer`, a question too long to leave room for
    the context in a window is a bad row too."""
    from qlora_pipeline.data.rows import quiet_progress

    resolved = samples.resolve_sample(name) if samples.is_embedded(name) else name
    problems = _Problems(recipe.data.on_bad_rows == "skip", [])
    path = Path(resolved).expanduser()
    with quiet_progress():
        if path.is_file() and path.suffix.lower() == ".json" and _starts_with_object(path):
            rows, wheres, rows_read, notes = read_squad_json(path, problems)
        else:
            rows, wheres, rows_read, notes, skipped = read_flat_rows(resolved, recipe, problems)
            problems.records[:0] = skipped
        if tokenizer is not None:
            keep = check_question_lengths(rows, wheres, tokenizer, recipe, problems)
            rows, wheres = [rows[i] for i in keep], [wheres[i] for i in keep]
        if not rows:
            first = problems.records[0] if problems.records else None
            reason = f" (first: {_describe_record(first)})" if first else ""
            raise DataError(f"{resolved}: no questions left to train on: all {rows_read} were skipped{reason}")
        dataset = examples_dataset(rows)
    records = sorted(problems.records, key=lambda r: (r["file"], r["line"] or 0, r.get("row") or 0))
    if records:
        notes.append(
            f"{resolved}: {len(records)} of {rows_read} questions skipped (on_bad_rows: skip); "
            f"first: {_describe_record(records[0])}"
        )
    if problems.repaired:
        notes.append(
            f"{resolved}: {len(problems.repaired)} answers realigned: answer_start moved onto the answer's text, "
            f"whitespace around the text trimmed; first: {_describe_record(problems.repaired[0])}"
        )
    return data_mod.RowSource(dataset, str(resolved), wheres, rows_read, records, notes, problems.repaired)


def _describe_record(record: dict) -> str:
    where = data_mod.Where(record["file"], record["line"], record.get("row"))
    return f"{where}: {record['reason']}"


def _starts_with_object(path: Path) -> bool:
    """A .json file holding one object (SQuAD's layout) rather than an array of rows."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def examples_dataset(rows: list[dict]):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": {
                "text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32")),
            },
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def read_squad_json(path: Path, problems: _Problems):
    """(examples, where each is, questions read, notes) from a SQuAD JSON file. Every question is a row, named by
    its line (where its id is found in the text), its place in the file and its id."""
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        found = "no 'data' key" if isinstance(document, dict) else f"{data_mod.kind_of(document)}"
        raise DataError(f"{name}: not SQuAD JSON: expected an object with a 'data' list of articles, found {found}")
    lines = _id_lines(text)
    rows, wheres, seen = [], [], {}
    counter = {"read": 0}

    def where_of(qa, index: int) -> data_mod.Where:
        qid = qa.get("id") if isinstance(qa, dict) else None
        line = lines.get(str(qid), []).pop(0) if qid is not None and lines.get(str(qid)) else None
        return data_mod.Where(name, line=line, row=None if line is not None else index)

    for a, article in enumerate(document["data"]):
        place = f"data[{a}]"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            counter["read"] += 1
            problems(
                data_mod.Where(name, row=counter["read"]), f"{place}: expected an article with a 'paragraphs' list"
            )
            continue
        for p, paragraph in enumerate(paragraphs):
            place = f"data[{a}].paragraphs[{p}]"
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                counter["read"] += 1
                problems(data_mod.Where(name, row=counter["read"]), f"{place}: expected a paragraph with a 'qas' list")
                continue
            context = paragraph.get("context")
            for q, qa in enumerate(qas):
                counter["read"] += 1
                where = where_of(qa, counter["read"])
                label = f"{place}.qas[{q}]" + (f" (id {qa['id']!r})" if isinstance(qa, dict) and "id" in qa else "")
                answers, fixes, problem = _check_squad_question(qa, context, seen, where)
                if problem:
                    problems(where, f"{label}: {problem}")
                    continue
                problems.realigned(where, label, fixes)
                rows.append(_example(qa, context, answers))
                wheres.append(where)
    return rows, wheres, counter["read"], []


def _id_lines(text: str) -> dict[str, list[int]]:
    """id → the lines where `"id": "..."` appears, in order: how a question is named by line in a JSON document."""
    found: dict[str, list[int]] = {}
    for match in re.finditer(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)', text):
        try:
            value = str(json.loads(match.group(1)))
        except json.JSONDecodeError:
            continue
        found.setdefault(value, []).append(text.count("\n", 0, match.start()) + 1)
    return found


def _example(qa: dict, context: str, answers: dict) -> dict:
    return {
        "id": str(qa["id"]),
        "context": context,
        # Leading spaces only waste window room (some SQuAD questions have dozens).
        "question": qa["question"].strip(),
        "answers": answers,
    }


def _check_squad_question(qa, context, seen: dict, where: data_mod.Where):
    """(answers {text: [...], answer_start: [...]}, the realignments made, None) for a trainable SQuAD question, or
    (None, [], what makes it untrainable). A trainable question's id joins `seen`."""
    if not isinstance(qa, dict):
        return None, [], f"expected a question object, got {data_mod.kind_of(qa)}"
    if not isinstance(context, str) or not context.strip():
        return None, [], "its paragraph's 'context' is " + ("missing" if context is None else "empty or not text")
    problem = _text_problem(qa, "question") or _id_problem(qa.get("id"), seen, where)
    if problem:
        return None, [], problem
    answers = qa.get("answers", [])
    impossible = qa.get("is_impossible")
    if impossible is not None and not isinstance(impossible, bool):
        return None, [], f"'is_impossible' must be true or false, got {data_mod.kind_of(impossible)}"
    if not isinstance(answers, list):
        return None, [], f"'answers' must be a list of {{text, answer_start}}, got {data_mod.kind_of(answers)}"
    if impossible and answers:
        return None, [], f"'is_impossible' is true but it has {len(answers)} answer(s)"
    if impossible is False and not answers:
        return None, [], "no answers, and 'is_impossible' is false"
    for number, answer in enumerate(answers):
        if not isinstance(answer, dict):
            return None, [], f"answer {number}: expected {{text, answer_start}}, got {data_mod.kind_of(answer)}"
    texts = [answer.get("text") for answer in answers]
    starts = [answer.get("answer_start") for answer in answers]
    return align_answers(texts, starts, context)


def _text_problem(row: dict, column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return f"'{column}' is missing" if column not in row else f"'{column}' is null"
    if not isinstance(value, str):
        return f"'{column}' must be text, got {data_mod.kind_of(value)}"
    if not value.strip():
        return f"'{column}' is empty"
    return None


def _id_problem(value, seen: dict, where: data_mod.Where) -> str | None:
    if value is None:
        return "'id' is missing"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"'id' must be text or a whole number, got {data_mod.kind_of(value)}"
    first = seen.setdefault(str(value), where)
    if first is not where:
        return f"duplicate id {str(value)!r} (first at {first.relative_to(where)})"
    return None


def align_answers(texts: list, starts: list, context: str):
    """(answers {text, answer_start}, the realignments made, None), or (None, [], the first answer's problem); each
    realignment and problem starts with "answer N: "."""
    aligned, fixes = {"text": [], "answer_start": []}, []
    for number, (text, start) in enumerate(zip(texts, starts)):
        text_start, fix, problem = align_answer(text, start, context)
        if problem:
            return None, [], f"answer {number}: {problem}"
        aligned["text"].append(text_start[0])
        aligned["answer_start"].append(text_start[1])
        if fix:
            fixes.append(f"answer {number}: {fix}")
    return aligned, fixes, None


def align_answer(text, start, context: str):
    """((text, answer_start), what was fixed or None, None) for an answer whose text is in the context, or
    (None, None, why not). A start that misses its text is moved to the text's nearest occurrence within
    REALIGN_WINDOW characters (a tie is refused), or farther where the text occurs once; whitespace around the
    text is trimmed first."""
    if not isinstance(text, str) or not text.strip():
        return None, None, "'text' must be non-empty text" + ("" if text is None else f", got {data_mod.kind_of(text)}")
    if isinstance(start, bool) or not isinstance(start, int):
        return None, None, f"'answer_start' must be a whole number, got {data_mod.kind_of(start)}"
    if 0 <= start and context[start : start + len(text)] == text:
        return (text, start), None, None
    stripped = text.strip()
    expected = start + (len(text) - len(text.lstrip()))  # where the trimmed text would begin
    found, at = [], context.find(stripped)
    while at >= 0:
        found.append(at)
        at = context.find(stripped, at + 1)
    if not found:
        where = f"outside the context ({len(context)} characters)" if not 0 <= start < len(context) else "given"
        return None, None, f"answer_start {start} {where}: the answer {text!r} is nowhere in the context"
    nearest = min(found, key=lambda i: abs(i - expected))
    distance = abs(nearest - expected)
    ties = [i for i in found if abs(i - expected) == distance]
    if len(ties) > 1 or (distance > REALIGN_WINDOW and len(found) > 1):
        why = "equally near" if len(ties) > 1 else f"none within {REALIGN_WINDOW} characters of it"
        places = ", ".join(str(i) for i in (ties if len(ties) > 1 else found)[:5])
        return None, None, f"answer_start {start} misses the answer {text!r}, which is at {places} ({why}); fix the row"
    place = "its only occurrence" if len(found) == 1 else f"the nearest of {len(found)} occurrences"
    trimmed = f", text {text!r} trimmed to {stripped!r}" if stripped != text else ""
    moved = f"answer_start {start} → {nearest} ({place})" if nearest != start else f"answer_start {start} kept"
    return (stripped, nearest), moved + trimmed, None


@dataclass(frozen=True)
class _QAColumns(data_mod.Columns):
    """Question and context checked as text by rows.load_rows; the answers column travels with the rows and is
    checked here (data.Columns checks text columns only)."""

    answers: str = "answers"
    ids: str | None = None  # kept too where rows are rewritten after skips (data._clean_copy keeps `names` only)

    @property
    def names(self) -> list[str]:
        return [*super().names, self.answers, *([self.ids] if self.ids else [])]


def read_flat_rows(name: str, recipe, problems: _Problems):
    """(examples, wheres, rows read, notes, rows load_rows skipped) from JSONL/CSV/parquet/Hub rows."""
    task = recipe.task
    required = (("question_column", task.question_column), ("context_column", task.context_column))
    # JSON and CSV rows are parsed by data/rows.py keeping only the columns named, so the answers column is named too;
    # parquet and Hub datasets keep every column, and naming it there would select a column that may be missing.
    columns = (
        _QAColumns(required=required, answers=task.answers_column, ids=recipe.data.id_column)
        if _parsed_row_by_row(name)
        else data_mod.Columns(required=required)
    )
    source = data_mod.load_rows(name, recipe.data, columns=columns)
    dataset = source.dataset
    if task.answers_column not in dataset.column_names:
        raise DataError(
            f"{source.name}: missing column '{task.answers_column}' (columns present: "
            f"{', '.join(dataset.column_names)}); map yours with the recipe key answers_column"
        )
    id_column = recipe.data.id_column if recipe.data.id_column in dataset.column_names else None
    rows, wheres = [], []
    for index, row in enumerate(dataset):
        where = source.rows[index] if source.rows else data_mod.Where(source.name, row=index + 1)
        context = row[task.context_column]
        answers, fixes, problem = _flat_answers(row[task.answers_column], context, task.answers_column)
        if problem:
            problems(where, problem)
            continue
        problems.realigned(where, f"'{task.answers_column}'", fixes)
        qid = row[id_column] if id_column and row[id_column] is not None else f"row-{where.line or where.row}"
        question = row[task.question_column].strip()
        rows.append({"id": str(qid), "context": context, "question": question, "answers": answers})
        wheres.append(where)
    # load_examples notes every question skipped, these rows included.
    notes = [note for note in source.notes if "skipped (on_bad_rows: skip)" not in note]
    return rows, wheres, source.rows_read, notes, list(source.skipped)


def _parsed_row_by_row(name: str) -> bool:
    """Whether rows.load_rows reads `name` itself (local JSON, JSONL, CSV) rather than through `datasets`."""
    path = Path(name).expanduser()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return path.exists() and any(f.suffix.lower() in (".json", ".jsonl", ".csv") for f in files)


def _flat_answers(value, context: str, column: str):
    """({text, answer_start}, realignments, None) or (None, [], the problem) for one flat row's answers value."""
    if isinstance(value, str):  # a CSV cell: the object as JSON text
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as exc:
            return None, [], f"'{column}' is not valid JSON: {exc.msg}"
    if not isinstance(value, dict) or not {"text", "answer_start"} <= set(value):
        return (
            None,
            [],
            f"'{column}' must be an object {{text: [...], answer_start: [...]}}, got {data_mod.kind_of(value)}",
        )
    texts, starts = value["text"], value["answer_start"]
    if not isinstance(texts, list) or not isinstance(starts, list):
        return None, [], f"'{column}': text and answer_start must be lists"
    if len(texts) != len(starts):
        return None, [], f"'{column}': {len(texts)} texts but {len(starts)} answer_start values"
    answers, fixes, problem = align_answers(texts, starts, context)
    return answers, fixes, problem and f"'{column}' {problem}"


def check_question_lengths(rows, wheres, tokenizer, recipe, problems: _Problems) -> list[int]:
    """Indices of the questions that leave more than doc_stride tokens of context in a window; the others are bad
    rows (the tokenizer could not slide a window over the context)."""
    max_length, stride = recipe.training.max_length, recipe.task.doc_stride
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids) for ids in tokenizer([r["question"] for r in rows], add_special_tokens=False)["input_ids"]]
    keep = []
    for index, (row, length) in enumerate(zip(rows, lengths)):
        if room - length > stride:
            keep.append(index)
        else:
            problems(
                wheres[index],
                f"id {row['id']!r}: the question is {length} tokens, which leaves {max(room - length, 0)} of "
                f"max_length {max_length} for the context, not more than doc_stride {stride}; shorten it, raise "
                "max_length or lower doc_stride",
            )
    return keep


def _without_row_names(dataset):
    """split_train_eval adds each row's location under overlong: error; windows have no use for it."""
    if dataset is not None and data_mod.ROW_COLUMN in dataset.column_names:
        return dataset.remove_columns([data_mod.ROW_COLUMN])
    return dataset


def _has_unanswerable(dataset) -> bool:
    return any(not answers["text"] for answers in dataset["answers"])


# ---------------------------------------------------------------- windows


def encode_windows(tokenizer, questions, contexts, answers, max_length: int, stride: int) -> dict:
    """The windows of a batch of examples: model inputs, start/end positions ([CLS] where the window does not hold
    the whole answer, or there is none), the example each came from, and character offsets of its context tokens
    (None for the question and special tokens)."""
    encoded = tokenizer(
        list(questions),
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    example_of = encoded.pop("overflow_to_sample_mapping")
    offsets = encoded.pop("offset_mapping")
    out = {key: list(values) for key, values in encoded.items()}
    out.update(example_index=[], start_positions=[], end_positions=[], offset_mapping=[], cls_index=[], n_tokens=[])
    for window, window_offsets in enumerate(offsets):
        sequence_ids = encoded.sequence_ids(window)
        ids = encoded["input_ids"][window]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        example = example_of[window]
        start, end = answer_tokens(window_offsets, sequence_ids, answers[example], cls)
        out["example_index"].append(example)
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["offset_mapping"].append(
            [list(span) if sequence_ids[t] == 1 else None for t, span in enumerate(window_offsets)]
        )
        out["cls_index"].append(cls)
        out["n_tokens"].append(len(ids))
    return out


def answer_tokens(offsets, sequence_ids, answers: dict, cls: int) -> tuple[int, int]:
    """(start, end) token indices of the first answer in this window, or (cls, cls) where the window does not hold
    all of it or the question has none."""
    if not answers["text"]:
        return cls, cls
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [t for t, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls, cls
    # The first context token that ends after the answer starts, and the last that starts before it ends.
    start = next(t for t in context if offsets[t][1] > start_char)
    end = next(t for t in reversed(context) if offsets[t][0] < end_char)
    return start, end


def tokenize_split(dataset, tokenizer, recipe, name: str) -> tokens.TokenizedSplit:
    """The windows of every example of a split, cached by `datasets` where the rows come from a cached file."""
    max_length, stride = recipe.training.max_length, recipe.task.doc_stride
    ids = dataset["id"]

    def encode(batch):
        windows = encode_windows(tokenizer, batch["question"], batch["context"], batch["answers"], max_length, stride)
        windows["example_id"] = [batch["id"][i] for i in windows.pop("example_index")]
        return windows

    key = tokens.fingerprint(
        dataset,
        tokenizer,
        str(max_length),
        str(stride),
        FEATURES_VERSION,
    )
    windows, from_cache = tokens.map_rows(dataset, encode, key, f"Windows of {name}")
    per_example = _windows_per_example(ids, windows["example_id"])
    return tokens.TokenizedSplit(
        dataset=windows,
        rows_in=len(dataset),
        overlong=sum(1 for n in per_example.values() if n > 1),  # questions whose context needs several windows
        dropped=0,
        truncated=0,
        from_cache=from_cache,
        lengths=list(windows["n_tokens"]),  # tokens per window
    )


def _windows_per_example(ids, example_ids) -> dict[str, int]:
    counts = dict.fromkeys(ids, 0)
    for example_id in example_ids:
        counts[example_id] += 1
    return counts


def windows_note(split: tokens.TokenizedSplit, name: str) -> str:
    windows = len(split.dataset)
    return (
        f"{name}: {split.rows_in} questions → {windows} windows ({windows / max(split.rows_in, 1):.2f} per question; "
        f"{split.overlong} questions whose context spans several)"
    )


def model_inputs(windows):
    """The windows as the Trainer takes them: model inputs and start/end positions only."""
    return windows.remove_columns([c for c in BOOKKEEPING if c in windows.column_names])


# ---------------------------------------------------------------- prediction


def predict(model, tokenizer, rows, recipe, allow_unanswerable: bool) -> dict[str, str]:
    """id → predicted answer text ("" for 'no answer') for every example of `rows`."""
    task = recipe.task
    windows = encode_windows(
        tokenizer, rows["question"], rows["context"], rows["answers"], recipe.training.max_length, task.doc_stride
    )
    starts, ends = window_logits(model, tokenizer, windows, recipe.training.per_device_eval_batch_size)
    return postprocess(
        rows["id"],
        rows["context"],
        windows,
        starts,
        ends,
        n_best=task.n_best_size,
        max_answer_length=task.max_answer_length,
        null_threshold=task.null_score_diff_threshold if allow_unanswerable else None,
    )


def window_logits(model, tokenizer, windows: dict, batch_size: int):
    """Start and end logits of every window (a list of 1-D numpy arrays each, unpadded), in batches padded to
    their longest window."""
    import torch

    device = next(model.parameters()).device
    names = [n for n in tokenizer.model_input_names if n in windows]
    starts, ends = [], []
    batch_size = max(1, batch_size)
    with torch.no_grad():
        for first in range(0, len(windows["input_ids"]), batch_size):
            batch = [
                {n: windows[n][i] for n in names} for i in range(first, min(first + batch_size, len(windows[names[0]])))
            ]
            padded = tokenizer.pad(batch, return_tensors="pt")
            output = model(**{k: v.to(device) for k, v in padded.items()})
            for row, features in enumerate(batch):
                length = len(features["input_ids"])
                starts.append(output.start_logits[row, :length].float().cpu().numpy())
                ends.append(output.end_logits[row, :length].float().cpu().numpy())
    return starts, ends


def postprocess(
    ids, contexts, windows: dict, starts, ends, *, n_best: int, max_answer_length: int, null_threshold: float | None
) -> dict[str, str]:
    """id → the best answer over all of an example's windows: among the n_best start and end tokens of each window,
    the highest-scoring valid span (inside the context, end >= start, at most max_answer_length tokens), its text
    cut from the original context. With `null_threshold` (SQuAD v2), "" where the lowest [CLS] score of the example's
    windows beats the best span's by more than the threshold."""
    import numpy as np

    by_example: dict[int, list[int]] = {}
    for window, example in enumerate(windows["example_index"]):
        by_example.setdefault(example, []).append(window)
    predictions = {}
    for example, (example_id, context) in enumerate(zip(ids, contexts)):
        best_score, best_text, null_score = None, "", None
        for window in by_example.get(example, []):
            start_logits, end_logits = starts[window], ends[window]
            offsets = windows["offset_mapping"][window]
            cls = windows["cls_index"][window]
            window_null = float(start_logits[cls] + end_logits[cls])
            null_score = window_null if null_score is None else min(null_score, window_null)
            top_starts = np.argsort(start_logits)[::-1][:n_best]
            top_ends = np.argsort(end_logits)[::-1][:n_best]
            for s in top_starts:
                if offsets[s] is None:
                    continue
                for e in top_ends:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if best_score is None or score > best_score:
                        best_score, best_text = score, context[offsets[s][0] : offsets[e][1]]
        if null_threshold is not None and null_score is not None:
            if best_score is None or null_score - best_score > null_threshold:
                best_text = ""
        predictions[example_id] = best_text
    return predictions
