"""Model cards: the README.md of a merged export or a LoRA adapter, rendered from card_template.md with
huggingface_hub's `ModelCard.from_template`.

The template holds the prose; this module gathers the facts it shows: valid YAML front matter (base model,
datasets, library, pipeline tag, tags, license, model-index), what the model is, how to load it, the exact prompt
format with one rendered example, how it was trained (hyperparameters, LoRA, data, results) and how faithful the
merge is (when a fidelity report is given).

Cards are cheap to build: no model, tokenizer or dataset is loaded, and nothing is fetched unless the base model is
a Hub id whose license is wanted (a failure there is silent). A card never holds a credential or an absolute local
path (names.py: credential values are redacted, local paths shown by their last component); card_check.py checks
the same offline on a card already written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from huggingface_hub import ModelCard, ModelCardData

from qlora_pipeline.data import samples
from qlora_pipeline.outputs import sources_table
from qlora_pipeline.outputs.evaluation_table import is_count
from qlora_pipeline.outputs.names import ABSOLUTE_PATH, DATA_FILE_SUFFIXES, display_name, is_hub_id, scrub

if TYPE_CHECKING:
    from qlora_pipeline.recipe import Recipe

TEMPLATE = Path(__file__).with_name("card_template.md")
PLACEHOLDER_REPO = "OWNER/NAME"

# (label, recipe key) rows of the hyperparameter table, in order; keys a recipe lacks are skipped.
TRAINING_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "max_length",
    "packing",
    "packing_strategy",
    "completion_only_loss",
    "gradient_checkpointing",
    "seed",
    "dtype",
    "fp16",
    "bf16",
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "bnb_4bit_compute_dtype",
)
LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_bias",
    "lora_modules_to_save",
    "use_dora",
    "use_rslora",
)

# Per task: the Hub pipeline tag, the transformers Auto class, peft's AutoPeft class and the trainer that ran.
TASK_CARDS = {
    "causal_lm": ("text-generation", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "TRL's `SFTTrainer`"),
    "extractive_qa": (
        "question-answering",
        "AutoModelForQuestionAnswering",
        "AutoPeftModelForQuestionAnswering",
        "transformers' `Trainer`",
    ),
    "classification": (
        "text-classification",
        "AutoModelForSequenceClassification",
        "AutoPeftModelForSequenceClassification",
        "transformers' `Trainer`",
    ),
    "seq2seq": (
        "text2text-generation",
        "AutoModelForSeq2SeqLM",
        "AutoPeftModelForSeq2SeqLM",
        "transformers' `Seq2SeqTrainer`",
    ),
}
TASK_EXAMPLES = {
    "extractive_qa": 'pipe(question="What does insulin do?", context="Insulin lowers the level of glucose in blood.")',
    "classification": 'pipe("What is the derivative of x squared?")',
    "seq2seq": 'pipe("question: What does insulin do? context: Insulin lowers the level of glucose in blood.")',
}
# The illustrative exchange rendered in the prompt-format section.
EXAMPLE_INSTRUCTION = "Classify the sentiment of the sentence as positive or negative."
EXAMPLE_INPUT = "The new treatment worked well for most patients."
EXAMPLE_OUTPUT = "positive"


def _license_of_readme(path: Path) -> str | None:
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    license_ = card.data.get("license")
    if isinstance(license_, list):
        license_ = license_[0] if license_ else None
    return str(license_) if license_ else None


def base_license(recipe: Recipe) -> str | None:
    """The base model's license from its card: a local (or embedded) folder's README.md, or the Hub card of a Hub
    id (None when offline or not found). Never raises."""
    name = recipe.model.model_name_or_path
    try:
        if samples.is_embedded(name):
            from qlora_pipeline.model.loading import resolve_model_path

            return _license_of_readme(Path(resolve_model_path(name)) / "README.md")
        local = Path(name).expanduser()
        if local.exists():
            return _license_of_readme(local / "README.md" if local.is_dir() else local)
        if is_hub_id(name):
            card = ModelCard.load(name)
            license_ = card.data.get("license")
            if isinstance(license_, list):
                license_ = license_[0] if license_ else None
            return str(license_) if license_ else None
    except Exception:  # noqa: BLE001 -- offline, gated, missing, malformed: the card just has no license
        return None
    return None


def build_card(
    kind: Literal["merged", "adapter"],
    recipe: Recipe,
    summary: dict | None,
    fidelity: dict | None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of a merged export ("merged") or a LoRA adapter ("adapter") trained from `recipe`.

    `summary` is the run's summary.json (or None), `fidelity` the merge's fidelity.json (or None); `repo_id` is
    used in the loading snippets (else OWNER/NAME). Loads no model; reads the base model's card for its license.
    """
    from qlora_pipeline import __version__

    if kind not in ("merged", "adapter"):
        raise ValueError(f"kind must be 'merged' or 'adapter', got {kind!r}")
    values = recipe.to_dict()
    model_name = recipe.model.model_name_or_path
    dataset_paths = recipe.data.dataset_paths
    task = recipe.task.task
    pipeline_tag, auto_class, peft_class, trainer = TASK_CARDS[task]
    base = display_name(model_name)
    results = _eval_results(recipe, summary, fidelity, kind)
    data = ModelCardData(
        base_model=model_name if is_hub_id(model_name) else None,
        datasets=[path for path in dataset_paths if is_hub_id(path, DATA_FILE_SUFFIXES)] or None,
        library_name="transformers" if kind == "merged" else "peft",
        pipeline_tag=pipeline_tag,
        tags=_tags(kind, recipe, values),
        license=recipe.export.hub_license or base_license(recipe),
        model_name=(repo_id.split("/")[-1] if repo_id else base) if results else None,
        eval_results=results or None,
    )
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        kind=kind,
        task=task,
        title=repo_id.split("/")[-1] if repo_id else f"{base} fine-tuned with qlora-pipeline",
        base=base,
        method=training_method(recipe),
        use_peft=bool(values.get("use_peft")),
        base_reference=base_reference(recipe),
        dataset=" + ".join(display_name(path) for path in dataset_paths),
        template_name=recipe.data.template,
        version=__version__,
        trainer=trainer,
        auto_class=auto_class,
        peft_class=peft_class,
        **_usage(recipe, repo_id or PLACEHOLDER_REPO, summary),
        prompt=_prompt_example(recipe),
        table=_table,
        training=_training_rows(values, summary),
        lora=[(key, values[key]) for key in LORA_KEYS if key in values] if values.get("use_peft") else None,
        data_lines=_data_lines(recipe),
        data_splits=_data_splits(summary),
        results=_result_rows(summary),
        fidelity=_fidelity_rows(fidelity) if fidelity else None,
        fidelity_examples=_fidelity_examples(fidelity) if fidelity else None,
        versions=_framework_versions(),
    )
    return ModelCard(scrub(str(card).rstrip("\n") + "\n"))


