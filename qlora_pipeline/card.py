"""Model cards: the README.md of a merged export or a LoRA adapter, built with huggingface_hub's ModelCard.

A card holds valid YAML front matter (base model, datasets, library, pipeline tag, tags, license) and a body that
says what the model is, how it was trained (hyperparameters, LoRA, data, eval loss), how faithful the merge is
(when a fidelity report is given), the exact prompt format with one rendered example, and how to load it.

Cards are cheap to build: no model, tokenizer or dataset is loaded, and nothing is fetched unless the base model is
a Hub id whose license is wanted (a failure there is silent). A card never holds a credential or an absolute local
path: the values of HF_TOKEN, HUGGING_FACE_HUB_TOKEN and WANDB_API_KEY are scrubbed, local paths are shown by their
last component only. `check_card` checks the same things offline on a card already written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from huggingface_hub import ModelCard, ModelCardData

from qlora_pipeline import tiny

if TYPE_CHECKING:
    from qlora_pipeline.config import Recipe

# Environment variables whose values must never reach a card or a published file.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "[redacted]"
PLACEHOLDER_REPO = "OWNER/NAME"
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")

# An absolute local path: a POSIX path of two or more components that does not continue a word, a URL (`://`), a
# relative path (`./`) or a home path (`~/`), or a Windows drive path. `tokens/s`, `</s>`, `OWNER/NAME` and
# `https://huggingface.co/docs` are not matched.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])/(?:[\w.@+-]+/)+[\w.@+-]+/?|\b[A-Za-z]:\\[^\s`'\"|)]+")

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

# The illustrative exchange rendered in the prompt-format section.
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
EXAMPLE_INSTRUCTION = "Classify the sentiment of the sentence as positive or negative."
EXAMPLE_INPUT = "The new treatment worked well for most patients."
EXAMPLE_OUTPUT = "positive"


# ---------------------------------------------------------------------------------------------------------------
# Names: Hub ids, local paths, secrets


def secret_values() -> dict[str, str]:
    """{env var: value} of the credentials set in the environment (values of 8+ characters)."""
    values = {}
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if len(value) >= 8:
            values[name] = value
    return values


def scrub(text: str) -> str:
    """The text without credential values and with absolute paths cut to their last component."""
    for value in secret_values().values():
        text = text.replace(value, REDACTED)
    return ABSOLUTE_PATH.sub(lambda match: _last_component(match.group(0)), text)


def _last_component(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]", path) if p]
    return parts[-1] if parts else path


def is_hub_id(name: str | None, suffixes: tuple[str, ...] = ()) -> bool:
    """True for a name that can only be a Hub repo id: not embedded, not a local path, a valid `owner/name`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or tiny.is_embedded(name) or name.startswith((".", "/", "~", "\\")) or ABSOLUTE_PATH.match(name):
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
    if tiny.is_embedded(name) or is_hub_id(name, DATA_FILE_SUFFIXES):
        return name
    return _last_component(name.rstrip("/\\")) or name


# ---------------------------------------------------------------------------------------------------------------
# License


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
        if tiny.is_embedded(name):
            from qlora_pipeline.modeling import resolve_model_path

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


