"""Data: load the rows, check them, split them, and turn them into token ids with a completion mask.

Rows come from a Hub id, a local .jsonl/.json/.csv/.parquet file (or a folder of them) or an embedded sample, all
through `datasets`. Every row is checked before any model loads. What makes a whole file unreadable (not UTF-8,
empty, a header and no rows, a missing column, a .json file that does not parse) stops the run with the file named.
What is wrong with one row (a malformed JSON line, a CSV row with the wrong number of fields, a missing, null,
empty or non-text instruction/output, a duplicate id) stops it too, the file and line named, unless the recipe says
`on_bad_rows: skip`: such rows are then left out, counted and listed (`skipped_rows.jsonl` in the run folder).

Nothing is dropped silently: rows read = rows trained on + rows held out for eval + rows skipped + examples over
`max_length` that were dropped (+ rows past max_train_samples/max_eval_samples). Blank lines are not rows; they are
ignored and reported in a note, as are columns the template does not use. In a CSV file every value is text:
`42` is the string "42" and an empty field is the empty string.

Tokenization is ours rather than SFTTrainer's so that `preprocess --debug` shows exactly what training sees, and
so the overlong policy can be applied and counted before packing. The result carries `input_ids` and
`completion_mask`; SFTTrainer turns the mask into -100 labels and packs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qlora_pipeline.data import samples
from qlora_pipeline.errors import DataError, first_line

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Column that carries each row's location through the split when overlong: error must name the row.
ROW_COLUMN = "__row__"
# Column of the held-out rows when they come from several eval files: the short name of each row's file.
SOURCE_COLUMN = "__source__"
SKIPPED_FILE = "skipped_rows.jsonl"
REPAIRED_FILE = "repaired_rows.jsonl"
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Where:
    """Where a row is: a line of a JSONL/CSV file, or its row number where lines are unknown (JSON array, parquet,
    Hub)."""

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}: row {self.row}"

    def record(self, reason: str) -> dict:
        """One line of skipped_rows.jsonl."""
        where = {"line": self.line} if self.line is not None else {"line": None, "row": self.row}
        return {"file": self.file, **where, "reason": reason}

    @classmethod
    def parse(cls, text: str) -> Where:
        """The Where that str() wrote (the ROW_COLUMN value back)."""
        file, _, place = text.rpartition(":")
        if place.strip().startswith("row "):
            return cls(file, row=int(place.strip()[4:]))
        return cls(file, line=int(place))

    def relative_to(self, other: Where) -> str:
        """This row named briefly in a message about another: 'line 3' (or 'row 3') in the same file, else in full."""
        if self.file != other.file:
            return str(self)
        return f"line {self.line}" if self.line is not None else f"row {self.row}"


@dataclass
class RowSource:
    """A loaded dataset, where each of its rows came from, and what was left out of it and why."""

    dataset: object  # datasets.Dataset
    name: str
    rows: list[Where] | None = None  # one per dataset row
    rows_read: int = 0  # rows in the file(s), blank lines aside, before any was skipped
    skipped: list[dict] = field(default_factory=list)  # Where.record(reason) of each row left out
    notes: list[str] = field(default_factory=list)
    # Where.record(what was fixed) of each slip fixed in place (kept, not skipped), with "fix": the kind of fix.
    repaired: list[dict] = field(default_factory=list)

    def row(self, index: int) -> str:
        if self.rows is not None:
            return str(self.rows[index])
        return f"{self.name}: row {index + 1}"


def column_values(dataset, name: str) -> list:
    """A column as a Python list, read in one go: iterating `dataset[name]` reads it row by row (in datasets 5,
    seconds per 100,000 rows)."""
    return dataset[name][:]


def columns_of(data_args) -> tuple[str, str | None, str]:
    return data_args.instruction_column, data_args.input_column, data_args.output_column


@dataclass(frozen=True)
class Columns:
    """The columns a task reads from each row, as (recipe key, column) pairs. Every one must be in the file; a
    required one must hold non-empty text (a `labels` one: text or a whole number), an optional one text or null."""

    required: tuple[tuple[str, str], ...]
    optional: tuple[tuple[str, str], ...] = ()
    labels: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [column for _, column in (*self.required, *self.optional)]


def instruction_columns(data_args) -> Columns:
    """The causal-LM task's columns: instruction and output, and the input/context where the recipe names one."""
    instruction, input_column, output = columns_of(data_args)
    return Columns(
        required=(("instruction_column", instruction), ("output_column", output)),
        optional=(("input_column", input_column),) if input_column else (),
    )


