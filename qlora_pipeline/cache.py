"""Where the pipeline keeps what it builds for itself: the embedded tiny models and the recipe-key cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$QLORA_PIPELINE_CACHE, else ~/.cache/qlora_pipeline."""
    return Path(os.environ.get("QLORA_PIPELINE_CACHE", Path.home() / ".cache" / "qlora_pipeline"))