# ---------------------------------------------------------------------------------------------------------------
# Building


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
    if kind not in ("merged", "adapter"):
        raise ValueError(f"kind must be 'merged' or 'adapter', got {kind!r}")
    values = recipe.to_dict()
    model_name = recipe.model.model_name_or_path
    dataset_name = recipe.data.dataset_name
    four_bit = bool(values.get("load_in_4bit"))
    use_peft = bool(values.get("use_peft"))

    task = recipe.task.task
    tags = ["qlora-pipeline"]
    if use_peft:
        tags.append("lora")
    if four_bit:
        tags.append("qlora")
    tags += ["sft", "trl"] if task == "causal_lm" else [task.replace("_", "-")]
    if kind == "merged":
        tags.append("merged")
    license_ = recipe.export.hub_license or base_license(recipe)
    results = _eval_results(recipe, summary, fidelity, kind)
    data = ModelCardData(
        base_model=model_name if is_hub_id(model_name) else None,
        datasets=[dataset_name] if is_hub_id(dataset_name, DATA_FILE_SUFFIXES) else None,
        library_name="transformers" if kind == "merged" else "peft",
        pipeline_tag=TASK_CARDS[task][0],
        tags=tags,
        license=license_,
        model_name=(repo_id.split("/")[-1] if repo_id else display_name(model_name)) if results else None,
        eval_results=results or None,
    )

    sections = [
        _intro(kind, recipe, repo_id),
        _usage(kind, recipe, repo_id, summary),
        _prompt_format(recipe),
        _training(recipe, values, summary),
        _lora(values) if use_peft else "",
        _data(recipe, summary),
        _results(summary),
        _fidelity(fidelity) if fidelity else "",
        _framework_versions(),
    ]
    body = "\n\n".join(section.strip() for section in sections if section and section.strip()) + "\n"
    front = data.to_yaml()
    return ModelCard(scrub(f"---\n{front}\n---\n\n{body}"))


def _intro(kind: str, recipe: Recipe, repo_id: str | None) -> str:
    base = display_name(recipe.model.model_name_or_path)
    title = repo_id.split("/")[-1] if repo_id else f"{base} fine-tuned with qlora-pipeline"
    method = "QLoRA (LoRA on a 4-bit NF4 base)" if recipe.model.load_in_4bit else "LoRA"
    if kind == "merged" and recipe.model.use_peft:
        what = (
            f"A standalone model: **{base}** after supervised fine-tuning with {method}, the LoRA adapter merged "
            "into the base weights. It loads with plain `transformers`; no `peft` needed."
        )
    elif kind == "merged":
        what = f"A standalone model: **{base}** after supervised full fine-tuning. It loads with plain `transformers`."
    else:
        what = (
            f"A LoRA adapter for **{base}**, trained by supervised fine-tuning with {method}. Load it on top of "
            "the base model with `peft`."
        )
    lines = [
        f"# {title}",
        "",
        what,
        "",
        f"- **Base model:** {_base_reference(recipe)}",
        f"- **Training data:** {display_name(recipe.data.dataset_name)}",
        f"- **Prompt template:** `{recipe.data.template}`",
        f"- **Trained with:** qlora-pipeline {_pipeline_version()}, on {TASK_CARDS[recipe.task.task][3]}",
    ]
    if recipe.task.task != "causal_lm":
        lines[-2] = f"- **Task:** `{recipe.task.task}` ({TASK_CARDS[recipe.task.task][0]})"
    return "\n".join(lines)


def _base_reference(recipe: Recipe) -> str:
    name = recipe.model.model_name_or_path
    if is_hub_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    if tiny.is_embedded(name):
        return f"`{name}` (a tiny random-weight model built by qlora-pipeline for its offline demo)"
    return f"`{display_name(name)}` (a local model folder)"


def _pipeline_version() -> str:
    from qlora_pipeline import __version__

    return __version__