@contextlib.contextmanager
def quiet_progress(quiet: bool = True):
    """`datasets` progress bars off: reading a file is quick, and its bar would only stand between a bad row and
    its one-line error."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was_enabled:
            datasets.enable_progress_bars()


def load_rows(name: str, data_args, split: str | None = None, columns: Columns | None = None) -> RowSource:
    """Load and check a dataset from a Hub id, a local file or folder, or an embedded sample. `columns`: what each
    row must hold (default: the causal-LM task's instruction/input/output)."""
    with quiet_progress():
        return _load_and_check(name, data_args, split, columns or instruction_columns(data_args))


def load_train_and_eval(data_args, columns: Columns | None = None) -> tuple[RowSource, RowSource | None]:
    """The recipe's training rows and, where it names one, its eval file (each checked for `columns`)."""
    train = load_rows(data_args.dataset_name, data_args, columns=columns)
    if not data_args.eval_file:
        return train, None
    return train, load_rows(data_args.eval_files[0], data_args, columns=columns)


def _load_and_check(name: str, data_args, split: str | None, columns: Columns) -> RowSource:
    import datasets

    if samples.is_embedded(name):
        name = samples.resolve_sample(name)
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FORMATS
    if looks_local:
        return _load_local(path, data_args, columns)
    try:
        dataset = datasets.load_dataset(name, data_args.dataset_config, split=split or data_args.dataset_split)
    except Exception as exc:  # datasets raises many types: offline, not found, bad config, bad split
        raise DataError(f"{name}: could not load the dataset from the Hub: {first_line(exc)}") from None
    return check_dataset(dataset, name, data_args, columns)


class _BadRows:
    """Rows that cannot be trained on: an error naming the first (on_bad_rows: error), or left out and listed."""

    def __init__(self, policy: str):
        self.skip = policy == "skip"
        self.records: list[dict] = []

    def __call__(self, where: Where, reason: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {reason}")
        self.records.append(where.record(reason))

    def listed(self) -> list[dict]:
        """In file order (a malformed line is found before a bad value on an earlier line)."""
        return sorted(self.records, key=lambda r: (r["file"], r["line"] or 0, r.get("row") or 0))


def local_files(path: Path) -> tuple[list[Path], str]:
    """A local dataset's files (the file, or a folder's data files) and their `datasets` builder (json, csv,
    parquet); a missing path, an empty folder or mixed file types is a DataError naming the path."""
    if not path.exists():
        raise DataError(f"{path}: dataset file not found")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .jsonl, .json, .csv or .parquet files in this folder")
    kinds = {LOCAL_FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .csv or .parquet")
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes file types {sorted(kinds)}; keep one type per dataset")
    return files, kinds.pop()


def _load_local(path: Path, data_args, spec: Columns) -> RowSource:
    files, kind = local_files(path)
    if kind == "parquet":
        return check_dataset(_read_with_datasets(path, kind, files), str(path), data_args, spec)

    # JSON and CSV are parsed here first, so every problem is reported with its file and line.
    bad = _BadRows(data_args.on_bad_rows)
    parsed: list[tuple[Where, dict]] = []
    columns: dict[str, None] = {}  # in order of first appearance
    notes: list[str] = []
    headers = set()
    used = {c for c in (*spec.names, data_args.id_column) if c}  # rows keep only these fields
    for f in files:
        scan = _scan_json_file if kind == "json" else _scan_csv_file
        rows, blank_lines, header = scan(f, bad, used)
        parsed += rows
        columns.update(dict.fromkeys(header))
        headers.add(tuple(header))
        if blank_lines:
            shown = ", ".join(map(str, blank_lines[:5])) + (", …" if len(blank_lines) > 5 else "")
            notes.append(
                f"{f}: {len(blank_lines)} blank line{'s' if len(blank_lines) > 1 else ''} ignored (line {shown})"
            )
    rows_read = len(parsed) + len(bad.records)
    _check_columns(str(path), list(columns), spec)
    keep = _check_rows(parsed, data_args, spec, bad, data_args.id_column in columns)
    if not keep:
        raise DataError(
            f"{path}: no rows left to train on: all {rows_read} rows were skipped (first: {_first(bad.listed())})"
        )

    dataset = None
    if not bad.records:  # the file as it is, so `datasets` caches its reading and our tokenization
        options = {}
        if kind == "csv" and len(headers) == 1:
            import datasets

            # A CSV value is text: "42" stays "42" and an empty field stays "" (pandas would guess int and NaN).
            options = {
                "features": datasets.Features({c: datasets.Value("string") for c in columns}),
                "na_filter": False,
            }
        with contextlib.suppress(Exception):  # e.g. a column whose JSON type changes from row to row
            dataset = _read_with_datasets(path, kind, files, **options)
        if dataset is not None and len(dataset) != len(parsed):
            dataset = None
    if dataset is None:
        dataset = _clean_copy([parsed[i][1] for i in keep], spec)
    source = RowSource(dataset, str(path), [parsed[i][0] for i in keep], rows_read, bad.listed(), notes)
    _note_columns_and_skips(source, list(columns), data_args, spec)
    return source


def _read_with_datasets(path: Path, kind: str, files: list[Path], **options):
    import datasets

    try:
        dataset = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", **options)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        raise DataError(
            f"{path}: could not be read as {kind}: {message[-1] if message else type(exc).__name__}"
        ) from None
    if len(dataset) == 0:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    return dataset


def _clean_copy(rows: list[dict], spec: Columns):
    """The rows to train on, with only the task's columns, written as JSONL into the datasets cache and read
    from there: `datasets` then caches it like any file, and the tokenized result with it."""
    import datasets

    columns = spec.names
    text = "".join(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n" for row in rows)
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "qlora_pipeline_rows"
    target = folder / f"rows-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{target.name}.{os.getpid()}"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    return datasets.load_dataset("json", data_files=[str(target)], split="train")


# What a scan of one file returns: its rows (each with its location), its blank lines, its columns.
Scan = tuple[list[tuple[Where, dict]], list[int], list[str]]


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is allowed and removed)."""
    data = path.read_bytes()
    bom = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = bom + exc.start
        line = data.count(b"\n", 0, byte) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({exc.reason}: byte 0x{data[byte]:02x} at offset {byte}); "
            "save the file as UTF-8"
        ) from None


def _scan_json_file(path: Path, bad: _BadRows, used: set[str]) -> Scan:
    """Parse every row ourselves, so that a problem is reported with its line. Returns (rows with their `used`
    fields, blank lines, every key seen)."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no rows)")
    name, rows, blank, keys = str(path), [], [], {}

    def take(where: Where, value, expected: str) -> None:
        if isinstance(value, dict):
            rows.append((where, {k: v for k, v in value.items() if k in used}))
            keys.update(dict.fromkeys(value))
        else:
            bad(where, f"expected {expected}, got {kind_of(value)}")

    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not values:
            raise DataError(f"{path}: the file is empty (no rows)")
        for index, value in enumerate(values):
            take(Where(name, row=index + 1), value, "an object with fields")
        return rows, blank, list(keys)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            blank.append(lineno)
            continue
        where = Where(name, line=lineno)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad(where, f"malformed JSON line: {exc.msg} (column {exc.colno})")
            continue
        take(where, value, "a JSON object with fields")
    return rows, blank, list(keys)


def _scan_csv_file(path: Path, bad: _BadRows, used: set[str]) -> Scan:
    """Every row as text values. Returns (rows with their `used` fields, blank lines, header)."""
    text = _read_text(path)
    name, rows, blank = str(path), [], []
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # the default, 128 KiB, is less than some answers
    reader = csv.reader(io.StringIO(text, newline=""))
    header, ended = None, 0
    try:
        for fields in reader:
            start, ended = ended + 1, reader.line_num  # a quoted field may span lines: name the first
            if header is None:
                if fields:
                    header = fields
                continue
            if not fields:
                blank.append(start)
            elif len(fields) != len(header):
                count = f"{len(fields)} field{'s' if len(fields) != 1 else ''}"
                bad(Where(name, line=start), f"{count} where the header has {len(header)}")
            else:
                rows.append((Where(name, line=start), {k: v for k, v in zip(header, fields) if k in used}))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not readable as CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}: the file is empty (no header, no rows)")
    if not rows and not any(r["file"] == name for r in bad.records):
        raise DataError(f"{path}: the file has a header but no rows")
    return rows, blank, header


