"""The symptoms → disease generation metric of the causal-LM task (`generation_metric: symptoms`).

The data is in the `prognosis/symptoms_disease_v1` schema (instruction, output), in two directions:

- forward: "What are the symptoms of X?" → "The following are the symptoms of X: a, b, c". The model's answer is
  generated greedily from the training prompt; the gold and predicted symptom lists are parsed by the same parser
  and compared as sets: precision, recall and F1 per row, averaged over rows (macro; the headline `symptom_f1`) and
  over all symptoms at once (micro).
- reverse: "Which disease has these symptoms: a, b, c?" → "X" (or "The disease is X"). Top-1 accuracy: the parsed
  answer equals the gold disease after normalisation.

Scores are percentages (0..100), as the QA metrics. A direction with no held-out rows scores None (its n is 0): a
dataset of forward rows only, like the shared one, reports no disease accuracy rather than one made up from
questions the model was never trained on.

What the parsers recognise (docs/recipe-distilgpt2-symptoms.md shows examples):
- the list: the text after the first colon, or after "include"/"includes" where there is no colon ("The symptoms of
  X include a, b"), else the whole text; items split at commas, semicolons and line breaks; a leading "and"/"or"
  (", and c"), list bullets ("-", "*", "1.") and a trailing period are dropped; case and inner whitespace do not
  matter; a repeated item counts once. "b and c" inside one item is split only in a prediction, and only where the
  whole item is not itself a gold symptom: real symptom names hold "and" ("nausea and vomiting").
- the disease: the first line, with "The disease is", "The answer is", "It is", "Most likely" and similar lead-ins,
  a leading article and a trailing period dropped.
- generation stops at the template's end token; a prediction is cut where the model starts a new prompt section
  ("###", the alpaca headers) or a blank line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qlora_pipeline.errors import DataError

# The headline metric first, as Task.metric_names.
METRIC_NAMES = ("symptom_f1", "disease_top1")

# The two question forms as the sample data writes them (the parsers accept more, see the module doc).
FORWARD_QUESTION = "What are the symptoms of {disease}?"
FORWARD_ANSWER = "The following are the symptoms of {disease}: {symptoms}"
REVERSE_QUESTION = "Which disease has these symptoms: {symptoms}?"
REVERSE_ANSWER = "{disease}"

_REVERSE = re.compile(r"\b(which|what)\s+(disease|illness|condition|diagnosis)\b")
_FORWARD = re.compile(r"\bsymptoms?\s+(of|does|do)\b")
_LIST_INTRO = re.compile(r"\bincludes?\b")
_ITEM_SPLIT = re.compile(r"[,;\n]")
_BULLET = re.compile(r"^(?:[-*•]+|\d+[.)])\s*")
_LEADING_CONJUNCTION = re.compile(r"^(?:and|or)\s+")
# Lead-ins of a disease answer, tried in order, repeatedly ("It is most likely the flu").
_DISEASE_LEAD_INS = re.compile(
    r"^(?:the\s+)?(?:disease|diagnosis|answer|condition|illness)(?:\s+is|\s*:)\s*"
    r"|^(?:it|this)\s+(?:is|could be|may be)\s+"
    r"|^(?:most\s+likely|probably|likely)[\s,:]+"
    r"|^(?:a|an|the)\s+"
)
_SECTION_BREAK = re.compile(r"###|\n\s*\n")


def normalise(text: str) -> str:
    """Lowercase, inner whitespace collapsed, surrounding quotes and trailing punctuation dropped."""
    text = " ".join(text.lower().split())
    return text.strip(" \"'`").rstrip(" .!?:").strip(" \"'`")


def first_section(text: str) -> str:
    """The answer up to where the model starts another prompt section or leaves a blank line."""
    return _SECTION_BREAK.split(text.strip(), maxsplit=1)[0].strip()


def question_kind(instruction: str) -> str | None:
    """'forward' (symptoms of a disease), 'reverse' (the disease with some symptoms), or None (neither)."""
    text = normalise(instruction)
    if _REVERSE.search(text):
        return "reverse"
    if _FORWARD.search(text):
        return "forward"
    return None


def _list_part(text: str) -> str:
    if ":" in text:
        return text.split(":", 1)[1]
    intro = _LIST_INTRO.search(text)
    return text[intro.end() :] if intro else text


def parse_symptoms(text: str, known: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The symptoms a forward answer lists, normalised, each once, in order. `known`: gold symptom names; an item
    "x and y" that is not one of them is read as two items (a prediction's "a, b and c")."""
    items: list[str] = []
    for raw in _ITEM_SPLIT.split(_list_part(first_section(text))):
        item = normalise(_LEADING_CONJUNCTION.sub("", _BULLET.sub("", normalise(raw))))
        parts = [item]
        if known and " and " in item and item not in known:
            parts = [normalise(part) for part in item.split(" and ")]
        items += [part for part in parts if part and part not in items]
    return items


