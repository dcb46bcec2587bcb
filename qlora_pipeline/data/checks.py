"""Data checks before training, on the rows as split: the quiet failures of data, found before any model loads.

- **Train/eval overlap**: a training row with the same instruction and input as a held-out row. The model then sees
  the eval question, with its answer, in training, and every eval figure is optimistic. An error by default
  (`on_eval_overlap`: warn keeps the rows, drop leaves them out of training).
- **Duplicates**: a training row identical to an earlier one (instruction, input and output). A repeated row
  weighs its task twice as much as the recipe says. Listed and kept by default (`on_duplicate_rows`: drop leaves
  the later copies out, error stops).

Both compare text with runs of whitespace made one space and the ends trimmed, so a stray newline or a double space
does not hide a copy. Each finding names the row and the row it repeats by file and line. Rows left out are listed
with the skipped rows. The checks hash one key per row and take a second or two on 200,000 rows
(benchmarks/data_checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_pipeline.data.rows import ROW_COLUMN, Where, column_values, columns_of
from qlora_pipeline.errors import DataError

# Findings listed in a printed list and in an error; all of them go to the run folder's data_checks.json.
SHOWN = 10
ERROR_SHOWN = 3
CHECKS_FILE = "data_checks.json"


def normalise(text) -> str:
    """Text compared for the checks: whitespace runs made one space, the ends trimmed; None is empty."""
    return " ".join(str(text).split()) if text is not None else ""


@dataclass(frozen=True)
class Finding:
    """A training row that repeats another: `row` (file:line), the one it repeats (`first`), its index in the
    training set."""

    row: str
    first: str
    index: int

    def __str__(self) -> str:
        return f"{self.row} = {self.first}"


@dataclass
class DataChecks:
    """What the checks found in one training set, and which of its rows they leave out (`dropped`, indices)."""

    duplicates: list[Finding] = field(default_factory=list)
    overlaps: list[Finding] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # training-set index → why it was left out
    notes: list[str] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0

    def summary(self) -> dict:
        """The counts, for summary.json."""
        return {
            "train_rows_checked": self.train_rows,
            "eval_rows_checked": self.eval_rows,
            "duplicates": len(self.duplicates),
            "overlaps": len(self.overlaps),
            "dropped": len(self.dropped),
        }

    def to_dict(self) -> dict:
        """Every finding, for the run folder's data_checks.json."""
        return {
            **self.summary(),
            "duplicate_rows": [{"row": f.row, "duplicate_of": f.first} for f in self.duplicates],
            "eval_overlap": [{"row": f.row, "held_out": f.first} for f in self.overlaps],
        }


def check_train_and_eval(train, eval_set, data_args) -> DataChecks:
    """Run both checks on the training rows (a datasets.Dataset carrying ROW_COLUMN) against the held-out rows
    (None: no overlap check). Raises DataError where a policy says error; otherwise the findings, and the rows
    that a `drop` policy leaves out."""
    instruction, input_column, output = columns_of(data_args)
    checks = DataChecks(train_rows=len(train), eval_rows=len(eval_set) if eval_set is not None else 0)
    train_prompts = _prompt_keys(train, instruction, input_column)
    where = column_values(train, ROW_COLUMN)

    if eval_set is not None:
        held_out: dict[str, str] = {}
        pairs = zip(_prompt_keys(eval_set, instruction, input_column), column_values(eval_set, ROW_COLUMN))
        for key, row in sorted(pairs, key=_by_place):  # the first in file order names them
            held_out.setdefault(key, row)
        overlaps = [Finding(where[i], held_out[key], i) for i, key in enumerate(train_prompts) if key in held_out]
        checks.overlaps = sorted(overlaps, key=lambda f: _place(f.row))
    answers = [normalise(text) for text in column_values(train, output)]
    copies: dict[tuple[str, str], list[int]] = {}
    for index, key in enumerate(zip(train_prompts, answers)):
        copies.setdefault(key, []).append(index)
    for indices in copies.values():
        if len(indices) > 1:  # the first in file order is the original, the others its copies
            first, *later = sorted(indices, key=lambda i: _place(where[i]))
            checks.duplicates += [Finding(where[i], where[first], i) for i in later]
    checks.duplicates.sort(key=lambda f: _place(f.row))

    _apply(
        checks,
        checks.overlaps,
        data_args.on_eval_overlap,
        "on_eval_overlap",
        ("training row has", "training rows have"),
        "the same instruction and input as a held-out row (training row = held-out row), so the eval figures "
        "would be measured on questions the model was trained on",
        "same instruction and input as held-out row {first} (on_eval_overlap: drop)",
    )
    _apply(
        checks,
        checks.duplicates,
        data_args.on_duplicate_rows,
        "on_duplicate_rows",
        ("training row repeats", "training rows repeat"),
        "an earlier one exactly (instruction, input and output, whitespace normalised; copy = first)",
        "duplicate of {first} (on_duplicate_rows: drop)",
    )
    return checks


def leave_out(train, dropped: dict[int, str], owner):
    """The training rows (a datasets.Dataset carrying ROW_COLUMN) less those a `drop` policy left out (index →
    why), each listed with the skipped rows of `owner`, the RowSource they were read from."""
    if not dropped:
        return train
    rows = column_values(train, ROW_COLUMN)
    owner.skipped += [Where.parse(rows[i]).record(reason) for i, reason in sorted(dropped.items())]
    return train.select([i for i in range(len(train)) if i not in dropped])


def _place(row: str) -> tuple:
    """A row's place for ordering: file, then line (or row number)."""
    where = Where.parse(row)
    return where.file, where.line if where.line is not None else where.row


def _by_place(pair: tuple[str, str]) -> tuple:
    return _place(pair[1])


def _prompt_keys(dataset, instruction: str, input_column: str | None) -> list[str]:
    """Each row's instruction and input, normalised, as one string (a separator no text holds between them)."""
    instructions = column_values(dataset, instruction)
    if input_column and input_column in dataset.column_names:
        inputs = column_values(dataset, input_column)
    else:  # no input is an empty input, on either side
        inputs = [None] * len(instructions)
    return [normalise(text) + "\x1f" + normalise(extra) for text, extra in zip(instructions, inputs)]


def _apply(checks: DataChecks, found: list[Finding], policy: str, key: str, subject, what: str, reason: str) -> None:
    """The policy for one kind of finding: an error, a note (warn), or the rows marked to leave out (drop)."""
    if not found:
        return
    count = f"{len(found)} {subject[len(found) != 1]} {what}"
    if policy == "error":  # one line: the first findings, and where to see them all
        shown = ", ".join(map(str, found[:ERROR_SHOWN])) + (", …" if len(found) > ERROR_SHOWN else "")
        remedy = "drop (leave them out of training) or warn (keep them)" if key == "on_eval_overlap" else "drop or warn"
        raise DataError(f"{count}: {shown}; set {key}: {remedy}; with warn, preprocess lists them all")
    if policy == "drop":
        for finding in found:
            checks.dropped.setdefault(finding.index, reason.format(first=finding.first))
        checks.notes.append(f"{count}; left out of training, listed with the skipped rows (first: {found[0]})")
    else:
        checks.notes.append(f"{count}; kept ({key}: {policy}), listed in data_checks.json (first: {found[0]})")


def listing(found: list[Finding]) -> str:
    """The first findings, one per line, and how many more."""
    lines = [f"  {finding}" for finding in found[:SHOWN]]
    if len(found) > SHOWN:
        lines.append(f"  … and {len(found) - SHOWN} more")
    return "\n".join(lines)