def _usage(kind: str, recipe: Recipe, repo_id: str | None, summary: dict | None = None) -> str:
    repo = repo_id or PLACEHOLDER_REPO
    if recipe.task.task != "causal_lm":
        return _task_usage(kind, recipe, repo, (summary or {}).get("classes"))
    template = _template(recipe)
    end_token = template.end_token if template is not None else None
    stop = f', eos_token_id=tokenizer.convert_tokens_to_ids("{end_token}")' if end_token else ""
    messages = f'messages = [{{"role": "user", "content": "{EXAMPLE_INSTRUCTION}"}}]'
    generate = [
        messages,
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ").to(model.device)",
        f"output = model.generate(**inputs, max_new_tokens=256{stop})",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    if kind == "merged":
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'repo = "{repo}"',
            "tokenizer = AutoTokenizer.from_pretrained(repo)",
            'model = AutoModelForCausalLM.from_pretrained(repo, dtype="auto", device_map="auto")',
            "",
            *generate,
        ]
        intro = "The export holds the tokenizer and its chat template, so `apply_chat_template` builds the prompt:"
        return "## How to use\n\n" + intro + "\n\n```python\n" + "\n".join(code) + "\n```"

    base_id = recipe.model.model_name_or_path if is_hub_id(recipe.model.model_name_or_path) else None
    base_literal = base_id or "PATH/TO/BASE_MODEL"
    auto = [
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'repo = "{repo}"',
        "tokenizer = AutoTokenizer.from_pretrained(repo)  # the adapter repo holds the tokenizer it was trained with",
        'model = AutoPeftModelForCausalLM.from_pretrained(repo, dtype="auto", device_map="auto")',
        "",
        *generate,
    ]
    explicit = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    if recipe.model.load_in_4bit:
        explicit[-1] = "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig"
    explicit += ["", f'repo = "{repo}"', "tokenizer = AutoTokenizer.from_pretrained(repo)"]
    if recipe.model.load_in_4bit:
        explicit += [
            "quantization = BitsAndBytesConfig(  # the base as the adapter was trained on it",
            "    load_in_4bit=True,",
            f'    bnb_4bit_quant_type="{recipe.model.bnb_4bit_quant_type}",',
            f"    bnb_4bit_use_double_quant={bool(recipe.model.use_bnb_nested_quant)},",
            f'    bnb_4bit_compute_dtype="{recipe.model.bnb_4bit_compute_dtype or "bfloat16"}",',
            ")",
            "base = AutoModelForCausalLM.from_pretrained(",
            f'    "{base_literal}", quantization_config=quantization, device_map="auto"',
            ")",
        ]
    else:
        explicit.append(
            f'base = AutoModelForCausalLM.from_pretrained("{base_literal}", dtype="auto", device_map="auto")'
        )
    explicit += [
        "if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:",
        "    base.resize_token_embeddings(len(tokenizer))  # tokens added in training (e.g. the pad token)",
        "model = PeftModel.from_pretrained(base, repo)",
    ]
    text = [
        "## How to use",
        "",
        (
            "With `peft` installed, `AutoPeftModelForCausalLM` loads the base model named in `adapter_config.json` "
            "and the adapter on top of it:"
        ),
        "",
        "```python",
        *auto,
        "```",
        "",
        "Or load the base model yourself and attach the adapter:",
        "",
        "```python",
        *explicit,
        "```",
    ]
    if base_id is None:
        name = display_name(recipe.model.model_name_or_path)
        where = (
            f"`qlora_pipeline.modeling.resolve_model_path({name!r})` builds it and returns its folder"
            if tiny.is_embedded(recipe.model.model_name_or_path)
            else "use your copy of it"
        )
        text += [
            "",
            (
                f"The base model `{name}` is not on the Hub ({where}): set `base_model_name_or_path` in "
                "`adapter_config.json`, or `PATH/TO/BASE_MODEL` above, to its folder."
            ),
        ]
    return "\n".join(text)


def _task_usage(kind: str, recipe: Recipe, repo: str, classes: list[str] | None) -> str:
    """How to use a QA, classification or seq2seq model: a transformers pipeline on the export or the adapter."""
    tag, auto_class, peft_class, _ = TASK_CARDS[recipe.task.task]
    if kind == "merged":
        code = ["from transformers import pipeline", "", f'pipe = pipeline("{tag}", model="{repo}")']
    else:
        # The adapter folder holds no config.json: a classifier's head size and class names are given again.
        labels = ""
        if classes:
            labels = f", num_labels={len(classes)}, id2label={dict(enumerate(classes))!r}"
            labels += f", label2id={ {name: i for i, name in enumerate(classes)}!r}"
        code = [
            f"from peft import {peft_class}",
            "from transformers import AutoTokenizer, pipeline",
            "",
            f'repo = "{repo}"',
            "tokenizer = AutoTokenizer.from_pretrained(repo)  # the tokenizer the adapter was trained with",
            f"model = {peft_class}.from_pretrained(repo{labels}).merge_and_unload()",
            *(["model.config.pad_token_id = tokenizer.pad_token_id"] if classes else []),
            f'pipe = pipeline("{tag}", model=model, tokenizer=tokenizer)',
        ]
    code.append(f"print({TASK_EXAMPLES[recipe.task.task]})")
    loads = "plain `transformers`" if kind == "merged" else f"`peft`'s `{peft_class}` (base model + adapter)"
    return "\n".join(["## How to use", "", f"Loads with {loads} as a `{auto_class}`:", "", "```python", *code, "```"])


