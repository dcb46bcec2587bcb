"""Checking a model card already written, offline, before it is published: front matter that parses and names Hub ids,
no absolute local path, no credential."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard

from qlora_pipeline.outputs.names import ABSOLUTE_PATH, last_component
from qlora_pipeline.secrets import secret_values


def check_card(folder: Path) -> list[str]:
    """Problems with folder/README.md as a model card to publish; [] means valid. Works offline."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return [f"{readme}: no model card (README.md) in the folder"]
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{readme}: cannot read the model card: {exc}"]
    problems = []
    if not text.startswith("---"):
        problems.append(f"{readme}: the model card has no YAML front matter (a leading '---' block)")
    else:
        try:
            card = ModelCard.load(readme)
        except Exception as exc:  # noqa: BLE001 -- YAML or metadata errors alike
            first = " ".join(str(exc).split())[:200]
            problems.append(f"{readme}: the model card's front matter is not valid YAML: {first}")
        else:
            data = card.data.to_dict()
            for key in ("library_name", "pipeline_tag"):
                if not data.get(key):
                    problems.append(f"{readme}: the model card's front matter has no {key}")
            for key in ("base_model", "datasets"):
                names = data.get(key)
                for name in [names] if isinstance(names, str) else names or []:
                    try:
                        validate_repo_id(str(name))
                    except HFValidationError:
                        problems.append(f"{readme}: {key} {_describe_bad(str(name))} is not a Hub repo id")
    for match in ABSOLUTE_PATH.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        problems.append(
            f"{readme}: line {line} holds an absolute local path ({_shorten(match.group(0))}); "
            "a published card must not reveal the local file system"
        )
        break
    for name, value in secret_values().items():
        if value in text:
            problems.append(f"{readme}: holds the value of {name}; a credential must never be published")
    return problems


def _describe_bad(name: str) -> str:
    return repr(_shorten(name)) if not ABSOLUTE_PATH.search(name) else f"'…/{last_component(name)}' (a local path)"


def _shorten(path: str) -> str:
    """A path shown in a message: its first component and last one."""
    parts = [p for p in re.split(r"[\\/]", path) if p]
    return f"/{parts[0]}/…/{parts[-1]}" if len(parts) > 2 else path
