"""How a card (and any published file) names things: a Hub id or embedded name as it is, a local path by its last part
only, never a credential."""

from __future__ import annotations

import re
from pathlib import Path

from qlora_pipeline.data import samples
from qlora_pipeline.secrets import redact

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")


# An absolute local path: a POSIX path of two or more components that does not continue a word, a URL (`://`), a
# relative path (`./`) or a home path (`~/`), or a Windows drive path. `tokens/s`, `</s>`, `OWNER/NAME` and
# `https://huggingface.co/docs` are not matched.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])/(?:[\w.@+-]+/)+[\w.@+-]+/?|\b[A-Za-z]:\\[^\s`'\"|)]+")


def scrub(text: str) -> str:
    """The text without credential values and with absolute paths cut to their last component."""
    return ABSOLUTE_PATH.sub(lambda match: last_component(match.group(0)), redact(text))


def last_component(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]", path) if p]
    return parts[-1] if parts else path


def is_hub_id(name: str | None, suffixes: tuple[str, ...] = ()) -> bool:
    """True for a name that can only be a Hub repo id: not embedded, not a local path, a valid `owner/name`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or samples.is_embedded(name) or name.startswith((".", "/", "~", "\\")) or ABSOLUTE_PATH.match(name):
        return False
    if name.lower().endswith(suffixes) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def display_name(name: str | None) -> str:
    """How a model or dataset is named in a card: a Hub id or embedded name as is, a local path by its last part."""
    if not name:
        return "(none)"
    if samples.is_embedded(name) or is_hub_id(name, DATA_FILE_SUFFIXES):
        return name
    return last_component(name.rstrip("/\\")) or name