def kind_of(value) -> str:
    """A value's type in JSON's words."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return {list: "a list", dict: "an object", str: "text"}.get(type(value), type(value).__name__)


def _check_columns(name: str, present: list[str], spec: Columns) -> None:
    for key, column in (*spec.required, *spec.optional):
        if column not in present:
            raise DataError(
                f"{name}: missing column '{column}' (columns present: {', '.join(present) or 'none'}); "
                f"map yours with the recipe key {key}"
            )


def _row_problem(row: dict, spec: Columns) -> str | None:
    """What makes one row untrainable, or None."""
    for _, column in spec.required:
        if column not in row:
            return f"'{column}' is missing"
        value = row[column]
        if value is None:
            return f"'{column}' is null"
        if column in spec.labels and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, str):
            expected = "text or a whole number" if column in spec.labels else "text"
            return f"'{column}' must be {expected}, got {kind_of(value)}"
        if not value.strip():
            return f"'{column}' is empty"
    for _, column in spec.optional:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            return f"'{column}' must be text or null, got {kind_of(value)}"
    return None


def _check_rows(
    rows: Iterable[tuple[Where, dict]], data_args, spec: Columns, bad: _BadRows, has_ids: bool
) -> list[int]:
    """Indices of the rows to train on; every other row went to `bad`. Ids, where there is an id column, must be
    unique: the later of two rows with one id is the bad one."""
    id_column = data_args.id_column if has_ids else None
    keep: list[int] = []
    seen: dict[str, Where] = {}
    for index, (where, row) in enumerate(rows):
        problem = _row_problem(row, spec)
        if problem is None and id_column and row.get(id_column) is not None:
            value = row[id_column]
            first = seen.setdefault(json.dumps(value, sort_keys=True, default=str), where)
            if first is not where:
                problem = f"duplicate {id_column} {value!r} (first at {first.relative_to(where)})"
        if problem is None:
            keep.append(index)
        else:
            bad(where, problem)
    return keep


def check_dataset(dataset, name: str, data_args, spec: Columns) -> RowSource:
    """Check a dataset that `datasets` read (parquet, Hub): rows are named by number."""
    _check_columns(name, list(dataset.column_names), spec)
    has_ids = bool(data_args.id_column) and data_args.id_column in dataset.column_names
    columns = list(dict.fromkeys(c for c in (*spec.names, data_args.id_column if has_ids else None) if c))

    def rows() -> Iterator[tuple[Where, dict]]:
        index = 0
        for batch in dataset.select_columns(columns).iter(batch_size=1000):
            for offset in range(len(batch[columns[0]])):
                index += 1
                yield Where(name, row=index), {c: batch[c][offset] for c in columns}

    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset is empty (no rows)")
    bad = _BadRows(data_args.on_bad_rows)
    keep = _check_rows(rows(), data_args, spec, bad, has_ids)
    if not keep:
        raise DataError(
            f"{name}: no rows left to train on: all {len(dataset)} rows were skipped (first: {_first(bad.listed())})"
        )
    source = RowSource(
        dataset.select(keep) if len(keep) != len(dataset) else dataset,
        name,
        [Where(name, row=i + 1) for i in keep],
        len(dataset),
        bad.listed(),
    )
    _note_columns_and_skips(source, list(dataset.column_names), data_args, spec)
    return source


def _first(records: list[dict]) -> str:
    record = records[0]
    return f"{Where(record['file'], record['line'], record.get('row'))}: {record['reason']}"


def _note_columns_and_skips(source: RowSource, present: list[str], data_args, spec: Columns) -> None:
    used = {*spec.names, data_args.id_column}
    ignored = [c for c in present if c not in used]
    if ignored:
        source.notes.append(
            f"{source.name}: column{'s' if len(ignored) > 1 else ''} {', '.join(repr(c) for c in ignored)} "
            f"not used by the task; ignored"
        )
    if source.skipped:
        source.notes.append(
            f"{source.name}: {len(source.skipped)} of {source.rows_read} rows skipped (on_bad_rows: skip); "
            f"first: {_first(source.skipped)}"
        )


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """skipped_rows.jsonl: one {"file", "line", "reason"} object per row left out (with "row" where lines are
    unknown); repaired_rows.jsonl, the same for each slip fixed in a kept row (with its "fix")."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def accounting(train: RowSource, eval_source: RowSource | None, train_set, eval_set) -> dict:
    """Where every row read went, besides the splits' own counts: rows read = train rows + eval rows + skipped +
    unused (past max_train_samples / max_eval_samples); each split's rows = its examples + its dropped. `repaired`
    counts the slips fixed in rows that were kept, by kind (e.g. {"answer realigned": 3})."""
    sources = [s for s in (train, eval_source) if s is not None]
    read = sum(s.rows_read for s in sources)
    skipped = sum(len(s.skipped) for s in sources)
    used = len(train_set) + (len(eval_set) if eval_set is not None else 0)
    repaired = Counter(record["fix"] for s in sources for record in s.repaired)
    return {"rows_read": read, "skipped": skipped, "unused": read - skipped - used, "repaired": dict(repaired)}


