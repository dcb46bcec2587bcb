"""Tokenizing a split, for every task: the map through `datasets` (cached by fingerprint), the overlong policy
(error, drop or truncate at max_length, counted) and the split's statistics; plus the causal LM's own encoding, each
row rendered with the prompt template and a completion mask over the answer.

A task's tokenize step supplies only its `encode(batch)`; `map_rows` runs it and `over_max_length` applies the
policy the same way for all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from qlora_pipeline.data.rows import ROW_COLUMN, SOURCE_COLUMN, column_values, columns_of, quiet_progress
from qlora_pipeline.data.templates import PromptTemplate
from qlora_pipeline.errors import DataError

# Bump when `tokenize` changes what it writes, so cached results from older code are not reused.
TOKENIZE_VERSION = "2"


@dataclass
class TokenizedSplit:
    dataset: object  # datasets.Dataset with input_ids, completion_mask, n_tokens
    rows_in: int
    overlong: int
    dropped: int
    truncated: int
    from_cache: bool
    lengths: list[int] = field(default_factory=list)
    # Per source, where the rows carry one (a mixture, several eval files): rows, examples, tokens, over max_length,
    # dropped, truncated, and no_label (rows whose answer kept no labelled token after truncation).
    by_source: dict[str, dict] = field(default_factory=dict)
    example_sources: list[str] | None = None  # each kept example's source, in order (where rows carry one)

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
            **({"sources": self.by_source} if self.by_source else {}),
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


def tokenizer_fingerprint(tokenizer, template: PromptTemplate) -> str:
    """What the causal LM's encoding takes from the tokenizer and template, beyond what `fingerprint` names."""
    parts = [
        template.name,
        template.chat_template_for(tokenizer),
        template.end_token_for(tokenizer),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def tokenize(
    dataset,
    tokenizer,
    template: PromptTemplate,
    data_args,
    max_length: int | None,
    name: str,
    templates: dict[str, PromptTemplate] | None = None,
) -> TokenizedSplit:
    """Render each row with the template and tokenize it; returns input_ids + completion_mask per example.
    `templates`: a mixture's sources whose rows take another template than `template`, by source name.

    The completion mask covers the answer and its closing end-of-turn token, so the model learns to stop.
    """
    instruction, input_column, output = columns_of(data_args)
    templates = templates or {}
    end_id = tokenizer.convert_tokens_to_ids(template.end_token_for(tokenizer))
    # Fails here, before any model loads, if the tokenizer template cannot separate prompt from answer.
    for used in (template, *templates.values()):
        used.chat_template_for(tokenizer)

    def encode(batch):
        prompts, completions = [], []
        sources = batch.get(SOURCE_COLUMN) if templates else None
        for i in range(len(batch[instruction])):
            extra = batch[input_column][i] if input_column else None
            row_template = templates.get(sources[i], template) if sources else template
            prompt, completion = row_template.prompt_and_completion(
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

    key = fingerprint(
        dataset,
        tokenizer,
        tokenizer_fingerprint(tokenizer, template),
        *(f"{source}={tokenizer_fingerprint(tokenizer, used)}" for source, used in sorted(templates.items())),
        str(max_length),
        data_args.overlong,
        "|".join(str(c) for c in columns_of(data_args)),
        TOKENIZE_VERSION,
    )
    encoded, from_cache = map_rows(dataset, encode, key, f"Tokenizing {name}", quiet=data_args.overlong == "error")
    lengths = column_values(encoded, "n_tokens")
    over = over_max_length(
        encoded, lengths, max_length, data_args.overlong, f"{name} examples are over", "{n} tokens", "drop or truncate"
    )
    by_source = SOURCE_COLUMN in encoded.column_names
    masks = column_values(encoded, "completion_mask") if by_source or data_args.overlong != "drop" else None
    if data_args.overlong == "drop":
        keep_rows = [i for i, n in enumerate(lengths) if max_length is None or n <= max_length]
    else:
        # A prompt that fills max_length on its own leaves no answer tokens: nothing to learn from it.
        keep_rows = [i for i, m in enumerate(masks) if any(m)]
    kept = encoded.select(keep_rows) if len(keep_rows) != len(encoded) else encoded
    truncated_rows = column_values(encoded, "truncated")
    truncated = sum(truncated_rows)
    sources = column_values(encoded, SOURCE_COLUMN) if by_source else None
    stats = per_source(sources, lengths, truncated_rows, masks, max_length, set(keep_rows)) if by_source else {}
    example_sources = [sources[i] for i in keep_rows] if by_source else None
    return TokenizedSplit(
        dataset=kept.remove_columns([c for c in ("truncated", ROW_COLUMN, SOURCE_COLUMN) if c in kept.column_names]),
        rows_in=len(dataset),
        overlong=len(over),
        dropped=len(encoded) - len(keep_rows),
        truncated=truncated - (len(encoded) - len(keep_rows) if data_args.overlong == "truncate" else 0),
        from_cache=from_cache,
        lengths=list(lengths),  # before truncation: the data's own length distribution
        by_source=stats,
        example_sources=example_sources,
    )


def per_source(sources, lengths, truncated_rows, masks, max_length: int | None, kept: set[int]) -> dict[str, dict]:
    """Each source's rows, examples kept, tokens (before truncation), rows over max_length, dropped, truncated, and
    rows left with no labelled token (a prompt that fills max_length on its own: dropped under truncate).
    The arguments are the encoded rows' columns, each read once by the caller."""
    stats: dict[str, dict] = {}
    columns = zip(sources, lengths, truncated_rows, masks)
    for index, (source, n_tokens, truncated, mask) in enumerate(columns):
        entry = stats.setdefault(
            source,
            {"rows": 0, "examples": 0, "tokens": 0, "overlong": 0, "dropped": 0, "truncated": 0, "no_label": 0},
        )
        entry["rows"] += 1
        entry["tokens"] += n_tokens
        entry["overlong"] += max_length is not None and n_tokens > max_length
        if index in kept:
            entry["examples"] += 1
            entry["truncated"] += bool(truncated)
        else:
            entry["dropped"] += 1
        entry["no_label"] += not any(mask)
    return stats


def cache_file_exists(dataset, key: str) -> bool:
    """Whether `datasets` already holds the mapped result for this fingerprint (it then reads it instead)."""
    files = getattr(dataset, "cache_files", None)
    if not files:
        return False
    folder = os.path.dirname(files[0]["filename"])
    return os.path.exists(os.path.join(folder, f"cache-{key}.arrow"))


def fingerprint(dataset, tokenizer, *parts: str) -> str:
    """The cache key of a tokenized split: the rows' own fingerprint, the tokenizer, and everything else the
    encoding depends on (`parts`: lengths, columns, policies, the encoder's version)."""
    named = [tokenizer.name_or_path, type(tokenizer).__name__, str(len(tokenizer))]
    return hashlib.sha256("\x00".join([getattr(dataset, "_fingerprint", ""), *named, *parts]).encode()).hexdigest()[:16]


def map_rows(dataset, encode, key: str, desc: str, quiet: bool = False):
    """dataset.map(encode) in batches, the columns replaced by what `encode` returns (each row keeps its location,
    ROW_COLUMN, for the error that names it), cached under `key`. Returns (encoded, from_cache). `quiet`: no
    progress bar (with overlong: error the run may stop on a row, and a bar would stand between it and the error)."""

    def encode_and_locate(batch):
        out = encode(batch)
        for column in (ROW_COLUMN, SOURCE_COLUMN):
            if column in batch:
                out[column] = batch[column]
        return out

    from_cache = cache_file_exists(dataset, key)
    with quiet_progress(quiet):
        encoded = dataset.map(
            encode_and_locate,
            batched=True,
            batch_size=256,
            remove_columns=dataset.column_names,
            new_fingerprint=key,
            desc=desc,
        )
    return encoded, from_cache


def over_max_length(
    encoded, lengths: list[int], max_length: int | None, policy: str, name: str, what: str, remedy: str
) -> list[int]:
    """The rows over max_length (by `lengths`, their n_tokens before truncation); under overlong: error, the first
    one ends the run, named with its file and line. `what` says what was counted ("input of {n} tokens"), `remedy`
    which overlong settings would let the run go on."""
    over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
    if over and policy == "error":
        first = over[0]
        raise DataError(
            f"{encoded[first][ROW_COLUMN]}: {what.format(n=lengths[first])}, over max_length {max_length} "
            f"(overlong: error; {len(over)} of {len(encoded)} {name}); raise max_length, or set overlong: {remedy}"
        )
    return over


def check_rows_left(splits, dataset_name: str, max_length: int | None, what: str) -> None:
    """A split that overlong: drop emptied is an error naming the dataset (`what`: example, text, input)."""
    for split in filter(None, splits):
        if len(split.dataset) == 0:
            raise DataError(
                f"{dataset_name}: every {what} is longer than max_length {max_length} "
                f"({split.overlong} of {split.rows_in}); raise max_length or set overlong: truncate"
            )