def _tags(kind: str, recipe: Recipe, values: dict) -> list[str]:
    task = recipe.task.task
    tags = ["qlora-pipeline"]
    if values.get("use_peft"):
        tags.append("lora")
    if values.get("load_in_4bit"):
        tags.append("qlora")
    tags += ["sft", "trl"] if task == "causal_lm" else [task.replace("_", "-")]
    if kind == "merged":
        tags.append("merged")
    return tags


def training_method(recipe: Recipe) -> str:
    return "QLoRA (LoRA on a 4-bit NF4 base)" if recipe.model.load_in_4bit else "LoRA"


def base_reference(recipe: Recipe) -> str:
    name = recipe.model.model_name_or_path
    if is_hub_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    if samples.is_embedded(name):
        return f"`{name}` (a tiny random-weight model built by qlora-pipeline for its offline demo)"
    return f"`{display_name(name)}` (a local model folder)"


def _usage(recipe: Recipe, repo: str, summary: dict | None) -> dict:
    """What the how-to-use snippets need: the repo, the stop token, the base as the adapter was trained on it."""
    task, classes = recipe.task.task, (summary or {}).get("classes")
    labels = ""
    if task != "causal_lm" and classes:
        # The adapter folder holds no config.json: a classifier's head size and class names are given again.
        labels = f", num_labels={len(classes)}, id2label={dict(enumerate(classes))!r}"
        labels += f", label2id={ {name: i for i, name in enumerate(classes)}!r}"
    template = _template(recipe)
    end_token = template.end_token if template is not None else None
    name = recipe.model.model_name_or_path
    base_id = name if is_hub_id(name) else None
    not_on_hub = None
    if base_id is None:
        not_on_hub = (
            f"`qlora_pipeline.loading.resolve_model_path({display_name(name)!r})` builds it and returns its folder"
            if samples.is_embedded(name)
            else "use your copy of it"
        )
    return {
        "repo": repo,
        "labels": labels,
        "task_example": TASK_EXAMPLES.get(task),
        "example_instruction": EXAMPLE_INSTRUCTION,
        "stop": f', eos_token_id=tokenizer.convert_tokens_to_ids("{end_token}")' if end_token else "",
        "four_bit": bool(recipe.model.load_in_4bit),
        "quant_type": recipe.model.bnb_4bit_quant_type,
        "double_quant": bool(recipe.model.use_bnb_nested_quant),
        "compute_dtype": recipe.model.bnb_4bit_compute_dtype or "bfloat16",
        "base_literal": base_id or "PATH/TO/BASE_MODEL",
        "base_not_on_hub": not_on_hub,
    }


