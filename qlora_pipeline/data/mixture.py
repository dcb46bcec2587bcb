"""Data: a mixture of sources (recipe/mixture.py) made into one training set and one held-out set.

Per source, in order:
1. its rows loaded and checked like any dataset (rows.load_rows; a streamed source: its first `rows` rows only),
   its columns renamed to the recipe's (instruction_column, input_column, output_column: the mixture's);
2. its held-out rows drawn by the seed (eval_split_size of each source, so every source is evaluated and scored
   under its own name), unless the recipe gives eval_file;
3. after the data checks (data/checks.py, over every source's training rows: `candidates`) have left out what a
   `drop` policy drops (`drop_rows`), the rows in play: all, or `rows` / `fraction` of them drawn by the seed, with
   replacement where `replace: true`.

Then the sources become one training set with `datasets`: `interleave_datasets` with the weights as probabilities
(`mixture_stopping`: stop when the first source runs out, or when all have), else `concatenate_datasets`, shuffled
by the seed. Every row carries its source's name (SOURCE_COLUMN) and its file:line (ROW_COLUMN).

Every row read is accounted for per source: read = train (distinct rows in the training set) + eval + skipped +
unused (not drawn, or past max_train_samples). `draws` counts a row as often as the training set holds it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.data import samples
from qlora_pipeline.data.rows import (
    LOCAL_FORMATS,
    ROW_COLUMN,
    SOURCE_COLUMN,
    Columns,
    RowSource,
    check_dataset,
    column_values,
    columns_of,
    instruction_columns,
    load_rows,
    local_files,
    quiet_progress,
)
from qlora_pipeline.errors import DataError, first_line


@dataclass
class SourceRows:
    """One source: what was read (`loaded`: its counts, skipped rows, notes), its training rows (before any is drawn)
    and its held-out rows, both with the recipe's column names, SOURCE_COLUMN and ROW_COLUMN."""

    source: object  # recipe.mixture.MixtureSource
    loaded: RowSource
    train: object  # datasets.Dataset
    eval: object | None


def load_sources(data_args, seed: int, extra_columns: tuple[tuple[str, str], ...] = (), hold_out: bool = True):
    """Every source loaded, checked, renamed to the mixture's columns and split (its held-out rows where `hold_out`).
    `extra_columns`: (recipe key, column) pairs every source carries as they are (a metric's family column)."""
    parts = []
    with quiet_progress():
        for source in data_args.sources:
            args = dataclasses.replace(
                data_args,
                dataset_name=source.path,
                dataset_mixture=None,
                dataset_config=source.config,
                dataset_split=source.split,
                instruction_column=source.instruction_column,
                input_column=source.input_column,
                output_column=source.output_column,
            )
            columns = _source_columns(args, source, extra_columns)
            if source.streaming:
                loaded = _stream(source, args, columns)
            else:
                loaded = load_rows(source.path, args, columns=columns)
            rows = _in_mixture_columns(loaded, source, data_args, [column for _, column in extra_columns])
            train, held_out = _hold_out(rows, source, data_args, seed, hold_out)
            parts.append(SourceRows(source, loaded, train, held_out))
    return parts


def _source_columns(args, source, extra_columns) -> Columns:
    """The columns a source's rows must hold, each named by the source key that maps it (for the error that says
    which key to set)."""
    columns = instruction_columns(args)

    def named(pairs):
        return tuple((f"{key} of source '{source.name}' in dataset_mixture", column) for key, column in pairs)

    return Columns(required=named(columns.required), optional=(*named(columns.optional), *extra_columns))


