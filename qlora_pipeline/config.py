"""Recipes: flat YAML files whose keys map one-to-one onto typed config fields.

A recipe fills six dataclasses:
- `ModelArguments`: TRL's `ModelConfig` (model id, dtype, 4/8-bit, LoRA) plus the few fields it lacks;
- `DataArguments`: where the rows come from, their columns, the prompt template, the split;
- `TaskArguments`: which task (causal LM, extractive QA, classification, seq2seq; qlora_pipeline/tasks/) and its
  settings;
- TRL's `SFTConfig`: everything the trainer takes;
- `ExportArguments`: how the adapter is merged and checked for export (`qlora-pipeline merge`);
- `TrackingArguments`: the Weights & Biases run (project, entity, group, tags, notes, artifacts).

One `HfArgumentParser` serves the YAML file and `--key value` overrides from the command line, which win.
Everything a recipe can get wrong is checked here, before any model or dataset is loaded, and reported as a
`RecipeError` naming the file (or the command line), the key and what is allowed. The keys themselves are cached per
installed version set (`recipe_keys.py`): with that cache warm, an unknown key is refused before trl and torch load.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_pipeline import distributed, recipe_keys
from qlora_pipeline.errors import RecipeError

# Attention backends on which packed examples stay isolated: transformers builds a block-diagonal causal mask
# from restarting position_ids (sdpa, eager, flex) or passes the boundaries to a varlen kernel (flash attention).
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Fields that hold credentials: they must come from the environment, never from a recipe or a saved config.
SECRET_FIELDS = ("hub_token",)
# Fields the pipeline always sets itself (see _adapt_to_hardware); a saved recipe leaves them out.
MANAGED_FIELDS = ("include_num_input_tokens_seen", "prediction_loss_only")


@dataclass
class DataArguments:
    """Where the training rows come from and how they become prompt/completion pairs."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, a local .jsonl/.json/.csv/.parquet file or folder, or 'embedded:medtuned-sample'."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "A separate eval dataset (same forms as dataset_name), or a list of them (causal_lm: each scored "
            "under its own name by the generation metric); else a split is held out."
        },
    )
    eval_split_size: float = field(
        default=0.1,
        metadata={"help": "Held-out share of the rows (0 < x < 1) or a row count (>= 1); 0 disables evaluation."},
    )
    instruction_column: str = field(default="instruction", metadata={"help": "Column holding the instruction."})
    input_column: str | None = field(
        default="input", metadata={"help": "Column holding the optional input/context; null if the data has none."}
    )
    output_column: str = field(default="output", metadata={"help": "Column holding the response."})
    template: Literal["starling", "alpaca", "tokenizer"] = field(
        default="starling",
        metadata={"help": "Prompt template: starling (OpenChat), alpaca, or tokenizer (the model's chat_template)."},
    )
    id_column: str | None = field(
        default="id",
        metadata={"help": "Column of row ids, where the data has one: a duplicate id is a bad row. null: no check."},
    )
    overlong: Literal["drop", "truncate", "error"] = field(
        default="drop",
        metadata={
            "help": "Examples longer than max_length: drop them (default: a truncated answer never shows the model "
            "where to stop), truncate them (either way the count is reported), or stop with an error naming the row."
        },
    )
    on_bad_rows: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "A row that cannot be trained on (malformed line, wrong field count, missing/null/empty/non-text "
            "field, duplicate id): stop with an error naming it (default), or skip it, counted and listed in the run "
            "folder's skipped_rows.jsonl. A file that cannot be read at all is an error either way."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N eval rows (of each eval file, where several)."}
    )

    @property
    def eval_files(self) -> list[str]:
        """eval_file as a list: a recipe gives one path or several."""
        return [self.eval_file] if isinstance(self.eval_file, str) else list(self.eval_file or [])