def _template(recipe: Recipe):
    from qlora_pipeline.data.templates import get_template
    from qlora_pipeline.errors import PipelineError

    try:
        return get_template(recipe.data.template)
    except PipelineError:
        return None


def _local_chat_template(recipe: Recipe) -> str | None:
    """The base model's own chat template, if the base is a local or embedded folder (template: tokenizer)."""
    name = recipe.model.tokenizer_name_or_path or recipe.model.model_name_or_path
    try:
        if samples.is_embedded(name):
            from qlora_pipeline.model.loading import resolve_model_path

            name = resolve_model_path(name)
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return None
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        return template if isinstance(template, str) else None
    except Exception:  # noqa: BLE001 -- a broken local tokenizer config: no example
        return None


def render_example(chat_template: str, messages: list[dict], add_generation_prompt: bool, eos_token: str) -> str:
    """Render a chat template as transformers does, without a tokenizer (BOS shown as `<s>`)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token=eos_token
    )


def _prompt_example(recipe: Recipe) -> dict | None:
    """The causal LM's prompt format: its template and one example rendered as training rendered it."""
    template = _template(recipe) if recipe.task.task == "causal_lm" else None
    if template is None:
        return None
    chat_template = template.chat_template or _local_chat_template(recipe)
    facts: dict[str, Any] = {"template": template.name, "separator": json.dumps(template.input_separator)}
    if chat_template is None:
        return {**facts, "own_template": True}
    end_token = template.end_token or "</s>"
    messages = template.messages(EXAMPLE_INSTRUCTION, EXAMPLE_INPUT)
    try:
        prompt = render_example(chat_template, messages, True, end_token)
        full = render_example(
            chat_template, template.messages(EXAMPLE_INSTRUCTION, EXAMPLE_INPUT, EXAMPLE_OUTPUT), False, end_token
        )
    except Exception as exc:  # noqa: BLE001 -- any template error: the card says so
        return {**facts, "error": type(exc).__name__}
    completion = full[len(prompt) :] if full.startswith(prompt) else None
    return {
        **facts,
        "end_token": template.end_token,
        "prompt": prompt,
        "full": full,
        "completion": None if completion is None else json.dumps(completion),
    }


def _format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value) if value else "–"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items()) if value else "–"
    text = str(value)
    if ABSOLUTE_PATH.search(text):
        text = display_name(text)
    return text


def _cell(value: Any, limit: int = 0) -> str:
    """A value made safe for a markdown table cell."""
    text = value if isinstance(value, str) else _format_value(value)
    if limit and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r", "").replace("\n", "<br>")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("key", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _planner_chosen(summary: dict | None) -> set[str]:
    """The training keys the planner set for the recipe's `auto` ones (the accumulation follows the batch)."""
    auto = set(((summary or {}).get("auto_settings") or {}).get("auto") or ())
    if "per_device_train_batch_size" in auto:
        auto.add("gradient_accumulation_steps")
    return auto


