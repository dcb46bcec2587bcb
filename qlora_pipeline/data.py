"""Data: load the rows, check them, split them, and turn them into token ids with a completion mask.

Rows come from a Hub id, a local .jsonl/.json/.csv/.parquet file (or a folder of them) or an embedded sample, all
through `datasets`. Every row is checked before any model loads: a malformed JSON line, a missing column, a null
or empty instruction/output stops the run with the file and line named. Nothing is dropped silently: examples
over `max_length` are dropped or truncated by the recipe's choice and counted.

Tokenization is ours rather than SFTTrainer's so that `preprocess --debug` shows exactly what training sees, and
so the overlong policy can be applied and counted before packing. The result carries `input_ids` and
`completion_mask`; SFTTrainer turns the mask into -100 labels and packs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qlora_pipeline import tiny
from qlora_pipeline.errors import DataError
from qlora_pipeline.templates import PromptTemplate

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Bump when `tokenize` changes what it writes, so cached results from older code are not reused.
TOKENIZE_VERSION = "1"


@dataclass
class RowSource:
    """A loaded dataset plus how to name its rows in messages (file line numbers where we know them)."""

    dataset: object  # datasets.Dataset
    name: str
    row_names: list[str] | None = None

    def row(self, index: int) -> str:
        if self.row_names is not None:
            return self.row_names[index]
        return f"{self.name}: row {index + 1}"


@dataclass
class TokenizedSplit:
    dataset: object  # datasets.Dataset with input_ids, completion_mask, n_tokens
    rows_in: int
    overlong: int
    dropped: int
    truncated: int
    from_cache: bool
    lengths: list[int] = field(default_factory=list)

    def stats(self) -> dict:
        import numpy as np

        lengths = np.asarray(self.lengths or [0])
        return {
            "rows": self.rows_in,
            "examples": len(self.dataset),
            "overlong": self.overlong,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "tokens": int(lengths.sum()),
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 1),
            "median": int(np.median(lengths)),
            "p95": int(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "from_cache": self.from_cache,
            "length_histogram": length_histogram(self.lengths),
        }


def length_histogram(lengths: list[int], bins: int = 30) -> dict:
    """About `bins` bins of whole-token width over [0, longest]; the counts sum to len(lengths) (every row
    tokenized, dropped ones included, as the other length statistics)."""
    import numpy as np

    longest = max(lengths, default=0)
    width = max(1, -(-longest // bins))  # ceil
    edges = np.arange(0, width * max(1, -(-longest // width)) + 1, width)
    counts, _ = np.histogram(np.asarray(lengths, dtype=np.int64), bins=edges)
    return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def columns_of(data_args) -> tuple[str, str | None, str]:
    return data_args.instruction_column, data_args.input_column, data_args.output_column


def load_rows(name: str, data_args, split: str | None = None) -> RowSource:
    """Load and check a dataset from a Hub id, a local file or folder, or an embedded sample."""
    import datasets

    # Reading a file is quick; its progress bar would only stand between a bad row and its one-line error.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _load_and_check(name, data_args, split)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_and_check(name: str, data_args, split: str | None) -> RowSource:
    import datasets

    if tiny.is_embedded(name):
        name = tiny.resolve_sample(name)
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FORMATS
    if looks_local:
        source = _load_local(path, data_args)
    else:
        try:
            dataset = datasets.load_dataset(name, data_args.dataset_config, split=split or data_args.dataset_split)
        except Exception as exc:  # datasets raises many types: offline, not found, bad config, bad split
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{name}: could not load the dataset from the Hub: {first_line}") from None
        source = RowSource(dataset, name)
    _check_columns(source, data_args)
    _check_values(source, data_args)
    return source


def _load_local(path: Path, data_args) -> RowSource:
    import datasets

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
    kind = kinds.pop()

    row_names: list[str] | None = None
    if kind == "json":
        row_names = []
        for f in files:
            row_names += _scan_json_file(f, data_args)
    elif kind == "csv":
        row_names = []
        for f in files:
            row_names += _scan_csv_file(f)
    try:
        dataset = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as exc:
        message = str(exc).strip().splitlines()
        raise DataError(
            f"{path}: could not be read as {kind}: {message[-1] if message else type(exc).__name__}"
        ) from None
    if len(dataset) == 0:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    if row_names is not None and len(row_names) != len(dataset):
        row_names = None  # e.g. a JSON file nested under a field: fall back to row numbers
    return RowSource(dataset, str(path), row_names)


def _scan_json_file(path: Path, data_args) -> list[str]:
    """Parse every row ourselves first, so a malformed line is reported with its line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no rows)")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {index + 1}: expected an object with fields, got {type(row).__name__}")
        if not rows:
            raise DataError(f"{path}: the file is empty (no rows)")
        return [f"{path}: row {i + 1}" for i in range(len(rows))]
    names = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with fields, got {type(row).__name__}")
        names.append(f"{path}:{lineno}")
    return names


