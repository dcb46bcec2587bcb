"""The MedTuned generation metric of the causal-LM task (`generation_metric: medtuned`).

Llama2-MedTuned-Instructions teaches biomedical tasks as instruction → answer text. Each held-out row is answered
greedily in the training template (generation.py) and scored by its task family, recognised from the gold answer
and the instruction (or named per row by the recipe's `metric_family_column`: ner, single_label, multi_label, none):

- **ner**: the gold answer is one `word : B|I|O` line per input word. The predicted lines are aligned to the gold
  words (difflib; a gold word no predicted line names is O) and scored as entity spans, strict IOB2, with `seqeval`:
  entity precision / recall / F1 (the subtask's score) and token accuracy. A row is *parsed* when every predicted
  line is `word : tag` and the words are the input's, in order.
- **single_label** (relation extraction as GAD's Positive / Negative, NLI, yes/no/maybe QA, a labelled class): the
  gold answer is one of the options the instruction lists (`- Label` or `Label: meaning` lines) or of a known label
  vocabulary. The prediction's first line, normalised (case, whitespace, surrounding quotes and punctuation; the
  part before a ':'), must equal a label to be *parsed*; accuracy, macro-F1 (the score) and micro-F1 over the labels
  with scikit-learn. An invalid prediction counts as wrong for every average.
- **multi_label** (HoC: the instruction asks for "one or more" labels of a listed set): the gold answer is `None` or
  labels joined by `, `. The predicted set is read the same way (a label's parenthesised abbreviation, `PS`, counts
  as the label); *parsed* when every part is a label. Micro-F1 (the score) and example-averaged F1 with
  scikit-learn, where an empty gold set predicted empty scores 1.

The subtask is the family and, for single labels, the vocabulary (`nli`, `re`, `qa`, else `classification`); with
several held-out files each subtask is prefixed with its file's name (`re_gad-train/re`). Keys are flat,
`SUBTASK/METRIC`, percentages 0..100; the overall `task_score` is the mean of the subtasks' scores and `parsed` the
share of scored rows whose answer parsed. A row of no recognisable family is counted (`n_unscored`), listed with the
generations and not generated. A gold answer that does not parse as its family is a bad row (file and line named).

Each row's answer budget comes from what the answer can be, never from the gold answer: NER a line per input word,
a label the longest allowed label, a label set all labels joined.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from qlora_pipeline.data.rows import SOURCE_COLUMN

# The headline metrics first, as Task.metric_names.
METRIC_NAMES = ("task_score", "parsed")
FAMILIES = ("ner", "single_label", "multi_label")
UNSCORED = "none"

# Label sets a row's gold answer may come from without the instruction listing them; the key names the subtask.
VOCABULARIES = {
    "nli": ("entailment", "contradiction", "neutral"),
    "re": ("positive", "negative"),
    "qa": ("yes", "no", "maybe"),
}
_MULTI = re.compile(r"\bone or more\b|\bmulti-?label\b|\ball (?:labels )?(?:that|which) apply\b|\bany number of\b")
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)])\s*")
_ABBREVIATION = re.compile(r"\(([^()]{1,12})\)\s*$")
_NONE = "none"
# Tokens per NER answer line beyond the word's own ("word : B" and the line break), and after a whole answer.
NER_LINE_EXTRA_TOKENS = 4
ANSWER_EXTRA_TOKENS = 3


def normalise(text: str) -> str:
    """Lowercase, inner whitespace collapsed, surrounding quotes, brackets and punctuation dropped."""
    return " ".join(text.lower().split()).strip(" \"'`*.,;:!?()[]")


# ---------------------------------------------------------------- parsing answers


def parse_ner(text: str) -> tuple[list[tuple[str, str]], int]:
    """(word, tag) pairs of the `word : B|I|O` lines (tag case and a `-TYPE` suffix ignored), and the number of
    non-empty lines that are not of that form."""
    pairs, bad = [], 0
    for line in text.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        word, separator, tag = line.rpartition(" : ")
        tag = tag.strip().upper()
        if separator and word.strip() and tag[:1] in ("B", "I", "O") and (len(tag) == 1 or tag[1] == "-"):
            pairs.append((word.strip(), tag[0]))
        else:
            bad += 1
    return pairs, bad


def listed_options(instruction: str) -> list[str]:
    """The labels an instruction lists, one per line after its first: `- Label`, `Label: what it means`, `Label`."""
    options = []
    for line in instruction.splitlines()[1:]:
        line = _BULLET.sub("", line).strip()
        head = line.split(":", 1)[0].strip()
        if head and len(head.split()) <= 8:
            options.append(head)
    return options


@dataclass
class LabelSet:
    """A subtask's labels, and every spelling a prediction may use for each: the label, without its parenthesised
    abbreviation, the abbreviation alone."""

    labels: list[str] = field(default_factory=list)
    _keys: dict[str, str] = field(default_factory=dict)

    def add(self, label: str) -> None:
        label = label.strip()
        if not label or normalise(label) == _NONE or normalise(label) in self._keys:
            return
        self.labels.append(label)
        self._keys.setdefault(normalise(label), label)
        short = _ABBREVIATION.search(label)
        if short:
            self._keys.setdefault(normalise(label[: short.start()]), label)
            self._keys.setdefault(normalise(short.group(1)), label)

    def match(self, text: str) -> str | None:
        return self._keys.get(normalise(text))

    def parse_one(self, text: str) -> str | None:
        """The label a single-label answer names: its first line, or the part of it before a ':'."""
        first = text.strip().split("\n", 1)[0]
        return self.match(first) or (self.match(first.split(":", 1)[0]) if ":" in first else None)

    def parse_many(self, text: str) -> tuple[set[str], bool]:
        """(labels, parsed) of a label-set answer: `None`, or labels separated by commas, semicolons or lines. A part
        that is no label is joined to the next one first (a label may hold a comma); `parsed` is False if some part
        still matches nothing."""
        answer = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
        if normalise(answer) == _NONE:
            return set(), True
        found, parsed, pending = set(), bool(answer.strip()), ""
        for part in re.split(r"[,;\n]", answer):
            candidate = f"{pending},{part}" if pending else part
            label = self.match(candidate)
            if label is not None:
                found.add(label)
                pending = ""
            elif normalise(candidate):
                pending = candidate
        if pending:
            parsed = False
        return found, parsed


# ---------------------------------------------------------------- recognising rows


@dataclass
class ScoredRow:
    """One held-out row the metric scores (or lists as unscored)."""

    index: int  # position in the held-out rows
    where: str  # file:line
    source: str  # the held-out file's short name
    subtask: str | None  # None: no family recognised
    family: str | None
    instruction: str
    input: str | None
    gold: object = None  # ner: [(word, tag)]; single_label: label; multi_label: set of labels
    options: list[str] = field(default_factory=list)


def recognise(instruction: str, output: str, family: str | None = None):
    """(family, subtask, gold, options) of a row, or (None, None, None, []) where no family fits; raises ValueError
    (the reason) where a family fits but the gold answer does not parse as it. `family`: the row's own, from
    `metric_family_column` (None: recognise it)."""
    if family == UNSCORED:
        return None, None, None, []
    if family is not None and family not in FAMILIES:
        raise ValueError(f"metric family {family!r} is none of {', '.join((*FAMILIES, UNSCORED))}")
    options = listed_options(instruction)
    pairs, bad = parse_ner(output)
    if family == "ner" or (family is None and pairs and not bad):
        if not pairs or bad:
            raise ValueError("gold answer is not one 'word : B|I|O' line per word")
        return "ner", "ner", pairs, []
    labels = LabelSet()
    for option in options:
        labels.add(option)
    multi_asked = len(labels.labels) >= 2 and _MULTI.search(instruction.lower()) is not None
    if family == "multi_label" or (family is None and multi_asked):
        if not labels.labels:  # named by the family column, no list in the instruction: the gold parts are labels
            for part in re.split(r"[,;\n]", output):
                labels.add(part)
        gold, parsed = labels.parse_many(output)
        if not parsed:
            raise ValueError(f"gold answer {output[:80]!r} is not 'None' or labels the instruction lists")
        return "multi_label", "multilabel", gold, labels.labels
    gold = normalise(output)
    for name, vocabulary in VOCABULARIES.items():
        if gold in vocabulary:
            return "single_label", name, labels.match(output) or gold, [*labels.labels, *vocabulary]
    if labels.match(output) is not None:
        return "single_label", "classification", labels.match(output), labels.labels
    if family == "single_label":
        if "\n" in output.strip() or len(output.split()) > 12:
            raise ValueError(f"gold answer {output[:80]!r} is not a single label")
        return "single_label", "classification", output.strip(), labels.labels
    return None, None, None, []


def scored_rows(rows, data_args, family_column: str | None, default_source: str, where, bad) -> list[ScoredRow]:
    """Every held-out row, recognised. `where(index)`: the row's file:line; `bad(index, reason)`: a gold answer that
    does not parse (raises, or records the row as skipped and returns). Rows `bad` skipped are left out."""
    found = []
    several = SOURCE_COLUMN in rows.column_names
    for index, row in enumerate(rows):
        instruction, output = row[data_args.instruction_column], row[data_args.output_column]
        extra = row.get(data_args.input_column) if data_args.input_column else None
        family = (row.get(family_column) or None) if family_column else None
        family = family.strip().lower() if isinstance(family, str) else family
        try:
            kind, subtask, gold, options = recognise(instruction, output, family)
        except ValueError as reason:
            bad(index, f"generation_metric medtuned: {reason}")
            continue
        source = row[SOURCE_COLUMN] if several else default_source
        if subtask is not None and several:
            subtask = f"{source}/{subtask}"
        found.append(ScoredRow(index, where(index), source, subtask, kind, instruction, extra, gold, options))
    return found


def label_sets(found: list[ScoredRow]) -> dict[str, LabelSet]:
    """Each label subtask's labels: those its instructions list and its gold answers hold."""
    sets: dict[str, LabelSet] = {}
    for row in found:
        if row.family in ("single_label", "multi_label"):
            labels = sets.setdefault(row.subtask, LabelSet())
            for option in row.options:
                labels.add(option)
            for label in [row.gold] if row.family == "single_label" else sorted(row.gold):
                labels.add(label)
    return sets