def _stream(source, args, columns: Columns) -> RowSource:
    """The first `rows` rows of a source read as a stream (datasets' streaming mode): the rest is never downloaded."""
    import itertools

    import datasets

    path = samples.resolve_sample(source.path) if samples.is_embedded(source.path) else source.path
    local = Path(path).expanduser()
    try:
        if local.suffix.lower() in LOCAL_FORMATS or local.exists():
            files, kind = local_files(local)
            stream = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True)
        else:
            stream = datasets.load_dataset(path, source.config, split=source.split, streaming=True)
        rows = list(itertools.islice(stream, source.rows))
    except DataError:
        raise
    except Exception as exc:  # offline, not found, unreadable
        raise DataError(f"{source.path}: could not stream the dataset: {first_line(exc)}") from None
    if not rows:
        raise DataError(f"{source.path}: the stream holds no rows")
    loaded = check_dataset(datasets.Dataset.from_list(rows), source.path, args, columns)
    loaded.notes.append(f"{source.name}: streamed, the first {len(rows)} rows read (rows: {source.rows})")
    return loaded


def _in_mixture_columns(loaded: RowSource, source, data_args, extra: list[str]):
    """The source's rows under the recipe's column names (the mixture's), all text, so the sources concatenate;
    each row with its location and its source's name."""
    import datasets

    dataset = loaded.dataset
    renames = {
        getattr(source, key): getattr(data_args, key)
        for key in ("instruction_column", "input_column", "output_column")
        if getattr(source, key)
    }
    dataset = dataset.select_columns([*renames, *(c for c in extra if c in dataset.column_names)])
    dataset = dataset.rename_columns({old: new for old, new in renames.items() if old != new})
    names = [c for c in (*columns_of(data_args), *extra) if c]
    for column in names:
        if column not in dataset.column_names:  # a source without an input (or family) column: null
            dataset = dataset.add_column(column, [None] * len(dataset))
    dataset = dataset.add_column(ROW_COLUMN, [loaded.row(i) for i in range(len(dataset))])
    dataset = dataset.add_column(SOURCE_COLUMN, [source.name] * len(dataset))
    names += [ROW_COLUMN, SOURCE_COLUMN]
    text = datasets.Value("string")
    return dataset.select_columns(names).cast(datasets.Features({name: text for name in names}))


def _hold_out(dataset, source, data_args, seed: int, hold_out: bool):
    size = data_args.eval_split_size
    if not hold_out or not size:
        return dataset, None
    test_size = int(size) if size >= 1 else size
    held = test_size if isinstance(test_size, int) else round(test_size * len(dataset))
    if held >= len(dataset) or len(dataset) < 2:
        raise DataError(
            f"{source.path}: eval_split_size {size} leaves no training rows of source '{source.name}' "
            f"({len(dataset)} rows); give it more rows, or hold out less"
        )
    parts = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    held_out = parts["test"]
    if data_args.max_eval_samples:
        held_out = held_out.select(range(min(data_args.max_eval_samples, len(held_out))))
    return parts["train"], held_out


def drop_rows(parts: list[SourceRows], dropped: dict[int, str]) -> None:
    """Leave out of the sources' training rows those the data checks dropped (indices into `candidates(parts)`),
    each recorded with its source's skipped rows."""
    from qlora_pipeline.data.checks import leave_out

    start = 0
    for part in parts:
        end = start + len(part.train)
        mine = {i - start: reason for i, reason in dropped.items() if start <= i < end}
        part.train = leave_out(part.train, mine, part.loaded)
        start = end


def candidates(parts: list[SourceRows]):
    """Every source's training rows, before any is drawn: what the data checks look at."""
    import datasets

    return datasets.concatenate_datasets([part.train for part in parts])


def held_out(parts: list[SourceRows]):
    """Every source's held-out rows as one set (None where none are held out)."""
    import datasets

    sets = [part.eval for part in parts if part.eval is not None]
    return datasets.concatenate_datasets(sets) if sets else None