@dataclass
class TaskArguments:
    """Which task the recipe trains (qlora_pipeline/tasks/) and the settings only that task reads."""

    task: Literal["causal_lm", "extractive_qa", "classification", "seq2seq"] = field(
        default="causal_lm",
        metadata={
            "help": "causal_lm (instruction SFT, the main job), extractive_qa (SQuAD-style spans), classification "
            "(text → label) or seq2seq (T5-style generative QA)."
        },
    )
    generation_metric: Literal["none", "symptoms", "medtuned"] = field(
        default="none",
        metadata={
            "help": "causal_lm: a metric on generated answers besides the eval loss. symptoms: symptom-set "
            "precision/recall/F1 for 'What are the symptoms of X?' and top-1 accuracy for symptoms → disease. "
            "medtuned: Llama2-MedTuned tasks scored by family: NER entity F1 (seqeval), single-label accuracy and "
            "F1 (relation extraction, NLI, classification), multi-label F1, per subtask."
        },
    )
    metric_family_column: str | None = field(
        default=None,
        metadata={
            "help": "generation_metric medtuned: a column naming each row's family (ner, single_label, multi_label, "
            "none); empty: recognised from the gold answer and the instruction."
        },
    )
    text_column: str = field(default="text", metadata={"help": "classification: column holding the text."})
    label_column: str = field(default="label", metadata={"help": "classification: column holding the label."})
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "classification: the labels in id order; default: the training rows' labels, sorted."},
    )
    context_column: str = field(
        default="context", metadata={"help": "extractive_qa (flat files) and seq2seq: column holding the context."}
    )
    question_column: str = field(
        default="question", metadata={"help": "extractive_qa (flat files) and seq2seq: column holding the question."}
    )
    answer_column: str = field(default="answer", metadata={"help": "seq2seq: column holding the answer text."})
    answers_column: str = field(
        default="answers",
        metadata={
            "help": "extractive_qa (flat files, as the Hub's squad): column of {text: [...], answer_start: [...]}; "
            "empty lists mark an unanswerable question. SQuAD JSON files need no column names."
        },
    )
    doc_stride: int = field(
        default=128,
        metadata={"help": "extractive_qa: tokens shared by consecutive windows of a context longer than max_length."},
    )
    max_answer_length: int = field(default=30, metadata={"help": "extractive_qa: longest predicted answer, tokens."})
    n_best_size: int = field(
        default=20, metadata={"help": "extractive_qa: start and end candidates considered per window."}
    )
    null_score_diff_threshold: float = field(
        default=0.0,
        metadata={
            "help": "extractive_qa (SQuAD v2): predict 'no answer' when its score beats the best span's by more "
            "than this."
        },
    )
    max_target_length: int = field(
        default=64, metadata={"help": "seq2seq: longest answer in tokens (longer ones are truncated, counted)."}
    )
    eval_max_new_tokens: int = field(
        default=32, metadata={"help": "causal_lm and seq2seq: tokens generated per example for the task metric."}
    )
    metric_max_samples: int | None = field(
        default=None, metadata={"help": "Run the task metric on at most this many held-out rows (default: all)."}
    )
    metric_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "causal_lm generation metrics: rows generated at once (default: per_device_eval_batch_size). "
            "Generation holds a KV cache, not the full-vocabulary logits of every position the eval loss needs, so "
            "it takes larger batches in the same memory."
        },
    )