def token_budget(row: ScoredRow, labels: LabelSet | None, tokenizer) -> int:
    """The most new tokens the row's answer can need, from its input and its labels (never its gold answer)."""
    if row.family == "ner":
        words = (row.input or "").split() or [word for word, _ in row.gold]
        lengths = tokenizer(words, add_special_tokens=False)["input_ids"]
        return sum(len(ids) + NER_LINE_EXTRA_TOKENS for ids in lengths) + ANSWER_EXTRA_TOKENS
    ids = tokenizer(labels.labels or ["None"], add_special_tokens=False)["input_ids"]
    if row.family == "single_label":
        return max(len(i) for i in ids) + ANSWER_EXTRA_TOKENS
    return sum(len(i) + 1 for i in ids) + ANSWER_EXTRA_TOKENS  # every label, comma-separated


# ---------------------------------------------------------------- scoring


def _pct(value) -> float:
    return round(100 * float(value), 2)


def align_ner(gold: list[tuple[str, str]], predicted: list[tuple[str, str]]) -> list[str]:
    """The predicted tag of each gold word: predicted lines matched to gold words in order (difflib); a gold word
    no predicted line names gets O."""
    tags = ["O"] * len(gold)
    matcher = difflib.SequenceMatcher(None, [w for w, _ in gold], [w for w, _ in predicted], autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            tags[block.a + offset] = predicted[block.b + offset][1]
    return tags


def _iob2(tags: list[str]) -> list[str]:
    return [tag if tag == "O" else f"{tag}-ENT" for tag in tags]


def ner_scores(gold_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict:
    """Entity precision / recall / F1 (strict IOB2 spans) and token accuracy, with seqeval, percentages."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    truth, guess = [_iob2(t) for t in gold_tags], [_iob2(t) for t in predicted_tags]
    strict = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    f1 = _pct(f1_score(truth, guess, **strict))
    return {
        "score": f1,
        "entity_f1": f1,
        "entity_precision": _pct(precision_score(truth, guess, **strict)),
        "entity_recall": _pct(recall_score(truth, guess, **strict)),
        "token_accuracy": _pct(accuracy_score(truth, guess)),
    }


INVALID = "<invalid>"


def single_label_scores(gold: list[str], predicted: list[str | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and micro-F1 over `labels` with scikit-learn, percentages; None (invalid) is wrong."""
    from sklearn.metrics import accuracy_score, f1_score

    guess = [p if p is not None else INVALID for p in predicted]
    macro = _pct(f1_score(gold, guess, labels=labels, average="macro", zero_division=0))
    return {
        "score": macro,
        "accuracy": _pct(accuracy_score(gold, guess)),
        "macro_f1": macro,
        "micro_f1": _pct(f1_score(gold, guess, labels=labels, average="micro", zero_division=0)),
    }


def multi_label_scores(gold: list[set[str]], predicted: list[set[str]], labels: list[str]) -> dict:
    """Micro-F1 over the labels and example-averaged F1 (an empty set predicted for an empty gold set scores 1), with
    scikit-learn, percentages. A predicted set holding INVALID (an answer part that is no label) is wrong in that
    part: for the example average it is one more predicted label; micro-F1 counts the real labels only."""
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer(classes=[*labels, INVALID]).fit([labels])
    truth, guess = binarizer.transform(gold), binarizer.transform(predicted)
    real = list(range(len(labels)))
    micro = _pct(f1_score(truth, guess, labels=real, average="micro", zero_division=0))
    return {
        "score": micro,
        "micro_f1": micro,
        "example_f1": _pct(f1_score(truth, guess, average="samples", zero_division=1)),
    }


def _row_f1(gold: set, predicted: set) -> float:
    if not gold and not predicted:
        return 100.0
    return _pct(2 * len(gold & predicted) / (len(gold) + len(predicted)))


def score(found: list[ScoredRow], answers: dict[int, str], sets: dict[str, LabelSet]) -> tuple[dict, list[dict]]:
    """(metrics, records): the flat metrics of every subtask and overall, and one record per row for reading the
    errors (source, file:line, subtask, gold, prediction, parsed, score)."""
    by_subtask: dict[str, list[ScoredRow]] = {}
    for row in found:
        if row.subtask is not None:
            by_subtask.setdefault(row.subtask, []).append(row)
    metrics: dict = {}
    records = {row.index: _record(row) for row in found}
    parsed_total = 0
    subtask_scores = []
    for subtask, rows in sorted(by_subtask.items()):
        family = rows[0].family
        parsed = []
        if family == "ner":
            gold_tags, predicted_tags = [], []
            for row in rows:
                pairs, bad = parse_ner(answers[row.index])
                tags = align_ner(row.gold, pairs)
                gold_tags.append([tag for _, tag in row.gold])
                predicted_tags.append(tags)
                ok = not bad and [w for w, _ in pairs] == [w for w, _ in row.gold]
                parsed.append(ok)
                one = ner_scores([gold_tags[-1]], [tags])
                no_entities = "B" not in gold_tags[-1] and "B" not in tags and "I" not in tags
                records[row.index].update(
                    prediction=answers[row.index], parsed=ok, score=100.0 if no_entities else one["entity_f1"]
                )
            values = ner_scores(gold_tags, predicted_tags)
        elif family == "single_label":
            labels = sets[subtask]
            gold, predicted = [], []
            for row in rows:
                label = labels.parse_one(answers[row.index])
                gold.append(labels.match(row.gold) or row.gold)
                predicted.append(label)
                parsed.append(label is not None)
                records[row.index].update(
                    prediction=answers[row.index], parsed=label is not None, score=100.0 if label == gold[-1] else 0.0
                )
            values = single_label_scores(gold, predicted, labels.labels)
        else:
            labels = sets[subtask]
            gold, predicted = [], []
            for row in rows:
                found_labels, ok = labels.parse_many(answers[row.index])
                gold.append({labels.match(label) or label for label in row.gold})
                if not ok:  # what is not a label is not "None" either: it counts as a wrong label
                    found_labels = found_labels | {INVALID}
                predicted.append(found_labels)
                parsed.append(ok)
                records[row.index].update(
                    prediction=answers[row.index], parsed=ok, score=_row_f1(gold[-1], found_labels)
                )
            values = multi_label_scores(gold, predicted, labels.labels)
        values["parsed"] = _pct(sum(parsed) / len(rows))
        values["n"] = len(rows)
        parsed_total += sum(parsed)
        subtask_scores.append(values["score"])
        metrics.update({f"{subtask}/{name}": value for name, value in values.items()})
    scored = sum(len(rows) for rows in by_subtask.values())
    unscored = [row for row in found if row.subtask is None]
    overall = {
        "task_score": round(sum(subtask_scores) / len(subtask_scores), 2) if subtask_scores else None,
        "parsed": _pct(parsed_total / scored) if scored else None,
        "n": scored,
        "n_unscored": len(unscored),
    }
    notes = []
    if unscored:
        notes.append(
            f"{len(unscored)} held-out rows are of no family the metric scores (NER, a label, a label set): "
            f"listed with the generations as unscored (first: {unscored[0].where})"
        )
    metrics = {**overall, **metrics}
    if notes:
        metrics["notes"] = notes
    return metrics, [records[row.index] for row in found]


def _record(row: ScoredRow) -> dict:
    gold = row.gold
    if row.family == "ner":
        gold = "\n".join(f"{word} : {tag}" for word, tag in gold)
    elif row.family == "multi_label":
        gold = sorted(gold)
    return {
        "source": row.source,
        "where": row.where,
        "subtask": row.subtask,
        "gold": gold,
        "prediction": None,
        "parsed": None,
        "score": None,
    }


def subtasks_of(metrics: dict) -> list[str]:
    """The subtask names in a metrics dict (keys 'SUBTASK/METRIC'), in order."""
    return list(dict.fromkeys(key.rsplit("/", 1)[0] for key in metrics if "/" in key))


# ---------------------------------------------------------------- the metric


def _capped(found: list[ScoredRow], cap: int | None) -> list[ScoredRow]:
    """At most `cap` rows of each held-out source, the first ones."""
    if cap is None:
        return found
    taken: dict[str, int] = {}
    kept = []
    for row in found:
        if taken.get(row.source, 0) < cap:
            taken[row.source] = taken.get(row.source, 0) + 1
            kept.append(row)
    return kept


def evaluate_medtuned(model, tokenizer, template, found: list[ScoredRow], recipe) -> dict:
    """The metric on the recognised held-out rows (at most `metric_max_samples` of each source): the flat metrics,
    `notes`, and `rows`: one record per row (written out by evaluate.save_generations). The caller sets eval mode;
    greedy decoding makes it deterministic."""
    import qlora_pipeline.tasks.generation as generation

    found = _capped(found, recipe.task.metric_max_samples)
    sets = label_sets(found)
    wanted = [row for row in found if row.subtask is not None]
    prompts = generation.render_prompts(tokenizer, template, [(row.instruction, row.input) for row in wanted])
    budgets = [token_budget(row, sets.get(row.subtask), tokenizer) for row in wanted]
    texts = generation.generate(
        model,
        tokenizer,
        template,
        prompts,
        budgets,
        generation.batch_size(recipe),
        progress="medtuned metric",
    )
    metrics, records = score(found, {row.index: text for row, text in zip(wanted, texts)}, sets)
    metrics["rows"] = records
    return metrics


def check_found(found: list[ScoredRow], name: str) -> list[str]:
    """Before any model loads: a note on the held-out rows by subtask, or on none being of a family the metric
    scores (the run then has the eval loss and no task scores; the main recipes score MedTuned rows by default,
    and a recipe given other data should still train)."""
    subtasks: dict[str, int] = {}
    for row in found:
        if row.subtask is not None:
            subtasks[row.subtask] = subtasks.get(row.subtask, 0) + 1
    if not subtasks:
        return [
            f"generation_metric medtuned: none of the {len(found)} held-out rows of {name} is NER ('word : B|I|O' "
            "lines), a label the instruction or a known vocabulary allows, or a label set: no task scores (name "
            "each row's family in metric_family_column, or set generation_metric: none)"
        ]
    listed = ", ".join(f"{subtask} {count}" for subtask, count in subtasks.items())
    unscored = len(found) - sum(subtasks.values())
    return [
        f"generation_metric medtuned: held-out rows by subtask: {listed}"
        + (f", unscored {unscored}" if unscored else "")
    ]
