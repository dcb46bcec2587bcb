"""Loading a recipe: a flat YAML file plus `--key value` overrides → a checked `Recipe` (recipe/schema.py).

One `HfArgumentParser` serves the YAML file and the command line's overrides, which win. On top of it, only what it
lacks: every YAML value is type-checked against its field (pydantic), an unknown key gets a "did you mean", a
credential is refused, and each error is a `RecipeError` naming the file (or the command line), the key and what is
allowed, before any model or dataset loads (cross-key checks: recipe/checks.py). The keys themselves are cached per
installed version set (recipe/keys.py): with that cache warm, an unknown key is refused before trl and torch load.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

import qlora_pipeline.recipe.keys as key_cache
from qlora_pipeline.errors import RecipeError
from qlora_pipeline.recipe.checks import adapt_to_hardware, check_combinations, cuda_available, failer, settle_batch
from qlora_pipeline.recipe.launcher import adapt as adapt_to_launcher
from qlora_pipeline.recipe.schema import AUTO_KEYS, SECRET_FIELDS, Recipe, parser_classes


def _make_parser(classes, source: str, override_keys: set[str]):
    import re

    from transformers import HfArgumentParser

    class RecipeParser(HfArgumentParser):
        # argparse prints usage and exits on a bad option; we want one line naming the option and where it came
        # from (a YAML value reaches argparse as a default and is converted like a typed one).
        def error(self, message):
            match = re.search(r"argument --([\w-]+)", message)
            key = match.group(1).replace("-", "_") if match else None
            where = source if key and key not in override_keys else "command line"
            raise RecipeError(f"{where}: {message}")

    return RecipeParser(classes)


def _field_types(classes) -> dict[str, tuple[Any, dict]]:
    types = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                types[f.name] = (hints.get(f.name, Any), dict(f.metadata))
    return types


def _check_type(source: str, key: str, value: Any, hint: Any, metadata: dict) -> None:
    """Validate a YAML value against its field's annotation with pydantic (argparse only checks CLI strings)."""
    from pydantic import TypeAdapter, ValidationError

    if value is None:
        return
    try:
        adapter = TypeAdapter(hint)
    except Exception:  # an annotation pydantic cannot express: the dataclass's own checks still run
        return
    try:
        adapter.validate_python(value)
    except ValidationError:
        raise RecipeError(f"{source}: key '{key}' must be {_describe(hint)}, got {value!r}") from None
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise RecipeError(f"{source}: key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")


def _is_list_type(hint: Any) -> bool:
    candidates = [hint, *typing.get_args(hint)]
    return any(typing.get_origin(c) in (list, tuple) for c in candidates)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if args and origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe file plus command-line overrides. Raises RecipeError; loads no model."""
    source = str(path)
    values = _read_yaml(source)
    override_keys = _override_keys(overrides)
    cached = key_cache.load()
    if cached is not None:  # these versions' keys are known: refuse an unknown one before trl and torch load
        _check_keys(source, values, override_keys, cached.fields)
        option = key_cache.first_unknown_option(overrides or [], cached.options)
        if option:
            raise _unknown_option(option)
    overrides = list(overrides or [])
    file_batch = _file_batch(values)
    auto = _take_auto(values, overrides, override_keys)
    classes = parser_classes()
    types = _field_types(classes)
    parser = _make_parser(classes, source, override_keys)
    if cached is None:
        key_cache.store(types, parser)

    _check_keys(source, values, override_keys, types)
    for key, value in values.items():
        if key in override_keys:
            continue  # the command line's value replaces it, and argparse checks that one
        if isinstance(value, str) and _is_list_type(types[key][0]):
            values[key] = value = [value]  # `lora_target_modules: all-linear` means the one-item list
        _check_type(source, key, value, *types[key])

    parser.set_defaults(**{k: v for k, v in values.items() if k not in override_keys})
    namespace, unknown = parser.parse_known_args(list(overrides or []))
    if unknown:
        raise _unknown_option(unknown[0])
    merged = vars(namespace)
    origin = {key: ("command line" if key in override_keys else source) for key in merged}

    notes = check_combinations(merged, origin)
    settle_batch(merged, auto, file_batch, set(values), override_keys, fail=failer(origin))
    given = dict(merged)
    notes += adapt_to_hardware(merged)
    before_launcher = dict(merged)
    notes += adapt_to_launcher(merged, cuda=cuda_available(), fail=failer(origin))
    launcher_changes = {key: before_launcher[key] for key in merged if merged[key] != before_launcher[key]}
    as_written = {key: given[key] for key in merged if merged[key] != given[key]}
    publish = bool(merged["push_to_hub"])
    merged["push_to_hub"] = False

    objects = []
    for cls in classes:
        kwargs = {f.name: merged[f.name] for f in dataclasses.fields(cls) if f.init and f.name in merged}
        try:
            objects.append(cls(**kwargs))
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{source}: {exc}") from None
    model_args, data_args, task_args, training_args, export_args, tracking_args, resource_args = objects
    return Recipe(
        model=model_args,
        data=data_args,
        task=task_args,
        training=training_args,
        export=export_args,
        tracking=tracking_args,
        resources=resource_args,
        auto=tuple(sorted(auto)),
        source=source,
        notes=notes,
        publish=publish,
        launcher_changes=launcher_changes,
        as_written=as_written,
    )


def _file_batch(values: dict[str, Any]) -> int | None:
    """The recipe file's rows per optimizer step (batch x accumulation), where it gives a batch number."""
    batch = values.get("per_device_train_batch_size")
    steps = values.get("gradient_accumulation_steps", 1)
    if isinstance(batch, int) and not isinstance(batch, bool) and isinstance(steps, int) and batch > 0 and steps > 0:
        return batch * steps
    return None


