"""SQuAD answer metrics: exact match and token F1, as the official SQuAD v2.0 evaluation script defines them.

An answer is normalised before comparison (lower case, punctuation removed, the articles a/an/the removed, runs of
whitespace collapsed). A prediction is scored against every gold answer and the best score counts. An unanswerable
question has no gold answer (an empty list, or [""] as the official script writes it): the only right prediction is
the empty string, which then scores 1 on both metrics; any non-empty prediction scores 0.

Per-example scores are 0/1 (exact match) and 0..1 (F1); `squad_scores` averages them and reports percentages 0..100
like the official script, with the HasAns_/NoAns_ breakdown when both kinds of question are present.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds_or_unanswerable(golds: list[str]) -> list[str]:
    """The gold answers to compare with; [""] for an unanswerable question (the official script's convention)."""
    real = [gold for gold in golds if normalize_answer(gold)]
    return real or [""]


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        # Unanswerable on either side: 1 only when both are empty (the official script).
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 when the normalised prediction equals one normalised gold answer, else 0.0."""
    return max(_exact(prediction, gold) for gold in _golds_or_unanswerable(golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    """The best bag-of-tokens F1 (0..1) of the normalised prediction against any gold answer."""
    return max(_f1(prediction, gold) for gold in _golds_or_unanswerable(golds))


def is_unanswerable(golds: list[str]) -> bool:
    return _golds_or_unanswerable(golds) == [""]


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Corpus scores in percent (0..100, like the official script): exact_match, f1, n, and HasAns_exact,
    HasAns_f1, HasAns_n, NoAns_exact, NoAns_f1, NoAns_n when unanswerable questions are present."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    exact = [exact_match(p, g) for p, g in zip(predictions, golds, strict=True)]
    f1 = [token_f1(p, g) for p, g in zip(predictions, golds, strict=True)]
    scores: dict[str, float] = {"exact_match": _percent(exact), "f1": _percent(f1), "n": len(predictions)}
    unanswerable = [is_unanswerable(g) for g in golds]
    if any(unanswerable):
        for prefix, wanted in (("HasAns", False), ("NoAns", True)):
            chosen = [i for i, flag in enumerate(unanswerable) if flag == wanted]
            if not chosen:
                continue
            scores[f"{prefix}_exact"] = _percent([exact[i] for i in chosen])
            scores[f"{prefix}_f1"] = _percent([f1[i] for i in chosen])
            scores[f"{prefix}_n"] = len(chosen)
    return scores


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0