def mix(parts: list[SourceRows], data_args, seed: int):
    """The training set: each source's rows in play, interleaved by weight or concatenated and shuffled."""
    import datasets

    pools = [_in_play(part, seed) for part in parts]
    weights = [part.source.weight for part in parts]
    if len(pools) == 1:
        mixed = pools[0]
    elif weights[0] is not None:
        total = sum(weights)
        mixed = datasets.interleave_datasets(
            pools,
            probabilities=[weight / total for weight in weights],
            seed=seed,
            stopping_strategy=data_args.mixture_stopping,
        )
    else:
        mixed = datasets.concatenate_datasets(pools).shuffle(seed=seed)
    if data_args.max_train_samples:
        mixed = mixed.select(range(min(data_args.max_train_samples, len(mixed))))
    return mixed


def _in_play(part: SourceRows, seed: int):
    """The source's rows the mixture draws from: all, or `rows` / `fraction` of them drawn by the seed."""
    import numpy as np

    source, rows = part.source, part.train
    if len(rows) == 0:
        raise DataError(
            f"{source.path}: source '{source.name}' has no training rows left: {len(part.loaded.skipped)} skipped "
            f"(bad rows, or left out by the data checks' drop), {len(part.eval or [])} held out"
        )
    if source.rows is None and source.fraction is None or source.streaming:
        return rows
    wanted = source.rows if source.rows is not None else round(source.fraction * len(rows))
    if wanted < 1:
        raise DataError(f"{source.path}: fraction {source.fraction} of {len(rows)} training rows is no row")
    if source.replace:
        return rows.select(np.random.default_rng(seed).integers(0, len(rows), size=wanted))
    if wanted > len(rows):
        raise DataError(
            f"{source.path}: rows {wanted} asked of source '{source.name}', which has {len(rows)} training rows; "
            "ask for fewer, or set replace: true to use rows more than once"
        )
    return rows.shuffle(seed=seed).select(range(wanted))


def combined_source(parts: list[SourceRows]) -> RowSource:
    """The sources as one RowSource (counts, skipped rows, notes), as the task's data step reports a dataset."""
    return RowSource(
        None,
        " + ".join(part.source.name for part in parts),
        None,
        sum(part.loaded.rows_read for part in parts),
        [record for part in parts for record in part.loaded.skipped],
        [note for part in parts for note in part.loaded.notes],
        [record for part in parts for record in part.loaded.repaired],
    )


def accounting(parts: list[SourceRows], train_set, eval_set, eval_source: RowSource | None = None) -> dict:
    """Where every row read went, per source and in all: read = train (distinct rows drawn) + eval + skipped +
    unused; `draws` is the training set's rows from each source (a row drawn twice counts twice). `eval_source`:
    the recipe's eval_file, read apart from the sources."""
    sources = column_values(train_set, SOURCE_COLUMN)
    draws = Counter(sources)
    distinct = Counter(source for source, _ in set(zip(sources, column_values(train_set, ROW_COLUMN))))
    held = (
        Counter(column_values(eval_set, SOURCE_COLUMN)) if eval_set is not None and eval_source is None else Counter()
    )
    counts = {}
    for part in parts:
        name, skipped = part.source.name, len(part.loaded.skipped)
        counts[name] = {
            "path": part.source.path,
            "weight": part.source.weight,
            "rows_read": part.loaded.rows_read,
            "train": distinct[name],
            "draws": draws[name],
            "eval": held[name],
            "skipped": skipped,
            "unused": part.loaded.rows_read - distinct[name] - held[name] - skipped,
        }
    extra = [eval_source] if eval_source is not None else []
    read = sum(c["rows_read"] for c in counts.values()) + sum(e.rows_read for e in extra)
    skipped = sum(c["skipped"] for c in counts.values()) + sum(len(e.skipped) for e in extra)
    used = sum(c["train"] for c in counts.values()) + (len(eval_set) if eval_set is not None else 0)
    repaired = Counter(record["fix"] for part in parts for record in part.loaded.repaired)
    return {
        "rows_read": read,
        "skipped": skipped,
        "unused": read - skipped - used,
        "repaired": dict(repaired),
        "sources": counts,
    }