@dataclass
class ExportArguments:
    """How `qlora-pipeline merge` turns the adapter into a standalone model, and how much drift it accepts."""

    merge_dtype: Literal["auto", "fp16", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "dtype of the merged weights; auto: the base model's own dtype."}
    )
    merge_base_mode: Literal["nf4-roundtrip", "original"] = field(
        default="nf4-roundtrip",
        metadata={
            "help": "Base weights the adapter is merged into: nf4-roundtrip (the NF4-dequantized weights the adapter "
            "was trained against, so the export computes what training saw) or original (the 16-bit weights). "
            "An adapter trained without 4-bit always merges into the original weights."
        },
    )
    merge_max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard of the export."})
    merge_output_dir: str | None = field(
        default=None, metadata={"help": "Where the merged export goes; default: the run folder's merged/."}
    )
    merge_fidelity_prompts: int = field(
        default=8, metadata={"help": "Held-out examples on which the merged model is compared with the trained one."}
    )
    merge_fidelity_max_new_tokens: int = field(
        default=48, metadata={"help": "Greedy generation length in the fidelity comparison."}
    )
    merge_max_ppl_increase: float = field(
        default=0.02,
        metadata={
            "help": "The merge fails, exporting nothing, if the merged model's perplexity on the fidelity examples "
            "exceeds the trained model's by more than this share."
        },
    )
    merge_max_logit_diff: float | None = field(
        default=None,
        metadata={"help": "The merge fails if any logit differs from the trained model's by more than this."},
    )
    merge_max_metric_change: float = field(
        default=1.0,
        metadata={
            "help": "The merge fails, exporting nothing, if a headline task metric of the export (QA, classification, "
            "seq2seq; causal_lm with a generation_metric) differs from the trained model's by more than this many "
            "points."
        },
    )
    hub_license: str | None = field(
        default=None,
        metadata={"help": "License for the model card; default: the base model's, read from its card."},
    )


@dataclass
class TrackingArguments:
    """Where `report_to: wandb` logs. Without an API key the run is logged offline, without asking anything."""

    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project; default: $WANDB_PROJECT, else 'qlora-pipeline'."}
    )
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity (user or team); default: yours."})
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group, to gather related runs."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B tags."})
    wandb_notes: str | None = field(default=None, metadata={"help": "W&B notes: a sentence on what the run tries."})
    wandb_log_artifacts: bool = field(
        default=False,
        metadata={"help": "Log the adapter (and, on merge, the fidelity report) as W&B artifacts."},
    )


def _model_arguments_class():
    """TRL's ModelConfig with the LoRA and bitsandbytes fields it does not have."""
    from trl import ModelConfig

    @dataclass
    class ModelArguments(ModelConfig):
        tokenizer_name_or_path: str | None = field(
            default=None, metadata={"help": "Tokenizer to use, if not the model's own."}
        )
        lora_bias: Literal["none", "all", "lora_only"] = field(
            default="none", metadata={"help": "Which biases LoRA trains."}
        )
        bnb_4bit_compute_dtype: str | None = field(
            default=None,
            metadata={
                "help": "Compute dtype of 4-bit layers; default follows mixed precision (float16/bfloat16), "
                "float32 on CPU.",
                "choices": ["float16", "bfloat16", "float32"],
            },
        )
        prefer_bf16: bool = field(
            default=True,
            metadata={"help": "On a GPU that supports bf16, train in bf16 when the recipe asks for fp16."},
        )

    ModelArguments.__module__ = __name__
    return ModelArguments