def split_train_eval(
    train: RowSource, data_args, seed: int, eval_source: RowSource | None = None, locate: bool = False
):
    """Deterministic split by seed, or the given eval set. Returns (train Dataset, eval Dataset or None). `locate`:
    every row carries its file:line in ROW_COLUMN (always with overlong: error)."""
    dataset = _with_row_names(train, data_args, locate)
    if eval_source is not None:
        eval_dataset = _with_row_names(eval_source, data_args, locate)
    elif data_args.eval_split_size:
        size = data_args.eval_split_size
        test_size = int(size) if size >= 1 else size
        if (test_size if isinstance(test_size, int) else round(test_size * len(dataset))) >= len(dataset):
            raise DataError(f"{train.name}: eval_split_size {size} leaves no training rows out of {len(dataset)}")
        if len(dataset) < 2:
            raise DataError(
                f"{train.name}: {len(dataset)} row cannot be split into train and eval; set eval_split_size: 0"
            )
        parts = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
        dataset, eval_dataset = parts["train"], parts["test"]
    else:
        eval_dataset = None
    if data_args.max_train_samples:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    return dataset, _capped(eval_dataset, data_args)


def held_out_rows(eval_source: RowSource, data_args, locate: bool = False):
    """The recipe's eval file(s) as the held-out set (split_train_eval's, for a mixture's sources)."""
    return _capped(_with_row_names(eval_source, data_args, locate), data_args)


