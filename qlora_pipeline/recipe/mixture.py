"""The recipe's data mixture: `dataset_mixture`, a list of sources, each saying where its rows are, how its columns
map, and how much of the training mixture it makes. One small schema (`MixtureSource`) and the checks that refuse a
bad entry before anything loads; data/mixture.py builds the mixture from it.

    dataset_mixture:
      - path: nlpie/Llama2-MedTuned-Instructions   # Hub id, local file or folder, or embedded:NAME
        weight: 0.8                                  # share of the training examples (relative)
      - path: data/clinic_notes.jsonl
        name: clinic                                 # its name in reports (default: file stem / id's last part)
        instruction_column: question                 # column mapping (default: the recipe's columns)
        input_column: null
        output_column: answer
        weight: 0.2

`weight` is given for every source or for none. With weights, the training examples are drawn from the sources with
those probabilities (`datasets.interleave_datasets`, `mixture_stopping` says when it ends); without, the sources are
concatenated and shuffled. `rows` (a count) or `fraction` (a share of the source's training rows) first chooses which
rows of a source are in play, drawn by the seed, with `replace: true` allowing a row more than once (up-weighting a
small source). `streaming: true` reads only the first `rows` rows of a source instead of downloading all of it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path

# The keys a source may hold, each with what it means (`qlora-pipeline keys` and the errors show them).
SOURCE_KEYS = {
    "path": "Hub dataset id, local .jsonl/.json/.csv/.parquet file or folder, or embedded:NAME (required)",
    "name": "its name in reports and per-source scores (default: the file's stem or the id's last part)",
    "config": "Hub dataset configuration",
    "split": "split to read (default: the recipe's dataset_split)",
    "instruction_column": "column holding the instruction (default: the recipe's)",
    "input_column": "column holding the input/context, null where the source has none (default: the recipe's)",
    "output_column": "column holding the answer (default: the recipe's)",
    "template": "prompt template for this source's rows (default: the recipe's); it must end answers alike",
    "weight": "share of the training examples drawn from this source (relative; every source or none)",
    "rows": "how many of the source's training rows are in play, drawn by the seed",
    "fraction": "share of the source's training rows in play, drawn by the seed (above 1 needs replace: true)",
    "replace": "draw rows with replacement, so a row may be used more than once (default: false)",
    "streaming": "read only the first `rows` rows of the source instead of downloading all of it (default: false)",
}
TEMPLATES = ("starling", "alpaca", "tokenizer")


@dataclass(frozen=True)
class MixtureSource:
    """One source of the mixture, its defaults filled in from the recipe."""

    path: str
    name: str
    config: str | None = None
    split: str = "train"
    instruction_column: str = "instruction"
    input_column: str | None = "input"
    output_column: str = "output"
    template: str = "starling"
    weight: float | None = None
    rows: int | None = None
    fraction: float | None = None
    replace: bool = False
    streaming: bool = False


def short_name(path: str) -> str:
    """A source's (or a held-out file's) short name: a file's stem ('re_gad-train'), a sample's name, a Hub id's last
    part."""
    path = path.split(":", 1)[1] if path.startswith("embedded:") else path
    return Path(path).stem if Path(path).suffix else path.rstrip("/").rsplit("/", 1)[-1]


def parse_mixture(entries, defaults: dict, fail) -> list[MixtureSource]:
    """The recipe's `dataset_mixture` entries as sources; `defaults`: the recipe's flat values (columns, split,
    template). `fail(key, message)` raises the RecipeError naming the key and its file; nothing is loaded here."""

    def bad(index: int, entry, message: str):
        named = entry.get("name") or entry.get("path") if isinstance(entry, dict) else None
        label = f"source {index + 1}" + (f" ({named})" if named else "")
        fail("dataset_mixture", f"{label}: {message}")

    if not isinstance(entries, list) or not entries:
        fail("dataset_mixture", "must be a list of sources, each a mapping with at least `path`")
    sources = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            bad(index, entry, f"must be a mapping with at least `path`, got {entry!r}")
        for key in entry:
            if key not in SOURCE_KEYS:
                close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                bad(index, entry, f"unknown key '{key}'{hint}; a source takes {', '.join(SOURCE_KEYS)}")
        sources.append(_source(entry, defaults, lambda message, i=index, e=entry: bad(i, e, message)))
    weighted = [source.weight is not None for source in sources]
    if any(weighted) and not all(weighted):
        missing = [source.name for source, has in zip(sources, weighted) if not has]
        fail("dataset_mixture", f"give every source a weight or none; {', '.join(missing)} has none")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        fail("dataset_mixture", f"two sources are named {repeated[0]!r}; give each its own `name`")
    return sources


def _source(entry: dict, defaults: dict, bad) -> MixtureSource:
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        bad("needs `path`: a Hub dataset id, a local file or folder, or embedded:NAME")
    for key in ("name", "config", "split", "instruction_column", "output_column"):
        if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
            bad(f"'{key}' must be a non-empty string, got {entry[key]!r}")
    if "input_column" in entry and entry["input_column"] is not None and not isinstance(entry["input_column"], str):
        bad(f"'input_column' must be a string or null, got {entry['input_column']!r}")
    if entry.get("input_column") and not defaults.get("input_column"):
        bad(
            f"names input_column {entry['input_column']!r} while the recipe's input_column is null; the mixed rows "
            "take the recipe's column names, so set the recipe's input_column (e.g. input)"
        )
    if "template" in entry and entry["template"] not in TEMPLATES:
        bad(f"'template' must be one of {', '.join(TEMPLATES)}; got {entry['template']!r}")
    for key in ("replace", "streaming"):
        if key in entry and not isinstance(entry[key], bool):
            bad(f"'{key}' must be true or false, got {entry[key]!r}")
    weight, rows, fraction = entry.get("weight"), entry.get("rows"), entry.get("fraction")
    if weight is not None and (not _is_number(weight) or weight <= 0):
        bad(f"'weight' must be a number above 0, got {weight!r} (leave a source out rather than weigh it 0)")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        bad(f"'rows' must be a whole number of at least 1, got {rows!r}")
    if fraction is not None and (not _is_number(fraction) or fraction <= 0):
        bad(f"'fraction' must be a number above 0, got {fraction!r}")
    if rows is not None and fraction is not None:
        bad("give 'rows' or 'fraction', not both")
    if fraction is not None and fraction > 1 and not entry.get("replace"):
        bad(f"'fraction' {fraction} is more rows than the source has; set replace: true to use rows more than once")
    if entry.get("replace") and rows is None and fraction is None:
        bad("'replace' needs 'rows' or 'fraction': how many rows to draw with replacement")
    if entry.get("streaming") and rows is None:
        bad("'streaming' needs 'rows': how many rows to read from the stream")
    if entry.get("streaming") and (fraction is not None or entry.get("replace")):
        bad("a streamed source takes 'rows' only: its size is not known before it is read")
    values = {f.name: entry[f.name] for f in fields(MixtureSource) if f.name in entry}
    for key in ("split", "instruction_column", "input_column", "output_column", "template"):
        recipe_key = "dataset_split" if key == "split" else key
        values.setdefault(key, defaults.get(recipe_key))
    values["name"] = values.get("name") or short_name(path)
    if values.get("weight") is not None:
        values["weight"] = float(values["weight"])
    return MixtureSource(**values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