def _training_rows(values: dict, summary: dict | None) -> list[tuple[str, Any]]:
    four_bit_keys = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_compute_dtype")
    chosen = _planner_chosen(summary)
    rows = []
    for key in TRAINING_KEYS:
        if key not in values:
            continue
        value = values[key]
        skip = (
            (key == "max_steps" and (value is None or value <= 0))
            or (key == "warmup_ratio" and not value)
            or (key in four_bit_keys and not values.get("load_in_4bit"))
            or (key == "packing_strategy" and not values.get("packing"))
        )
        if key == "bnb_4bit_compute_dtype" and value is None:
            value = "follows fp16/bf16 (float32 without)"
        if key in chosen:
            value = f"{_cell(value)} (auto: chosen by the memory planner)"
        if not skip:
            rows.append((key, value))
    if summary and summary.get("processes"):
        processes = summary["processes"]
        effective = (
            (values.get("per_device_train_batch_size") or 0)
            * processes
            * (values.get("gradient_accumulation_steps") or 1)
        )
        unit = "packed rows" if values.get("packing") else "examples"
        rows.append(("processes", processes))
        rows.append(("effective batch", f"{effective} {unit} per optimizer step"))
    return rows


def _data_lines(recipe: Recipe) -> list[tuple[str, str]]:
    data = recipe.data
    if data.dataset_mixture is not None:
        lines = [(f"Source {source.name}", _describe_source(source)) for source in data.sources]
        weighted = data.sources[0].weight is not None
        how = f"drawn by weight (interleaved, {data.mixture_stopping})" if weighted else "concatenated and shuffled"
        lines.append(("Mixture", how + ("" if data.eval_files else "; eval rows held out from each source")))
    else:
        lines = [("Dataset", display_name(data.dataset_name))]
        if data.dataset_config:
            lines.append(("Configuration", data.dataset_config))
        lines.append(("Split", data.dataset_split))
    if data.eval_files:
        lines.append(("Eval data", ", ".join(display_name(f) for f in data.eval_files)))
    else:
        lines.append(("Held out for eval", _format_value(data.eval_split_size)))
    columns = [data.instruction_column, data.input_column, data.output_column]
    lines.append(("Columns", f"{', '.join(f'`{c}`' for c in columns if c)} (instruction, input, output)"))
    lines.append(("Examples over max_length", data.overlong))
    return lines


def _describe_source(source) -> str:
    """A mixture source in one line: where, which split, how much of it."""
    parts = [f"split {source.split}"] + ([f"config {source.config}"] if source.config else [])
    if source.weight is not None:
        parts.append(f"weight {source.weight:g}")
    if source.rows is not None:
        parts.append(f"{source.rows} rows" + (" drawn with replacement" if source.replace else ""))
    if source.fraction is not None:
        parts.append(f"{source.fraction:g} of its rows" + (" drawn with replacement" if source.replace else ""))
    if source.streaming:
        parts.append("streamed")
    return f"{display_name(source.path)} ({', '.join(parts)})"


def _data_splits(summary: dict | None) -> str | None:
    """The token statistics of the train and eval splits, as a markdown table; a mixture's per-source table after."""
    splits = (summary or {}).get("data") or {}
    stats = [(name, splits.get(name)) for name in ("train", "eval") if splits.get(name)]
    if not stats:
        return None
    keys = ("rows", "examples", "tokens", "mean", "max", "dropped", "truncated")
    lines = ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(split.get(key)) for key in keys) + " |" for name, split in stats]
    by_source = sources_table.markdown_table(splits)
    if by_source:
        lines += ["", "Per source (rows read = train + eval + skipped + unused; share: of the training examples):", ""]
        lines += by_source
    return "\n".join(lines)


