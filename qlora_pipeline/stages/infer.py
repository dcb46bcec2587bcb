"""Inference: load a trained model and format prompts exactly as training did (`generate`, `chat`).

What can be loaded (`open_model`):
  - a run folder (adapter/ + recipe.yaml): the model as trained, i.e. the base quantized per the recipe plus the
    adapter (`model.adapters.load_trained_model`); with `merged=True`, its merged export RUN/merged instead;
  - an adapter folder (adapter_config.json; recipe.yaml beside it or in its parent): the same;
  - a merged export or any model folder (config.json): plain `AutoModelForCausalLM`.

Prompts always go through the saved tokenizer's `apply_chat_template(messages, add_generation_prompt=True)`:
training saved the chat template it rendered with beside the adapter and in the export, so these are the trainer's
prompt tokens. For a run or adapter, the saved template is checked against the recipe's before anything loads.
An instruction + input row becomes the user turn exactly as in training (`PromptTemplate.messages`). Generation
stops at the template's end token; only the new text is returned, special tokens skipped.

Everything a user can get wrong (paths, input rows, options) is reported as a `PipelineError` before the weights
load.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qlora_pipeline.data.templates import TEMPLATES, PromptTemplate, get_template
from qlora_pipeline.errors import PipelineError, first_line

DEFAULT_COLUMNS = ("instruction", "input")
ROLES = ("system", "user", "assistant")
CHAT_HELP = "commands: /reset clears the conversation, /exit (or end of input) quits"


# ---------------------------------------------------------------- what to load


@dataclass
class ModelSource:
    folder: Path  # the adapter folder or the model folder: weights (or adapter) and the saved tokenizer
    kind: str  # "adapter": base + adapter as trained, per the recipe; "model": a plain model folder
    recipe_path: Path | None = None


def locate_model(path: str | os.PathLike, merged: bool = False) -> ModelSource:
    """A run folder, an adapter folder or a model folder (see the module doc); loads nothing."""
    given = Path(path)
    if not given.exists():
        raise PipelineError(f"{given}: no such model, run or adapter folder")
    if not given.is_dir():
        raise PipelineError(f"{given}: not a folder; pass a run folder, an adapter folder or a model folder")
    is_run = (given / "adapter" / "adapter_config.json").is_file()
    if merged:
        if not (is_run or (given / "recipe.yaml").is_file()):
            raise PipelineError(f"{given}: --merged takes a run folder (one holding adapter/ and recipe.yaml)")
        export = given / "merged"
        if not (export / "config.json").is_file():
            raise PipelineError(
                f"{export}: no merged export here; run `qlora-pipeline merge {given}` first, or drop --merged "
                "to use the adapter as trained"
            )
        return ModelSource(export, "model")
    if is_run or (given / "adapter_config.json").is_file():
        from qlora_pipeline.model.adapters import locate

        source = locate(given)
        return ModelSource(source.adapter_dir, "adapter", source.recipe_path)
    if (given / "config.json").is_file():
        return ModelSource(given, "model")
    raise PipelineError(
        f"{given}: not a run folder (with adapter/), an adapter folder (with adapter_config.json) "
        "or a model folder (with config.json)"
    )


@dataclass
class InferenceModel:
    """The saved tokenizer and prompt template of a trained model, and (after `load_weights`) the model."""

    source: ModelSource
    tokenizer: object
    template: PromptTemplate
    end_token_ids: list[int]  # generation stops at any of these; the template's end token first
    recipe: object | None = None  # the run's Recipe, for a run or adapter folder
    columns: tuple[str, str | None] = DEFAULT_COLUMNS  # instruction and input fields of --input-file rows
    notes: list[str] = field(default_factory=list)
    model: object | None = None

    def messages_for(self, instruction: str, input_text: str | None = None) -> list[dict]:
        """The user turn of an instruction (+ input) row, exactly as training built it."""
        return self.template.messages(instruction, input_text)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt token ids for a conversation ending in a user turn: the trainer's ids for the same row."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def prompt_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def describe(self) -> str:
        if self.source.kind == "adapter":
            quantized = self.recipe.model.load_in_4bit or self.recipe.model.load_in_8bit
            return f"{self.source.folder}: {'quantized ' if quantized else ''}base + adapter, as trained"
        return f"{self.source.folder}: model folder"

    def load_weights(self, device: str | None = None):
        """Load the model: the base + adapter per the recipe, or the model folder as it is. Returns the model."""
        import torch

        device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        if self.source.kind == "adapter":
            from qlora_pipeline.model.adapters import load_trained_model

            model = load_trained_model(self.recipe, self.source.folder, self.tokenizer, device)
        else:
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(self.source.folder, dtype="auto", device_map={"": device})
            except Exception as exc:
                raise PipelineError(f"{self.source.folder}: could not load the model: {first_line(exc)}") from None
        self.model = model.eval()
        return self.model


def open_model(path: str | os.PathLike, merged: bool = False) -> InferenceModel:
    """Locate the model, read its recipe and saved tokenizer, check the chat template. Loads no weights."""
    source = locate_model(path, merged)
    if source.kind == "adapter":
        return _open_adapter(source)
    return _open_model_folder(source)


def _open_adapter(source: ModelSource) -> InferenceModel:
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(source.recipe_path)
    template = get_template(recipe.data.template)
    notes = []
    if (source.folder / "tokenizer_config.json").is_file():
        tokenizer = _load_tokenizer(source.folder)
    else:  # an adapter saved without its tokenizer: rebuild the one training used from the recipe
        from qlora_pipeline.tasks.causal_lm import load_tokenizer

        tokenizer, _ = load_tokenizer(recipe.model, recipe.training, template)
        notes.append(f"{source.folder} holds no tokenizer: using the recipe's, rebuilt as training built it")
    expected = template.chat_template_for(tokenizer)
    if tokenizer.chat_template != expected:
        raise PipelineError(
            f"{source.folder}: the saved tokenizer's chat template is not the recipe's '{template.name}' template "
            f"({source.recipe_path}), so prompts would not match training; restore the tokenizer files training saved"
        )
    end_token = template.end_token_for(tokenizer)
    if end_token not in tokenizer.get_vocab():
        raise PipelineError(f"{source.folder}: the saved tokenizer lacks the template's end token {end_token!r}")
    end_ids = _unique([tokenizer.convert_tokens_to_ids(end_token), tokenizer.eos_token_id])
    _prepare_padding(tokenizer, notes)
    columns = (recipe.data.instruction_column, recipe.data.input_column)
    return InferenceModel(source, tokenizer, template, end_ids, recipe, columns, notes)


def _open_model_folder(source: ModelSource) -> InferenceModel:
    tokenizer = _load_tokenizer(source.folder)
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"{source.folder}: the tokenizer has no chat_template, so prompts cannot be formatted as in training; "
            "pass the run folder, or an export written by `qlora-pipeline merge`"
        )
    # The export carries the training template; knowing which one gives the instruction/input separator.
    template = next(
        (t for t in TEMPLATES.values() if t.chat_template == tokenizer.chat_template), TEMPLATES["tokenizer"]
    )
    end_ids = []
    if (source.folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(source.folder).eos_token_id
        except Exception as exc:
            raise PipelineError(f"{source.folder}: generation_config.json: {first_line(exc)}") from None
        end_ids += eos if isinstance(eos, list) else [eos]
    end_token = template.end_token_for(tokenizer)
    end_ids.append(tokenizer.convert_tokens_to_ids(end_token) if end_token in tokenizer.get_vocab() else None)
    end_ids = _unique(end_ids)
    if not end_ids:
        raise PipelineError(f"{source.folder}: no end-of-answer token (no eos in the tokenizer or generation config)")
    notes = []
    _prepare_padding(tokenizer, notes)
    return InferenceModel(source, tokenizer, template, end_ids, None, DEFAULT_COLUMNS, notes)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise PipelineError(f"{folder}: could not load the tokenizer: {first_line(exc)}") from None


def _prepare_padding(tokenizer, notes: list[str]) -> None:
    """Left padding, so that every prompt of a batch ends where generation starts."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"the tokenizer has no pad token: padding with {tokenizer.eos_token!r} (masked out)")
    tokenizer.padding_side = "left"