def _capped(eval_dataset, data_args):
    """The first max_eval_samples held-out rows. Several eval files were capped file by file when they were
    combined (combine_sources)."""
    several = eval_dataset is not None and SOURCE_COLUMN in eval_dataset.column_names
    if eval_dataset is not None and data_args.max_eval_samples and not several:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    return eval_dataset


def _with_row_names(source: RowSource, data_args, locate: bool = False):
    """With overlong: error (or `locate`), each row carries its location through the split, for the message that
    names it."""
    if (data_args.overlong != "error" and not locate) or ROW_COLUMN in source.dataset.column_names:
        return source.dataset
    return source.dataset.add_column(ROW_COLUMN, [source.row(i) for i in range(len(source.dataset))])


def combine_sources(sources: list[RowSource], names: list[str], cap: int | None) -> RowSource:
    """Several held-out files as one: the first `cap` rows of each (max_eval_samples), each row with its location
    (ROW_COLUMN) and its file's short name (SOURCE_COLUMN); counts and notes added up."""
    import datasets

    parts, rows = [], []
    for source, name in zip(sources, names):
        keep = min(cap, len(source.dataset)) if cap else len(source.dataset)
        part = source.dataset.select(range(keep))
        part = part.add_column(ROW_COLUMN, [source.row(i) for i in range(keep)])
        parts.append(part.add_column(SOURCE_COLUMN, [name] * keep))
        rows += source.rows[:keep] if source.rows is not None else [Where(source.name, row=i + 1) for i in range(keep)]
    columns = set.intersection(*(set(part.column_names) for part in parts))
    parts = [part.select_columns([c for c in part.column_names if c in columns]) for part in parts]
    return RowSource(
        datasets.concatenate_datasets(parts),
        ", ".join(source.name for source in sources),
        rows,
        sum(source.rows_read for source in sources),
        [record for source in sources for record in source.skipped],
        [note for source in sources for note in source.notes],
    )