def parse_disease(text: str) -> str:
    """The disease a reverse answer names, normalised."""
    answer = normalise(first_section(text).split("\n", 1)[0])
    while True:
        shorter = _DISEASE_LEAD_INS.sub("", answer, count=1)
        if shorter == answer:
            return normalise(answer)
        answer = shorter


def set_scores(gold: set[str], predicted: set[str]) -> tuple[float, float, float]:
    """Precision, recall and F1 (0..1) of one predicted symptom set; an empty prediction scores 0."""
    hits = len(gold & predicted)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


def symptom_scores(gold_sets: list[list[str]], predicted_sets: list[list[str]]) -> dict:
    """Set precision/recall/F1 over forward rows, percentages: macro (per row, then averaged; scikit-learn's
    `average="samples"`) and micro (every symptom of every row pooled)."""
    if not gold_sets:
        names = ("symptom_f1", "symptom_precision", "symptom_recall")
        return {**dict.fromkeys(names), **dict.fromkeys(f"{name}_micro" for name in names), "n_forward": 0}
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer().fit(gold_sets + predicted_sets)
    gold, predicted = binarizer.transform(gold_sets), binarizer.transform(predicted_sets)
    scores = {"n_forward": len(gold_sets)}
    for average, suffix in (("samples", ""), ("micro", "_micro")):
        precision, recall, f1, _ = precision_recall_fscore_support(gold, predicted, average=average, zero_division=0)
        scores[f"symptom_f1{suffix}"] = round(100 * float(f1), 2)
        scores[f"symptom_precision{suffix}"] = round(100 * float(precision), 2)
        scores[f"symptom_recall{suffix}"] = round(100 * float(recall), 2)
    return scores


def disease_scores(gold: list[str], predicted: list[str]) -> dict:
    """Top-1 accuracy over reverse rows, a percentage; None without reverse rows."""
    if not gold:
        return {"disease_top1": None, "n_reverse": 0}
    from sklearn.metrics import accuracy_score

    return {"disease_top1": round(100 * float(accuracy_score(gold, predicted)), 2), "n_reverse": len(gold)}


@dataclass
class ScoredRows:
    """The held-out rows the metric can score, by direction: (row index, question, input, gold) each."""

    forward: list[tuple[int, str, str | None, list[str]]]
    reverse: list[tuple[int, str, str | None, str]]
    unrecognised: int


def scored_rows(rows, instruction_column: str, output_column: str, input_column: str | None = None) -> ScoredRows:
    """Sort the rows into forward and reverse questions with their parsed gold answers. A row of neither form, or
    whose gold answer parses to nothing, is counted in `unrecognised`."""
    forward, reverse, unrecognised = [], [], 0
    for index, row in enumerate(rows):
        question, answer = row[instruction_column], row[output_column]
        extra = row.get(input_column) if input_column else None
        kind = question_kind(question)
        if kind == "forward" and (gold := parse_symptoms(answer)):
            forward.append((index, question, extra, gold))
        elif kind == "reverse" and (disease := parse_disease(answer)):
            reverse.append((index, question, extra, disease))
        else:
            unrecognised += 1
    return ScoredRows(forward, reverse, unrecognised)


