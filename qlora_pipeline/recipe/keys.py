"""The keys a recipe may hold, cached per installed version set, so an unknown key is refused in milliseconds.

Which keys exist (the fields of schema.py's dataclasses, TRL's `ModelConfig` and `SFTConfig`) and which options the
command line takes (the `HfArgumentParser` over them) depend only on the installed trl, transformers and peft, the
Python version and qlora_pipeline's recipe/schema.py. Building them imports trl, hence transformers and torch: seconds.
`load_recipe` builds them once and writes them to `CACHE/recipe-keys/<hash>.json`; afterwards it reads that file
and refuses an unknown key in the recipe or on the command line before importing anything heavy.

The file is named by a hash of those versions (and of schema.py's text), so a file written for other versions is
never read, and a stale file cannot refuse a valid key. trl, transformers or peft installed from a source tree or a
VCS checkout, or at a dev/local version, may change without a version bump: then nothing is cached. A file that
cannot be read or parsed counts as absent, and the full check rewrites it; a cache folder that cannot be written
(read-only home) only costs the fast path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
LIBRARIES = ("trl", "transformers", "peft", "qlora-pipeline")
# argparse's own test for a negative number (a value, not an option) on Python 3.10-3.12; on other versions a token
# it does not match makes first_unknown_option give up, which is always safe.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


@dataclass(frozen=True)
class Keys:
    fields: dict[str, None]  # every recipe key, in declaration order (a dict: fast `in`, ordered for difflib)
    options: dict[str, int | str | None]  # every option string the recipe parser takes → its argparse nargs


@functools.lru_cache(maxsize=1)
def fingerprint() -> dict[str, str] | None:
    """What the keys depend on, read without importing the libraries; None where it cannot be trusted."""
    from importlib import metadata

    found = {"format": str(FORMAT), "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for name in LIBRARIES:
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None
        version = distribution.version or ""
        if name != "qlora-pipeline" and (
            "dev" in version or "+" in version or distribution.read_text("direct_url.json") is not None
        ):
            return None  # a source or VCS install: its fields may change while its version does not
        found[name] = version
    try:  # qlora_pipeline's own fields change with schema.py, version bump or not (editable installs)
        found["config"] = hashlib.sha256(Path(__file__).with_name("schema.py").read_bytes()).hexdigest()[:16]
    except OSError:
        return None
    return found


def cache_file(versions: dict[str, str]) -> Path:
    from qlora_pipeline.cache import cache_root

    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "recipe-keys" / f"{digest}.json"


def load() -> Keys | None:
    """The cached keys for the installed versions, or None (no file, another format, unreadable or corrupt)."""
    versions = fingerprint()
    if versions is None:
        return None
    try:
        data = json.loads(cache_file(versions).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("versions") != versions:
        return None
    fields, options = data.get("fields"), data.get("options")
    if not (isinstance(fields, list) and fields and all(isinstance(name, str) for name in fields)):
        return None
    if not (
        isinstance(options, dict) and options and all(isinstance(n, (int, str, type(None))) for n in options.values())
    ):
        return None
    return Keys(dict.fromkeys(fields), options)


def store(fields: Iterable[str], parser) -> None:
    """Write the keys and the parser's options for the installed versions, atomically; failures are ignored."""
    versions = fingerprint()
    if versions is None:
        return
    options = {option: action.nargs for action in parser._actions for option in action.option_strings}
    data = {"format": FORMAT, "versions": versions, "fields": list(fields), "options": options}
    path = cache_file(versions)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError:
        pass  # read-only or full cache folder: the next run takes the full check again


def _is_value(token: str) -> bool:
    """argparse reads this token as a value (not as an option)."""
    return not token.startswith("-") or token == "-" or bool(_NEGATIVE_NUMBER.match(token))


def first_unknown_option(overrides: Iterable[str], options: dict[str, int | str | None]) -> str | None:
    """The token the recipe parser's `parse_known_args` would return first among the unknown ones, where that is
    certain from the option strings alone; None where it is not (no unknown option, an abbreviation, a stray or
    missing value, anything unusual): the full check then decides, so a valid command line is never refused.

    The whole line is read, as argparse reads it: a missing value or an ambiguous abbreviation anywhere is its
    error, not the unknown option's. Only a value argparse cannot convert (its type is not cached) can come first
    there and not here."""
    tokens = list(overrides)
    unknown = None
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--" or " " in token:
            if unknown is not None and _is_value(token):
                index += 1  # a value after an unknown option: argparse leaves it unknown too, after that option
                continue
            return None  # a stray value first, a single-dash token, the end of options: argparse's own business
        name, equals, _ = token.partition("=")
        index += 1
        if name not in options:
            if any(option.startswith(name) for option in options):
                return None  # argparse takes an unambiguous prefix of an option (or calls it ambiguous)
            unknown = unknown or token
            continue
        nargs = options[name]
        if name == "--help":
            return None  # the parser prints its help and exits
        if equals:  # --key=value: the value is in the token, the next token is not consumed
            if nargs == 0:
                return None
            continue
        following = 0
        while index + following < len(tokens) and _is_value(tokens[index + following]):
            following += 1
        if nargs is None:
            if following < 1:
                return None  # "expected one argument"
            index += 1
        elif nargs == "?":
            index += min(following, 1)
        elif nargs in ("+", "*"):
            if nargs == "+" and following < 1:
                return None
            index += following
        elif nargs != 0:
            return None
    return unknown