def _take_auto(values: dict[str, Any], overrides: list[str], override_keys: set[str]) -> set[str]:
    """The AUTO_KEYS given as `auto` (in the file, unless the command line sets the key, or on the command line:
    `--key auto`, `--key=auto`, dashes or underscores), each replaced in place by its placeholder so the parser sees a
    value of its type. Returns them by the name Recipe.auto uses (gradient_checkpointing for either checkpointing
    name)."""

    def canonical(key: str) -> str:
        return "gradient_checkpointing" if key == "activation_checkpointing" else key

    overridden = {canonical(key) for key in override_keys}
    found = set()
    for key, placeholder in AUTO_KEYS.items():
        if isinstance(values.get(key), str) and values[key].strip().lower() == "auto":
            values[key] = placeholder
            if canonical(key) not in overridden:
                found.add(canonical(key))
    for index, token in enumerate(overrides):
        name, equals, value = token.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key not in AUTO_KEYS:
            continue
        if equals and value.strip().lower() == "auto":
            overrides[index] = f"{name}={AUTO_KEYS[key]}"
            found.add(canonical(key))
        elif not equals and index + 1 < len(overrides) and overrides[index + 1].strip().lower() == "auto":
            overrides[index + 1] = str(AUTO_KEYS[key])
            found.add(canonical(key))
    return found


def _check_keys(source: str, values: dict[str, Any], override_keys: set[str], known) -> None:
    """Unknown keys in the file, then credentials in the file or on the command line. `known`: every key."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{source}: unknown key '{key}'{hint}; 'qlora-pipeline keys' lists them all")
    for key in SECRET_FIELDS:
        if values.get(key):
            raise RecipeError(f"{source}: key '{key}' holds a credential; set HF_TOKEN in the environment instead")
    for key in SECRET_FIELDS:
        if key in override_keys:  # a token on the command line ends up in shell history, ps and trackers' metadata
            raise RecipeError(f"command line: --{key} holds a credential; set HF_TOKEN in the environment instead")


def _unknown_option(token: str) -> RecipeError:
    return RecipeError(f"command line: unknown option {token!r}; 'qlora-pipeline keys' lists the keys")


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if values is None:
        raise RecipeError(f"{source}: the recipe is empty")
    if not isinstance(values, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of key: value, got {type(values).__name__}")
    return values


def _override_keys(overrides: list[str] | None) -> set[str]:
    keys = set()
    for token in overrides or []:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            keys.add(key[3:] if key.startswith("no_") else key)
    return keys