def check_rows(rows, instruction_column: str, output_column: str, name: str = "eval rows") -> list[str]:
    """Before any model loads: the held-out rows hold at least one question the metric scores. Returns a note when
    some rows are of neither form (they still count in the eval loss)."""
    found = scored_rows(rows, instruction_column, output_column)
    if not found.forward and not found.reverse:
        raise DataError(
            f"{name}: none of the {len(rows)} held-out rows is a symptoms question the metric can score (forward: "
            f"{FORWARD_QUESTION!r} → {FORWARD_ANSWER!r}; reverse: {REVERSE_QUESTION!r} → {REVERSE_ANSWER!r}); "
            "set generation_metric: none, or check instruction_column / output_column"
        )
    if found.unrecognised:
        return [
            f"generation_metric symptoms: {found.unrecognised} of {len(rows)} held-out rows are neither a forward nor "
            "a reverse symptoms question (or their answer lists nothing); the metric leaves them out"
        ]
    return []


def generate_answers(
    model, tokenizer, template, questions: list[tuple[str, str | None]], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers to (instruction, input) pairs, prompted exactly as in training, batched (generation.py)."""
    import qlora_pipeline.tasks.generation as generation

    prompts = generation.render_prompts(tokenizer, template, questions)
    return generation.generate(model, tokenizer, template, prompts, max_new_tokens, batch_size, progress="symptoms")


def score_answers(found: ScoredRows, answers: dict[int, str]) -> dict:
    """The metric from generated answers (row index → text): forward set scores, reverse accuracy, counts."""
    known = frozenset(symptom for *_, gold in found.forward for symptom in gold)
    gold_sets = [gold for *_, gold in found.forward]
    predicted_sets = [parse_symptoms(answers[index], known) for index, *_ in found.forward]
    gold_diseases = [gold for *_, gold in found.reverse]
    predicted_diseases = [parse_disease(answers[index]) for index, *_ in found.reverse]
    scores = symptom_scores(gold_sets, predicted_sets)
    scores.update(disease_scores(gold_diseases, predicted_diseases))
    scores["n"] = scores["n_forward"] + scores["n_reverse"]
    notes = []  # shown under the evaluation table
    if found.unrecognised:
        notes.append(
            f"{found.unrecognised} held-out rows are neither a forward nor a reverse symptoms question (or their "
            "answer lists nothing): left out of the metric"
        )
    if not found.reverse:
        notes.append("no reverse question (symptoms → disease) among the held-out rows: disease_top1 not measured")
    if notes:
        scores["notes"] = notes
    return scores


def evaluate_symptoms(model, tokenizer, template, eval_rows, recipe) -> dict:
    """The metric on at most `recipe.task.metric_max_samples` held-out rows (the first ones, in split order):
    {symptom_f1, symptom_precision, symptom_recall (macro) and their _micro, n_forward, disease_top1, n_reverse, n},
    percentages, plus `notes` (a list of lines) where rows were left out or a direction is missing. The caller sets
    eval mode; generation is greedy, so the result is deterministic."""
    import qlora_pipeline.tasks.generation as generation

    data, task = recipe.data, recipe.task
    if task.metric_max_samples is not None:
        eval_rows = eval_rows.select(range(min(task.metric_max_samples, len(eval_rows))))
    found = scored_rows(eval_rows, data.instruction_column, data.output_column, data.input_column)
    wanted = [(index, question, extra) for index, question, extra, _ in (*found.forward, *found.reverse)]
    texts = generate_answers(
        model,
        tokenizer,
        template,
        [(question, extra) for _, question, extra in wanted],
        task.eval_max_new_tokens,
        generation.batch_size(recipe),
    )
    return score_answers(found, {index: text for (index, *_), text in zip(wanted, texts)})