def _template(recipe: Recipe):
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.templates import get_template

    try:
        return get_template(recipe.data.template)
    except PipelineError:
        return None


def _local_chat_template(recipe: Recipe) -> str | None:
    """The base model's own chat template, if the base is a local or embedded folder (template: tokenizer)."""
    name = recipe.model.tokenizer_name_or_path or recipe.model.model_name_or_path
    try:
        if tiny.is_embedded(name):
            from qlora_pipeline.modeling import resolve_model_path

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


def _prompt_format(recipe: Recipe) -> str:
    template = _template(recipe) if recipe.task.task == "causal_lm" else None
    if template is None:
        return ""
    chat_template = template.chat_template or _local_chat_template(recipe)
    head = [
        "## Prompt format",
        "",
        (
            f"Trained with the `{template.name}` template. Each row's instruction (and its input, if any, after "
            f"{json.dumps(template.input_separator)}) is the user turn; the answer is the assistant turn and the "
            "only part in the loss. At inference, `tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)` builds exactly the prompt the model was trained on."
        ),
    ]
    if chat_template is None:
        head += ["", "The template is the base model's own `tokenizer.chat_template`."]
        return "\n".join(head)
    end_token = template.end_token or "</s>"
    messages = template.messages(EXAMPLE_INSTRUCTION, EXAMPLE_INPUT)
    try:
        prompt = render_example(chat_template, messages, True, end_token)
        full = render_example(
            chat_template, template.messages(EXAMPLE_INSTRUCTION, EXAMPLE_INPUT, EXAMPLE_OUTPUT), False, end_token
        )
    except Exception as exc:  # noqa: BLE001 -- any template error: the card says so
        head += ["", f"(The example could not be rendered: {type(exc).__name__}.)"]
        return "\n".join(head)
    completion = full[len(prompt) :] if full.startswith(prompt) else None
    head += [
        "",
        (
            f"One example, with `<s>` for the tokenizer's BOS token and `{end_token}` ending each turn. "
            if template.end_token
            else "One example, with `<s>` and `</s>` standing for the tokenizer's BOS and EOS tokens. "
        )
        + "The prompt (what the model sees before it answers):",
        "",
        "```text",
        prompt,
        "```",
        "",
        "The full training text (prompt + completion):",
        "",
        "```text",
        full,
        "```",
    ]
    if completion is not None:
        head += ["", f"The model learns to write the completion {json.dumps(completion)}, then stop."]
    return "\n".join(head)


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


def _training(recipe: Recipe, values: dict, summary: dict | None) -> str:
    four_bit_keys = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_compute_dtype")
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
    text = ["## Training hyperparameters", "", _table(rows)]
    return "\n".join(text)


def _lora(values: dict) -> str:
    rows = [(key, values[key]) for key in LORA_KEYS if key in values]
    return "\n".join(["## LoRA", "", _table(rows)])