def _result_rows(summary: dict | None) -> list[tuple[str, Any]] | None:
    if not summary:
        return None

    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    rows = [
        ("optimizer steps", summary.get("global_step")),
        ("epochs", summary.get("epochs")),
        ("tokens seen (non-padding)", summary.get("tokens_seen")),
        ("train loss", loss(summary.get("train_loss"))),
        ("eval loss before training", loss(summary.get("eval_loss_before"))),
        ("eval loss after training", loss(summary.get("eval_loss_after"))),
        ("train runtime", f"{summary['train_runtime_s']:.0f} s" if summary.get("train_runtime_s") else None),
    ]
    metrics = summary.get("task_metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for name, value in after.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not is_count(name):
            earlier = before.get(name)
            rows.append((f"{name} (held out)", f"{_number(earlier)} before → {_number(value)} after"))
    return [(k, v) for k, v in rows if v is not None]


def _eval_results(recipe: Recipe, summary: dict | None, fidelity: dict | None, kind: str) -> list:
    """`model-index` entries for a generation metric's held-out scores, so the Hub shows them: the trained adapter's
    (summary.json), or for a merged export the export's own (fidelity.json). Counts are left out."""
    from huggingface_hub import EvalResult

    if recipe.task.generation_metric == "none":
        return []
    scores = ((fidelity or {}).get("task_metrics") or {}).get("export") if kind == "merged" else None
    scores = scores or ((summary or {}).get("task_metrics") or {}).get("after") or {}
    dataset = " + ".join(display_name(path) for path in recipe.data.dataset_paths)
    results = []
    for name, value in scores.items():
        subtask, _, metric = name.rpartition("/")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or is_count(name) or metric == "score":
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=f"{dataset} held out" + (f": {subtask}" if subtask else ""),
                dataset_config=subtask or None,  # the Hub groups results by type and config: one group a subtask
                metric_type=metric,
                metric_name=f"{subtask} {metric}".strip(),
                metric_value=value,
            )
        )
    return results


def _number(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def _fidelity_number(value, spec=".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _fidelity_rows(fidelity: dict) -> list[tuple[str, Any]]:
    number = _fidelity_number
    thresholds = fidelity.get("thresholds") or {}
    increase = fidelity.get("perplexity_increase")
    prompts = fidelity.get("prompts")
    rows = [
        ("merged into", fidelity.get("base_mode")),
        ("merged dtype", fidelity.get("dtype")),
        ("compared with", fidelity.get("reference")),
        ("prompts", prompts),
        ("max abs logit difference", number(fidelity.get("max_abs_logit_diff"), ".3g")),
        ("mean abs logit difference", number(fidelity.get("mean_abs_logit_diff"), ".3g")),
        ("perplexity, reference", number(fidelity.get("perplexity_reference"))),
        ("perplexity, merged", number(fidelity.get("perplexity_merged"))),
        ("perplexity increase", "n/a" if increase is None else f"{increase * 100:.3f}%"),
        (
            "identical greedy generations",
            None if fidelity.get("greedy_identical") is None else f"{fidelity['greedy_identical']} of {prompts}",
        ),
        (
            "limits",
            ", ".join(f"{key} {'none' if value is None else format(value, 'g')}" for key, value in thresholds.items())
            or None,
        ),
        ("passed", fidelity.get("passed")),
    ]
    task_metrics = fidelity.get("task_metrics") or {}
    for name in task_metrics.get("changes") or {}:
        trained, export = task_metrics["reference"].get(name), task_metrics["export"].get(name)
        rows.insert(-1, (f"{name} (task metric)", f"{_number(trained)} trained → {_number(export)} export"))
    if task_metrics.get("compared"):
        same = f"{task_metrics['identical_predictions']} of {task_metrics['compared']}"
        rows.insert(-1, ("identical task answers", same))
    return [(k, v) for k, v in rows if v is not None]


def _fidelity_examples(fidelity: dict) -> list[list[str]]:
    """The first three greedy generations, trained beside merged, as escaped table cells."""
    examples = [e for e in fidelity.get("examples") or [] if isinstance(e, dict)][:3]
    return [
        [
            _cell(str(example.get("prompt", "")), 160),
            _cell(str(example.get("reference_generation", "")), 200),
            _cell(str(example.get("merged_generation", "")), 200),
            _cell(_fidelity_number(example.get("max_abs_logit_diff"), ".3g")),
        ]
        for example in examples
    ]


def _framework_versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    rows = []
    for package in ("transformers", "peft", "trl", "bitsandbytes", "torch", "huggingface_hub"):
        try:
            rows.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return rows