@dataclass
class Recipe:
    """A parsed, validated recipe: the six config objects and where they came from."""

    model: Any  # ModelArguments
    data: DataArguments
    training: Any  # trl.SFTConfig
    export: ExportArguments
    tracking: TrackingArguments
    source: str
    task: TaskArguments = field(default_factory=TaskArguments)
    notes: list[str] = field(default_factory=list)
    # push_to_hub: true means train → merge → publish, done by the pipeline once at the end. The trainer's own
    # push_to_hub is kept off: it would create the repo before training and push every checkpoint.
    publish: bool = False
    # Values distributed.adapt changed for this launcher (e.g. ddp_backend under DeepSpeed on CPU), as the recipe had
    # them: a saved recipe holds these, so it runs again under any launcher.
    launcher_changes: dict[str, Any] = field(default_factory=dict)
    # Every value load_recipe changed for this machine and launcher (fp16 off without CUDA, …), as the recipe file and
    # command line gave it: what a plan for another machine starts from.
    as_written: dict[str, Any] = field(default_factory=dict)

    def written(self, key: str) -> Any:
        """A recipe value as given, before load_recipe adapted it to this machine and launcher."""
        if key in self.as_written:
            return self.as_written[key]
        for part in (self.model, self.data, self.task, self.training, self.export, self.tracking):
            if hasattr(part, key):
                return getattr(part, key)
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat, as a recipe file would hold it; credentials are left out."""
        values: dict[str, Any] = {}
        values.update(_plain(dataclasses.asdict(self.model)))
        values.update(_plain(dataclasses.asdict(self.data)))
        values.update(_plain(dataclasses.asdict(self.task)))
        training = self.training.to_dict()
        known = {f.name for f in dataclasses.fields(self.training) if f.init}
        for key in known:
            # to_dict() writes "<PAD_TOKEN>" for every *_token field, as if each held a credential; only
            # hub_token does (and is dropped below), the others are tokenizer tokens.
            if key.endswith("_token") and key not in SECRET_FIELDS:
                training[key] = getattr(self.training, key)
        values.update({k: _plain(v) for k, v in training.items() if k in known})
        values.update(_plain(dataclasses.asdict(self.export)))
        values.update(_plain(dataclasses.asdict(self.tracking)))
        values["push_to_hub"] = self.publish
        values.update(self.launcher_changes)
        for key in SECRET_FIELDS + MANAGED_FIELDS:
            values.pop(key, None)
        return values

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(
                f"# Resolved recipe, from {Path(self.source).name}. Reload with: qlora-pipeline train {path}\n"
            )
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False, allow_unicode=True)


def _plain(value):
    """Turn enums and tuples into what YAML writes plainly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def _parser_classes():
    from trl import SFTConfig

    return _model_arguments_class(), DataArguments, TaskArguments, SFTConfig, ExportArguments, TrackingArguments


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
    cached = recipe_keys.load()
    if cached is not None:  # these versions' keys are known: refuse an unknown one before trl and torch load
        _check_keys(source, values, override_keys, cached.fields)
        option = recipe_keys.first_unknown_option(overrides or [], cached.options)
        if option:
            raise _unknown_option(option)
    classes = _parser_classes()
    types = _field_types(classes)
    parser = _make_parser(classes, source, override_keys)
    if cached is None:
        recipe_keys.store(types, parser)

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

    notes = _check_combinations(merged, origin)
    given = dict(merged)
    notes += _adapt_to_hardware(merged)
    before_launcher = dict(merged)
    notes += distributed.adapt(merged, cuda=_cuda_available(), fail=_failer(origin))
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
    model_args, data_args, task_args, training_args, export_args, tracking_args = objects
    return Recipe(
        model=model_args,
        data=data_args,
        task=task_args,
        training=training_args,
        export=export_args,
        tracking=tracking_args,
        source=source,
        notes=notes,
        publish=publish,
        launcher_changes=launcher_changes,
        as_written=as_written,
    )


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


