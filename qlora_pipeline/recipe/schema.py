"""The recipe's schema: seven dataclasses whose fields are the recipe's keys, and `Recipe`, the parsed whole.

- `ModelArguments`: TRL's `ModelConfig` (model id, dtype, 4/8-bit, LoRA) plus the few fields it lacks;
- `DataArguments`: where the rows come from (one dataset, or a mixture of sources: recipe/mixture.py), their
  columns, the prompt template, the split, and what the data checks do with duplicates and train/eval overlap;
- `TaskArguments`: which task (causal LM, extractive QA, classification, seq2seq; qlora_pipeline/tasks/) and its
  settings;
- TRL's `SFTConfig`: everything the trainer takes;
- `ExportArguments`: how the adapter is merged and checked for export (`qlora-pipeline merge`);
- `TrackingArguments`: the Weights & Biases run (project, entity, group, tags, notes, artifacts);
- `ResourceArguments`: the memory the run may use, and the batch `per_device_train_batch_size: auto` keeps.

Two of SFTConfig's keys also take `auto` (`AUTO_KEYS`): the planner chooses them at the start of training
(qlora_pipeline/plan/choose.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.recipe.mixture import parse_mixture

# Fields that hold credentials: they must come from the environment, never from a recipe or a saved config.
SECRET_FIELDS = ("hub_token",)


# SFTConfig keys a recipe may set to `auto`, and the value each holds until the planner chooses (`Recipe.auto`).
# activation_checkpointing is transformers 5's name for gradient_checkpointing.
AUTO_KEYS = {"gradient_checkpointing": True, "activation_checkpointing": True, "per_device_train_batch_size": 1}


# Fields the pipeline always sets itself (see adapt_to_hardware); a saved recipe leaves them out.
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
    dataset_mixture: list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "causal_lm: several sources instead of dataset_name, each a mapping: path (as dataset_name), "
            "name, config, split, column mapping, template, weight (share of the training examples) or rows / "
            "fraction (with replace), streaming. Held-out rows are drawn from each source. See recipe/mixture.py."
        },
    )
    mixture_stopping: Literal["first_exhausted", "all_exhausted"] = field(
        default="first_exhausted",
        metadata={
            "help": "A weighted mixture ends when its first source runs out (first_exhausted: no row used twice; "
            "the other sources' rows left are counted as unused) or when every source has been used whole "
            "(all_exhausted: smaller sources repeat)."
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
    on_duplicate_rows: Literal["warn", "drop", "error"] = field(
        default="warn",
        metadata={
            "help": "Training rows identical to an earlier one (instruction, input and output, whitespace "
            "normalised): listed and kept (warn), left out (drop, listed with the skipped rows), or an error."
        },
    )
    on_eval_overlap: Literal["error", "warn", "drop"] = field(
        default="error",
        metadata={
            "help": "Training rows with the same instruction and input as a held-out row make every eval figure "
            "optimistic: an error listing them (default), a warning, or left out of training (drop)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N eval rows (of each eval file, where several)."}
    )

    @property
    def sources(self) -> list:
        """dataset_mixture's sources (recipe/mixture.MixtureSource), defaults filled in; [] with dataset_name."""
        if self.dataset_mixture is None:
            return []

        def fail(key: str, message: str):
            raise RecipeError(f"recipe: key '{key}': {message}")

        return parse_mixture(self.dataset_mixture, dataclasses.asdict(self), fail)

    @property
    def dataset_paths(self) -> list[str]:
        """Where the training rows come from: dataset_name, or each mixture source's path."""
        return [source.path for source in self.sources] if self.dataset_mixture is not None else [self.dataset_name]

    @property
    def data_label(self) -> str:
        """What the training rows are, in a message or a report: dataset_name, or the mixture's source names."""
        if self.dataset_mixture is None:
            return str(self.dataset_name)
        return " + ".join(source.name for source in self.sources)

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
    gguf_quant_types: list[str] | None = field(
        default=None,
        metadata={
            "help": "GGUF files for llama.cpp and Ollama that `merge` also writes (f32, f16, bf16, q8_0, q6_k, "
            "q5_k_m, q4_k_m, ...), each checked by llama.cpp; also the default of export-gguf --quant (else f16)."
        },
    )
    gguf_output_dir: str | None = field(
        default=None, metadata={"help": "Where the GGUF files and the Modelfile go; default: the run folder's gguf/."}
    )
    gguf_max_ppl_increase: float = field(
        default=0.01,
        metadata={
            "help": "A 16- or 32-bit GGUF file fails (nothing is written) if llama.cpp's perplexity of the reference "
            "answers exceeds the merged export's by more than this share."
        },
    )
    gguf_min_top1_agreement: float = field(
        default=0.98,
        metadata={
            "help": "A 16- or 32-bit GGUF file fails if llama.cpp's top token agrees with the export's at "
            "fewer than this share of positions."
        },
    )
    gguf_quantized_max_ppl_increase: float = field(
        default=0.10, metadata={"help": "gguf_max_ppl_increase for quantized files (q8_0, q4_k_m, ...)."}
    )
    gguf_quantized_min_top1_agreement: float = field(
        default=0.70, metadata={"help": "gguf_min_top1_agreement for quantized files."}
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


@dataclass
class ResourceArguments:
    """The memory a run may use, against which `auto` settings are chosen, and the batch they keep."""

    memory_budget: str | None = field(
        default=None,
        metadata={
            "help": "Memory one training process may use, e.g. 20GiB or 16000MiB: `auto` settings choose the fastest "
            "combination the memory plan fits in it. Default: the device's free memory (a CPU's shared by the "
            "processes on it) less 10%."
        },
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per optimizer step on each process: per_device_train_batch_size x "
            "gradient_accumulation_steps. Needed by per_device_train_batch_size: auto (the planner splits it); with a "
            "number there, gradient_accumulation_steps follows from it."
        },
    )