def _data(recipe: Recipe, summary: dict | None) -> str:
    lines = ["## Data", ""]
    lines.append(f"- **Dataset:** {display_name(recipe.data.dataset_name)}")
    if recipe.data.dataset_config:
        lines.append(f"- **Configuration:** {recipe.data.dataset_config}")
    lines.append(f"- **Split:** {recipe.data.dataset_split}")
    if recipe.data.eval_files:
        lines.append(f"- **Eval data:** {', '.join(display_name(f) for f in recipe.data.eval_files)}")
    else:
        lines.append(f"- **Held out for eval:** {_format_value(recipe.data.eval_split_size)}")
    columns = [recipe.data.instruction_column, recipe.data.input_column, recipe.data.output_column]
    lines.append(f"- **Columns:** {', '.join(f'`{c}`' for c in columns if c)} (instruction, input, output)")
    lines.append(f"- **Examples over max_length:** {recipe.data.overlong}")
    splits = (summary or {}).get("data") or {}
    stats = [(name, splits.get(name)) for name in ("train", "eval") if splits.get(name)]
    if stats:
        keys = ("rows", "examples", "tokens", "mean", "max", "dropped", "truncated")
        lines += [
            "",
            "| split | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for name, split in stats:
            lines.append(f"| {name} | " + " | ".join(_cell(split.get(key)) for key in keys) + " |")
        lines += ["", "Token counts include the prompt; `mean`/`max` are tokens per example."]
    return "\n".join(lines)


def _results(summary: dict | None) -> str:
    if not summary:
        return ""

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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_count(name):
            earlier = before.get(name)
            rows.append((f"{name} (held out)", f"{_number(earlier)} before → {_number(value)} after"))
    rows = [(k, v) for k, v in rows if v is not None]
    return "\n".join(["## Results", "", _table(rows, ("metric", "value"))])


def _is_count(name: str) -> bool:
    """A row count (n, n_forward, SUBTASK/n…), not a score: left out of the results."""
    last = name.rsplit("/", 1)[-1]  # SUBTASK/METRIC (the medtuned metric)
    return last == "n" or last.startswith("n_") or last.endswith("_n")


def _eval_results(recipe: Recipe, summary: dict | None, fidelity: dict | None, kind: str) -> list:
    """`model-index` entries for a generation metric's held-out scores, so the Hub shows them: the trained adapter's
    (summary.json), or for a merged export the export's own (fidelity.json). Counts are left out."""
    from huggingface_hub import EvalResult

    if recipe.task.generation_metric == "none":
        return []
    scores = ((fidelity or {}).get("task_metrics") or {}).get("export") if kind == "merged" else None
    scores = scores or ((summary or {}).get("task_metrics") or {}).get("after") or {}
    dataset = display_name(recipe.data.dataset_name)
    results = []
    for name, value in scores.items():
        subtask, _, metric = name.rpartition("/")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or _is_count(name) or metric == "score":
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


def _fidelity(fidelity: dict) -> str:
    def number(value, spec=".4g"):
        return "n/a" if value is None else format(value, spec)

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
    rows = [(k, v) for k, v in rows if v is not None]
    text = [
        "## Merge fidelity",
        "",
        "The merged model was compared with the model as trained on held-out prompts:",
        "",
        _table(rows, ("check", "value")),
    ]
    examples = [e for e in fidelity.get("examples") or [] if isinstance(e, dict)][:3]
    if examples:
        text += [
            "",
            "Greedy generations side by side:",
            "",
            "| prompt | as trained | merged | max abs logit diff |",
            "|---|---|---|---|",
        ]
        for example in examples:
            text.append(
                "| "
                + " | ".join(
                    [
                        _cell(str(example.get("prompt", "")), 160),
                        _cell(str(example.get("reference_generation", "")), 200),
                        _cell(str(example.get("merged_generation", "")), 200),
                        _cell(number(example.get("max_abs_logit_diff"), ".3g")),
                    ]
                )
                + " |"
            )
    return "\n".join(text)


def _framework_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    rows = []
    for package in ("transformers", "peft", "trl", "bitsandbytes", "torch", "huggingface_hub"):
        try:
            rows.append(f"- {package} {version(package)}")
        except PackageNotFoundError:
            continue
    return "\n".join(["## Framework versions", "", *rows]) if rows else ""


# ---------------------------------------------------------------------------------------------------------------
# Checking


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
    return repr(_shorten(name)) if not ABSOLUTE_PATH.search(name) else f"'…/{_last_component(name)}' (a local path)"


def _shorten(path: str) -> str:
    """A path shown in a message: its first component and last one."""
    parts = [p for p in re.split(r"[\\/]", path) if p]
    return f"/{parts[0]}/…/{parts[-1]}" if len(parts) > 2 else path