def _failer(origin: dict[str, str]):
    """fail(key, message): raise a RecipeError naming the key and where its value came from (file or command line)."""

    def fail(key: str, message: str):
        raise RecipeError(f"{origin.get(key, 'recipe')}: key '{key}': {message}")

    return fail


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_combinations(values: dict[str, Any], origin: dict[str, str]) -> list[str]:
    """Reject settings that cannot work together, naming the keys. Returns notes for fixable ones."""
    fail = _failer(origin)
    notes: list[str] = []
    for key in ("model_name_or_path", "dataset_name"):
        if not values.get(key):
            fail(key, "is required")
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        name = values.get(key)
        if name and _looks_like_a_path(name) and not Path(name).expanduser().exists():
            fail(key, f"'{name}' looks like a local folder, and there is none; give the model's folder or a Hub id")
    if values["fp16"] and values["bf16"]:
        fail("bf16", "fp16 and bf16 are both on; choose one")
    if values["load_in_4bit"] and values["load_in_8bit"]:
        fail("load_in_8bit", "load_in_4bit and load_in_8bit are both on; choose one")
    if values["load_in_4bit"] or values["load_in_8bit"]:
        key = "load_in_4bit" if values["load_in_4bit"] else "load_in_8bit"
        try:
            import importlib.util

            missing = importlib.util.find_spec("bitsandbytes") is None
        except ValueError:
            missing = True
        if missing:
            fail(key, "needs the bitsandbytes package, which is not installed (pip install bitsandbytes)")
        if not values["use_peft"]:
            fail(key, "quantized weights cannot be trained directly; set use_peft: true to train LoRA adapters on them")
    if values["learning_rate"] <= 0:
        fail("learning_rate", f"must be positive, got {values['learning_rate']}")
    if values["use_peft"]:
        if values["lora_r"] <= 0:
            fail("lora_r", f"must be a positive integer, got {values['lora_r']}")
        if values["lora_alpha"] <= 0:
            fail("lora_alpha", f"must be positive, got {values['lora_alpha']}")
        if not 0 <= values["lora_dropout"] < 1:
            fail("lora_dropout", f"must be in [0, 1), got {values['lora_dropout']}")
    if values["max_length"] is not None and values["max_length"] < 16:
        fail("max_length", f"must be at least 16 tokens, got {values['max_length']}")
    notes += _check_task(values, fail)
    if values["packing"]:
        if values["max_length"] is None:
            fail("packing", "needs max_length: packed rows are filled up to it")
        if values["packing_strategy"] == "wrapped":
            fail("packing_strategy", "'wrapped' cuts examples across rows so they attend to each other; use 'bfd'")
        attention = values["attn_implementation"] or "sdpa"
        if attention not in PACKING_SAFE_ATTENTION:
            values["packing"] = False
            notes.append(
                f"packing is off: attention '{attention}' cannot keep packed examples apart "
                f"(safe: {', '.join(PACKING_SAFE_ATTENTION)}); batches are padded instead"
            )
    if values["assistant_only_loss"]:
        fail("assistant_only_loss", "is not used here; completion_only_loss masks the prompt for every template")
    if values["push_to_hub"]:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if not values["hub_model_id"]:
            fail("push_to_hub", "needs hub_model_id: OWNER/NAME of the repo to publish the merged model to")
        try:
            validate_repo_id(values["hub_model_id"])
        except HFValidationError:
            fail("hub_model_id", f"{values['hub_model_id']!r} is not a valid repo id (OWNER/NAME)")
        if "/" not in values["hub_model_id"]:
            fail("hub_model_id", f"{values['hub_model_id']!r} needs an owner: OWNER/NAME")
    reporters = values["report_to"] or []
    reporters = [reporters] if isinstance(reporters, str) else list(reporters)
    for name in reporters:
        if name in ("none", "all"):
            continue
        from transformers.integrations import get_available_reporting_integrations

        if name not in get_available_reporting_integrations():
            fail("report_to", f"'{name}' is not installed here (pip install {name})")
    if values["merge_fidelity_prompts"] < 1:
        fail("merge_fidelity_prompts", f"must be at least 1, got {values['merge_fidelity_prompts']}")
    if values["merge_max_ppl_increase"] < 0:
        fail("merge_max_ppl_increase", f"must be 0 or more, got {values['merge_max_ppl_increase']}")
    size = values["eval_split_size"]
    if not (size == 0 or 0 < size < 1 or (size >= 1 and size == int(size))):
        fail("eval_split_size", f"must be 0, a share between 0 and 1, or a whole row count; got {size}")
    return notes