def model_arguments_class():
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
    """A parsed, validated recipe: the seven config objects and where they came from."""

    model: Any  # ModelArguments
    data: DataArguments
    training: Any  # trl.SFTConfig
    export: ExportArguments
    tracking: TrackingArguments
    source: str
    task: TaskArguments = field(default_factory=TaskArguments)
    resources: ResourceArguments = field(default_factory=ResourceArguments)
    # The AUTO_KEYS the recipe set to `auto` (gradient_checkpointing for either name): their values in `training` are
    # placeholders until plan.choose settles them at the start of training.
    auto: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    # push_to_hub: true means train → merge → publish, done by the pipeline once at the end. The trainer's own
    # push_to_hub is kept off: it would create the repo before training and push every checkpoint.
    publish: bool = False
    # Values launcher.adapt changed for this launcher (e.g. ddp_backend under DeepSpeed on CPU), as the recipe had
    # them: a saved recipe holds these, so it runs again under any launcher.
    launcher_changes: dict[str, Any] = field(default_factory=dict)
    # Every value load_recipe changed for this machine and launcher (fp16 off without CUDA, …), as the recipe file and
    # command line gave it: what a plan for another machine starts from.
    as_written: dict[str, Any] = field(default_factory=dict)

    def written(self, key: str) -> Any:
        """A recipe value as given, before load_recipe adapted it to this machine and launcher."""
        if key in self.as_written:
            return self.as_written[key]
        for part in (self.model, self.data, self.task, self.training, self.export, self.tracking, self.resources):
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
        values.update(_plain(dataclasses.asdict(self.resources)))
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
            values = self.to_dict()
            for key in self.auto:  # `auto` stays `auto`: the recipe chooses again wherever it is reloaded
                values[key] = "auto"
                if key == "gradient_checkpointing" and "activation_checkpointing" in values:
                    values["activation_checkpointing"] = "auto"
                if key == "per_device_train_batch_size":  # it follows from effective_batch_size again
                    values.pop("gradient_accumulation_steps", None)
            yaml.safe_dump(values, handle, sort_keys=False, allow_unicode=True)


def _plain(value):
    """Turn enums and tuples into what YAML writes plainly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def parser_classes():
    from trl import SFTConfig

    return (
        model_arguments_class(),
        DataArguments,
        TaskArguments,
        SFTConfig,
        ExportArguments,
        TrackingArguments,
        ResourceArguments,
    )