def _scan_csv_file(path: Path) -> list[str]:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (no header, no rows)")
            names = []
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}")
                names.append(f"{path}:{reader.line_num}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not names:
        raise DataError(f"{path}: the file has a header but no rows")
    return names


def _check_columns(source: RowSource, data_args) -> None:
    instruction, input_column, output = columns_of(data_args)
    present = list(source.dataset.column_names)
    needed = [("instruction_column", instruction), ("output_column", output)]
    if input_column:
        needed.append(("input_column", input_column))
    for key, column in needed:
        if column not in present:
            raise DataError(
                f"{source.name}: missing column '{column}' (columns present: {', '.join(present) or 'none'}); "
                f"map yours with the recipe key {key}"
            )


def _check_values(source: RowSource, data_args) -> None:
    instruction, input_column, output = columns_of(data_args)
    columns = [c for c in (instruction, input_column, output) if c]
    start = 0
    for batch in source.dataset.select_columns(columns).iter(batch_size=1000):
        for offset in range(len(batch[instruction])):
            index = start + offset
            for column in (instruction, output):
                value = batch[column][offset]
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise DataError(f"{source.row(index)}: '{column}' is {'null' if value is None else 'empty'}")
                if not isinstance(value, str):
                    raise DataError(f"{source.row(index)}: '{column}' must be text, got {type(value).__name__}")
            if input_column:
                value = batch[input_column][offset]
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{source.row(index)}: '{input_column}' must be text, got {type(value).__name__}")
        start += len(batch[instruction])


def split_train_eval(train: RowSource, data_args, seed: int, eval_source: RowSource | None = None):
    """Deterministic split by seed, or the given eval set. Returns (train Dataset, eval Dataset or None)."""
    dataset = train.dataset
    if eval_source is not None:
        eval_dataset = eval_source.dataset
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
    if eval_dataset is not None and data_args.max_eval_samples:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    return dataset, eval_dataset


def tokenizer_fingerprint(tokenizer, template: PromptTemplate) -> str:
    parts = [
        tokenizer.name_or_path,
        type(tokenizer).__name__,
        str(len(tokenizer)),
        template.name,
        template.chat_template_for(tokenizer),
        template.end_token_for(tokenizer),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def tokenize(
    dataset, tokenizer, template: PromptTemplate, data_args, max_length: int | None, name: str
) -> TokenizedSplit:
    """Render each row with the template and tokenize it; returns input_ids + completion_mask per example.

    The completion mask covers the answer and its closing end-of-turn token, so the model learns to stop.
    """
    instruction, input_column, output = columns_of(data_args)
    end_id = tokenizer.convert_tokens_to_ids(template.end_token_for(tokenizer))
    # Fails here, before any model loads, if the tokenizer template cannot separate prompt from answer.
    template.chat_template_for(tokenizer)

    def encode(batch):
        prompts, completions = [], []
        for i in range(len(batch[instruction])):
            extra = batch[input_column][i] if input_column else None
            prompt, completion = template.prompt_and_completion(
                tokenizer, batch[instruction][i], extra, batch[output][i]
            )
            prompts.append(prompt)
            completions.append(completion)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer([p + c for p, c in zip(prompts, completions)], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "completion_mask": [], "n_tokens": [], "truncated": []}
        for prompt, full in zip(prompt_ids, full_ids):
            if full[: len(prompt)] != prompt:
                raise DataError(
                    f"template '{template.name}': the prompt's tokens change when the answer follows them, so the "
                    f"prompt cannot be masked exactly; prompt ends {tokenizer.decode(prompt[-5:])!r}"
                )
            if end_id not in full[len(prompt) :]:
                raise DataError(
                    f"template '{template.name}': the answer does not end with {template.end_token_for(tokenizer)!r}, "
                    f"so the model would never learn to stop"
                )
            mask = [0] * len(prompt) + [1] * (len(full) - len(prompt))
            over = max_length is not None and len(full) > max_length
            out["n_tokens"].append(len(full))
            out["truncated"].append(bool(over and data_args.overlong == "truncate"))
            if over and data_args.overlong == "truncate":
                full, mask = full[:max_length], mask[:max_length]
            out["input_ids"].append(full)
            out["completion_mask"].append(mask)
        return out

    fingerprint = hashlib.sha256(
        "\x00".join(
            [
                getattr(dataset, "_fingerprint", ""),
                tokenizer_fingerprint(tokenizer, template),
                str(max_length),
                data_args.overlong,
                "|".join(str(c) for c in columns_of(data_args)),
                TOKENIZE_VERSION,
            ]
        ).encode()
    ).hexdigest()[:16]
    from_cache = _cache_file_exists(dataset, fingerprint)
    encoded = dataset.map(
        encode,
        batched=True,
        batch_size=256,
        remove_columns=dataset.column_names,
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {name}",
    )
    lengths = encoded["n_tokens"]
    over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
    if data_args.overlong == "drop":
        keep_rows = [i for i, n in enumerate(lengths) if max_length is None or n <= max_length]
    else:
        # A prompt that fills max_length on its own leaves no answer tokens: nothing to learn from it.
        masks = encoded["completion_mask"]
        keep_rows = [i for i, m in enumerate(masks) if any(m)]
    kept = encoded.select(keep_rows) if len(keep_rows) != len(encoded) else encoded
    truncated = sum(encoded["truncated"])
    return TokenizedSplit(
        dataset=kept.remove_columns(["truncated"]),
        rows_in=len(dataset),
        overlong=len(over),
        dropped=len(encoded) - len(keep_rows),
        truncated=truncated - (len(encoded) - len(keep_rows) if data_args.overlong == "truncate" else 0),
        from_cache=from_cache,
        lengths=list(lengths),  # before truncation: the data's own length distribution
    )


def _cache_file_exists(dataset, fingerprint: str) -> bool:
    """Whether `datasets` already holds the mapped result for this fingerprint (it then reads it instead)."""
    files = getattr(dataset, "cache_files", None)
    if not files:
        return False
    folder = os.path.dirname(files[0]["filename"])
    return os.path.exists(os.path.join(folder, f"cache-{fingerprint}.arrow"))