def _unique(ids) -> list[int]:
    seen: list[int] = []
    for token_id in ids:
        if token_id is not None and token_id not in seen:
            seen.append(int(token_id))
    return seen


# ---------------------------------------------------------------- input rows


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """The rows of a JSONL file as (`FILE:LINE`, row); a malformed line is reported with its line number. The
    fields are checked by `row_messages`, once the model's template and columns are known."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such input file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = []
    # Split on newlines only: str.splitlines would also break inside a JSON string holding U+2028 and the like.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{where}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{where}: expected a JSON object with fields, got {type(row).__name__}")
        rows.append((where, row))
    if not rows:
        raise PipelineError(f"{path}: the input file is empty (no rows)")
    return rows


def row_messages(
    row: dict, template: PromptTemplate, columns: tuple[str, str | None] = DEFAULT_COLUMNS, where: str = "row"
) -> list[dict]:
    """The conversation to prompt with: the row's `messages` (a final assistant turn, the reference answer, is left
    out), or the user turn built from its instruction and optional input as training built it."""
    instruction, input_column = columns
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise PipelineError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for number, message in enumerate(messages, start=1):
            if not (isinstance(message, dict) and message.get("role") in ROLES):
                raise PipelineError(f"{where}: message {number} needs a role, one of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise PipelineError(f"{where}: message {number} needs a text 'content'")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise PipelineError(f"{where}: 'messages' must end with a user turn (or a user turn and its answer)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    value = row.get(instruction)
    if value is None or (isinstance(value, str) and not value.strip()):
        state = "missing" if instruction not in row else "null" if value is None else "empty"
        raise PipelineError(f"{where}: '{instruction}' is {state}; each row needs '{instruction}' or 'messages'")
    if not isinstance(value, str):
        raise PipelineError(f"{where}: '{instruction}' must be text, got {type(value).__name__}")
    extra = row.get(input_column) if input_column else None
    if extra is not None and not isinstance(extra, str):
        raise PipelineError(f"{where}: '{input_column}' must be text, got {type(extra).__name__}")
    return template.messages(value, extra)


# ---------------------------------------------------------------- generation


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    do_sample: bool | None = None  # None: sample if a sampling option is given, else greedy
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise PipelineError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature <= 0:
            raise PipelineError(f"--temperature must be above 0, got {self.temperature}; use --greedy for argmax")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PipelineError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise PipelineError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        given = [name for name, value in self._sampling().items() if value is not None]
        if self.do_sample is False and given:
            option = "--" + given[0].replace("_", "-")
            raise PipelineError(f"{option} only applies to sampling; drop --greedy or {option}")

    def sampling(self) -> bool:
        return self.do_sample if self.do_sample is not None else any(v is not None for v in self._sampling().values())

    def _sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def generation_config(self, loaded: InferenceModel):
        from transformers import GenerationConfig

        extra = {k: v for k, v in self._sampling().items() if v is not None} if self.sampling() else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.sampling(),
            eos_token_id=loaded.end_token_ids,
            pad_token_id=loaded.tokenizer.pad_token_id,
            bos_token_id=loaded.tokenizer.bos_token_id,
            use_cache=True,
            **extra,
        )


def generate(
    loaded: InferenceModel,
    conversations: list[list[dict]],
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    show_prompt: TextIO | None = None,
):
    """Yield the generated text (new tokens only, special tokens skipped, stripped) for each conversation, in
    order; prompts are generated in left-padded batches of `batch_size`."""
    import torch

    options = options or GenerationOptions()
    model = loaded.model if loaded.model is not None else loaded.load_weights()
    config = options.generation_config(loaded)
    if options.seed is not None:
        from transformers import set_seed

        set_seed(options.seed)
    device = next(model.parameters()).device
    prompts = [loaded.prompt_ids(messages) for messages in conversations]
    if show_prompt is not None:
        for index, (messages, ids) in enumerate(zip(conversations, prompts), start=1):
            print_prompt(loaded, index, messages, ids, show_prompt)
    for start in range(0, len(prompts), batch_size):
        batch = loaded.tokenizer.pad({"input_ids": prompts[start : start + batch_size]}, return_tensors="pt")
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for row in output[:, input_ids.shape[1] :]:
            yield loaded.tokenizer.decode(row, skip_special_tokens=True).strip()


def print_prompt(loaded: InferenceModel, index: int, messages: list[dict], ids: list[int], stream: TextIO) -> None:
    """The prompt as the model sees it: `prompt N text: "<JSON string>"` and `prompt N ids: [...]`."""
    stream.write(f"prompt {index} text: {json.dumps(loaded.prompt_text(messages), ensure_ascii=False)}\n")
    stream.write(f"prompt {index} ids: {json.dumps(ids)}\n")
    stream.flush()


# ---------------------------------------------------------------- commands


def run_generate(
    path: str,
    prompts: list[str] | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    merged: bool = False,
    show_prompt: bool = False,
) -> int:
    """`qlora-pipeline generate`: every check first, then the model, then the generations."""
    options = options or GenerationOptions()
    if not prompts and not input_file:
        raise PipelineError("generate: nothing to generate for; give --prompt TEXT (repeatable) or --input-file FILE")
    if prompts and input_file:
        raise PipelineError("generate: give --prompt or --input-file, not both")
    if prompts and any(not p.strip() for p in prompts):
        raise PipelineError("generate: --prompt is empty")
    if output_file and not input_file:
        raise PipelineError("generate: --output-file goes with --input-file; --prompt prints to stdout")
    if batch_size < 1:
        raise PipelineError(f"generate: --batch-size must be at least 1, got {batch_size}")
    options.check()
    if output_file and not Path(output_file).parent.is_dir():
        raise PipelineError(f"{output_file}: the output file's folder does not exist")
    locate_model(path, merged)  # a wrong path first, before the input is read
    lines = read_jsonl(input_file) if input_file else None
    # stdout carries the generations only; what libraries print while loading goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = open_model(path, merged)
        if lines is not None:
            rows = [row for _, row in lines]
            conversations = [row_messages(row, loaded.template, loaded.columns, where) for where, row in lines]
        else:
            rows, conversations = None, [loaded.messages_for(p) for p in prompts]
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
        _no_progress_bars()
        loaded.load_weights()
    texts = generate(loaded, conversations, options, batch_size, sys.stderr if show_prompt else None)
    if rows is None:
        for index, text in enumerate(texts):
            print(text if index == 0 else f"\n{text}", flush=True)
        return 0
    with open(output_file, "w", encoding="utf-8") if output_file else contextlib.nullcontext(sys.stdout) as out:
        for row, text in zip(rows, texts):
            out.write(json.dumps({**row, "generation": text}, ensure_ascii=False) + "\n")
            out.flush()
    if output_file:
        print(f"wrote {len(rows)} rows to {output_file}", file=sys.stderr)
    return 0


def run_chat(
    path: str,
    options: GenerationOptions | None = None,
    merged: bool = False,
    show_prompt: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """`qlora-pipeline chat`: one line per user turn, the answer streamed; the whole conversation is re-rendered
    with the chat template every turn. /reset clears it, /exit or end of input quits."""
    import torch

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    options = options or GenerationOptions()
    options.check()
    with contextlib.redirect_stdout(sys.stderr):  # what libraries print while loading is not conversation
        loaded = open_model(path, merged)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
        _no_progress_bars()
        model = loaded.load_weights()
    config = options.generation_config(loaded)
    if options.seed is not None:
        from transformers import set_seed

        set_seed(options.seed)
    limit = getattr(model.config, "max_position_embeddings", None)
    device = next(model.parameters()).device
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing for input())
    stdout.write(f"{loaded.describe()}\n{CHAT_HELP}\n")
    history: list[dict] = []
    turn = 0
    while True:
        line = _read_line(stdin, stdout, interactive)
        if line is None:  # end of input
            stdout.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            stdout.write("" if interactive else "\n")
            break
        if text == "/reset":
            history.clear()
            stdout.write("(conversation cleared)\n")
            continue
        if text == "/help":
            stdout.write(CHAT_HELP + "\n")
            continue
        messages = history + [{"role": "user", "content": text}]
        ids = loaded.prompt_ids(messages)
        while limit and len(ids) + options.max_new_tokens > limit and len(messages) > 2:
            messages = messages[2:]  # the oldest exchange goes first
            ids = loaded.prompt_ids(messages)
            print("note: the conversation outgrew the context window; dropped the oldest exchange", file=sys.stderr)
        turn += 1
        if show_prompt:
            print_prompt(loaded, turn, messages, ids, sys.stderr)
        stdout.write("assistant> ")
        stdout.flush()
        prompt = torch.tensor([ids], device=device)
        streamer = _streamer(loaded.tokenizer, stdout)
        with torch.no_grad():
            output = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config, streamer=streamer
            )
        answer = loaded.tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        history = messages + [{"role": "assistant", "content": answer}]
    return 0


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    stdout.write("you> ")
    stdout.flush()
    line = stdin.readline()
    return line if line else None


def _streamer(tokenizer, stream: TextIO):
    """A `TextStreamer` writing to `stream`, without the space the template puts before each answer."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _no_progress_bars() -> None:
    """The weight-loading bars would only stand between the user and the answers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
