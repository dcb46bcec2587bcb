"""The per-source table of a mixture, from the data summary (summary.json's `data`): where each source's rows went
and what training got of it. One table for `preprocess` (text), the report and the model card (markdown).

Columns: weight (as the recipe gave it), rows read = train + eval + skipped + unused, draws (training examples drawn,
a row drawn twice counted twice), share (of the training examples kept after max_length), tokens (training,
before truncation), and the shares of its training rows over max_length and left with no labelled token.
"""

from __future__ import annotations

HEADERS = (
    "source",
    "weight",
    "read",
    "train",
    "eval",
    "skipped",
    "unused",
    "draws",
    "share",
    "tokens",
    "over max_length",
    "no label",
)


def source_rows(data: dict | None) -> list[list[str]]:
    """One row of cells per source; [] where the data summary has no sources (a single dataset)."""
    sources = (data or {}).get("sources") or {}
    if not isinstance(sources, dict) or not sources:
        return []
    train = (data.get("train") or {}) if isinstance(data.get("train"), dict) else {}
    by_source = train.get("sources") or {}
    examples = sum(entry.get("examples", 0) for entry in by_source.values()) or 0
    rows = []
    for name, counts in sources.items():
        tokenized = by_source.get(name) or {}
        drawn = tokenized.get("rows", 0)
        weight = counts.get("weight")
        rows.append(
            [
                name,
                "—" if weight is None else f"{weight:g}",
                f"{counts.get('rows_read', 0):,}",
                f"{counts.get('train', 0):,}",
                f"{counts.get('eval', 0):,}",
                f"{counts.get('skipped', 0):,}",
                f"{counts.get('unused', 0):,}",
                f"{counts.get('draws', 0):,}",
                _share(tokenized.get("examples", 0), examples),
                f"{tokenized.get('tokens', 0):,}",
                _share(tokenized.get("overlong", 0), drawn),
                _share(tokenized.get("no_label", 0), drawn),
            ]
        )
    return rows


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def text_table(data: dict | None) -> list[str]:
    """The table as aligned text lines (preprocess); [] without sources."""
    rows = source_rows(data)
    if not rows:
        return []
    widths = [max(len(str(cell)) for cell in column) for column in zip(HEADERS, *rows)]

    def line(cells) -> str:  # the name left-aligned, the figures right-aligned
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    return [line(HEADERS), *(line(row) for row in rows)]


def markdown_table(data: dict | None) -> list[str]:
    """The table in markdown (report, model card); [] without sources."""
    rows = source_rows(data)
    if not rows:
        return []
    return [
        "| " + " | ".join(HEADERS) + " |",
        "|---" + "|---:" * (len(HEADERS) - 1) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