def _check_task(values: dict[str, Any], fail) -> list[str]:
    """The task's peft type and head go into the LoRA settings, so the saved recipe carries them; causal-LM-only
    settings on another task are refused; then the task's own checks."""
    from qlora_pipeline.tasks import get_task

    task = get_task(values["task"])
    if values["task"] != "causal_lm":
        if values["packing"]:
            fail("packing", f"packs causal-LM examples; task '{task.name}' pads each batch to its longest example")
        if values["generation_metric"] != "none":
            fail("generation_metric", f"is a causal_lm setting; task '{task.name}' has its own metric")
        if values["metric_batch_size"] is not None:
            fail(
                "metric_batch_size",
                f"is for causal_lm generation metrics; task '{task.name}' batches by per_device_eval_batch_size",
            )
        if len(values["eval_file"] or []) > 1:
            fail("eval_file", f"takes one file for task '{task.name}'; several are for causal_lm")
    if values["use_peft"]:
        # TRL's default is CAUSAL_LM, so that value cannot tell a recipe's choice from the default.
        if values["lora_task_type"] not in ("CAUSAL_LM", task.peft_task_type):
            fail(
                "lora_task_type",
                f"task '{task.name}' trains {task.peft_task_type} adapters, not {values['lora_task_type']}",
            )
        values["lora_task_type"] = task.peft_task_type
        if not values["lora_modules_to_save"] and task.modules_to_save:
            values["lora_modules_to_save"] = list(task.modules_to_save)
    for key in ("doc_stride", "max_answer_length", "n_best_size", "max_target_length", "eval_max_new_tokens"):
        if values[key] < 1:
            fail(key, f"must be a positive integer, got {values[key]}")
    for key in ("metric_max_samples", "metric_batch_size"):
        if values[key] is not None and values[key] < 1:
            fail(key, f"must be a positive integer, got {values[key]}")
    return task.check(values, fail)


def _looks_like_a_path(name: str) -> bool:
    """A local path rather than a Hub id (OWNER/NAME or NAME): it starts with /, ., ~ or has more than one slash."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _adapt_to_hardware(values: dict[str, Any]) -> list[str]:
    """Settings that depend on the machine the run lands on; each change is reported as a note."""
    import torch

    notes = []
    # The prompt tokens are masked from the pre-tokenized data's completion_mask only if TRL is told to use it.
    if values["completion_only_loss"] is None:
        values["completion_only_loss"] = True
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; recipes may use either name.
    renamed = "activation_checkpointing" in values
    kwargs_key = "activation_checkpointing_kwargs" if renamed else "gradient_checkpointing_kwargs"
    if renamed and values["activation_checkpointing"] is None:
        values["activation_checkpointing"] = values["gradient_checkpointing"]
    # Non-reentrant checkpointing works with DDP and frozen inputs; reentrant breaks both.
    kwargs = dict(values.get(kwargs_key) or values.get("gradient_checkpointing_kwargs") or {})
    kwargs.setdefault("use_reentrant", False)
    values[kwargs_key] = kwargs
    if renamed:  # the old names then mirror the new ones, without a deprecation warning
        values["gradient_checkpointing"] = values["gradient_checkpointing_kwargs"] = None
    values["include_num_input_tokens_seen"] = "non_padding"
    # No metric is computed from evaluation logits: evaluation asks for the loss only, which PipelineSFTTrainer
    # computes on the labelled positions (with logits wanted, TRL recomputes them for every position).
    values["prediction_loss_only"] = True

    if not torch.cuda.is_available():
        if values["fp16"] or values["bf16"]:
            notes.append("no CUDA GPU: fp16/bf16 mixed precision is off, training runs in float32 on the CPU")
        values["fp16"] = values["bf16"] = False
        # Without use_cpu, `accelerate launch --num_processes N` on a CPU box quietly trains N separate rank-0 copies
        # (distributed.adapt turns it off again under DeepSpeed, which runs CPU processes itself).
        values["use_cpu"] = True
        if values["dtype"] in ("float16", "bfloat16"):
            notes.append(f"no CUDA GPU: weights load in float32 rather than {values['dtype']}")
            values["dtype"] = "float32"
        if values["optim"] and "paged" in str(values["optim"]):
            notes.append(f"no CUDA GPU: '{values['optim']}' falls back to plain (non-paged) AdamW on the CPU")
    elif values["fp16"] and values["prefer_bf16"] and torch.cuda.is_bf16_supported():
        notes.append("this GPU supports bf16: training in bf16 instead of fp16 (same memory, no loss scaling)")
        values["fp16"], values["bf16"] = False, True
    return notes
