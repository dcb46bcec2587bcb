"""The task skeleton, written once: what every task does the same way, with hooks for what differs.

A task (a subclass of `Task`) answers the flow's questions:
- `prepare_data(recipe)`: tokenizer and checked, tokenized train/eval splits (`PreparedData`), no model;
- `load_model(recipe, prepared)`: the base model of the task's class (`auto_class`), quantized as the recipe says,
  its pad id set and prepared for k-bit training; the task adds its own settings in `configure_model`;
- `build_trainer(recipe, model, prepared, callbacks)`: the transformers/TRL trainer, dynamic padding;
- `evaluate(model, prepared, recipe)`: the task's metric on the held-out rows, a flat dict of numbers.

Shared here: `load_tokenizer` (one loader; the task's pad-token rule in `fit_tokenizer`), `load_model` (one loader;
the task's model kwargs, modules kept unquantized and post-load settings in hooks), `load_trained` (the model as
trained: the seeded base + its adapter), `PreparedData.from_splits` (the end of every data step: notes, skipped
rows, every row accounted for), `trainer_arguments` (the recipe's SFTConfig as the task's TrainingArguments class),
the merge's hooks (`fidelity_probe`, `prepare_export`) and the LoRA facts from recipe/task_settings.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from qlora_pipeline.data import rows as data_rows
from qlora_pipeline.model import loading
from qlora_pipeline.model.adapters import attach_adapter
from qlora_pipeline.recipe import task_settings
from qlora_pipeline.tasks.fidelity import MetricProbe


class Split(NamedTuple):
    """One split as a task's data step made it: the RowSource its rows were read from (None for held-out rows split
    off the training file), the rows (a datasets.Dataset, None where nothing is held out) and their tokenization."""

    source: Any
    rows: Any
    tokenized: Any


@dataclass
class PreparedData:
    """What a task's data step hands to the model and trainer steps: everything checked, nothing loaded on a GPU."""

    tokenizer: Any
    template: Any  # the prompt template (causal LM); None for the other tasks
    train: Any  # tokenize.TokenizedSplit
    eval: Any  # tokenize.TokenizedSplit | None
    notes: list[str]
    skipped: list[dict] | None = None  # rows left out under on_bad_rows: skip (rows.Where.record)
    accounting: dict | None = None  # rows read, skipped, unused (rows.accounting)
    eval_rows: Any = None  # the held-out rows as read (datasets.Dataset): gold answers and labels for the metric
    extra: dict = field(default_factory=dict)  # task-specific facts (e.g. label names), saved nowhere by the flow
    repaired: list[dict] = field(default_factory=list)  # slips fixed in kept rows (rows.RowSource.repaired)
    checks: Any = None  # what the data checks found (data/checks.DataChecks; causal LM)

    def data_summary(self) -> dict:
        """The splits' statistics and where every row went (per source in a mixture), with what the data checks
        found: summary.json's `data`, the tracker's, and what `preprocess` prints."""
        summary = {"train": self.train.stats(), "eval": self.eval.stats() if self.eval else None}
        summary.update(self.accounting or {})
        if self.checks is not None:
            summary["checks"] = self.checks.summary()
        return summary

    @classmethod
    def from_splits(cls, tokenizer, template, notes, train: Split, held_out: Split, *, after=(), extra=None):
        """Every task's data step ends here, with its two splits. The sources' notes follow `notes` (and precede
        `after`), their skipped rows are gathered, and every row read is accounted for."""
        read = [source for source in (train.source, held_out.source) if source is not None]
        return cls(
            tokenizer,
            template,
            train.tokenized,
            held_out.tokenized,
            [*notes, *(note for source in read for note in source.notes), *after],
            [record for source in read for record in source.skipped],
            data_rows.accounting(train.source, held_out.source, train.rows, held_out.rows),
            eval_rows=held_out.rows,
            extra=extra or {},
            repaired=[record for source in read for record in source.repaired],
        )


class Task:
    """One task's answers to the flow's questions. Subclasses set the class attributes and override the hooks."""

    name: str = ""
    # The metric that decides whether training helped, first; evaluate() returns these keys (and may add more).
    metric_names: tuple[str, ...] = ()
    # The transformers Auto class of the base model, and the class a merged export loads with.
    auto_class: str = "AutoModelForCausalLM"
    # Keyword arguments of the tokenizer's from_pretrained.
    tokenizer_options: dict = {}
    # Why the embeddings grow to the tokenizer, for the note that says they did.
    resize_reason: str = " for the added special tokens"

    @property
    def peft_task_type(self) -> str:
        """peft's TaskType of this task's adapters (recipe/task_settings.py)."""
        return task_settings.SETTINGS[self.name].peft_task_type

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """The head trained in full beside the adapter, unless the recipe names its own lora_modules_to_save."""
        return task_settings.SETTINGS[self.name].modules_to_save

    def prepare_data(self, recipe) -> PreparedData:
        raise NotImplementedError

    # ------------------------------------------------------------ tokenizer

    def load_tokenizer(self, recipe) -> tuple[Any, list[str]]:
        """The model's tokenizer with this task's pad token (`fit_tokenizer`), padding on the right. Returns
        (tokenizer, notes)."""
        tokenizer = loading.load_pretrained_tokenizer(recipe.model, recipe.training, **self.tokenizer_options)
        notes = self.fit_tokenizer(tokenizer, recipe)
        tokenizer.padding_side = "right"
        return tokenizer, notes

    def fit_tokenizer(self, tokenizer, recipe) -> list[str]:
        """Give the tokenizer what the task needs (a pad token, an end token); returns notes on what changed."""
        return []

    # ------------------------------------------------------------ model

    def load_model(self, recipe, prepared: PreparedData, model_args=None):
        """(model, notes): the base model of `auto_class` (with its head where the task adds one), quantized as
        `model_args` (default: the recipe's) say, through the one model loader (model/loading.py) with this task's
        hooks. The stage wraps it in LoRA (`peft_task_type`, the head in `modules_to_save`)."""
        return loading.load_model(
            model_args or recipe.model,
            recipe.training,
            prepared.tokenizer,
            auto_class=self.auto_class,
            keep_unquantized=self.unquantized_modules(recipe),
            resize_reason=self.resize_reason,
            configure=lambda model: self.configure_model(model, recipe, prepared),
            **self.model_options(recipe, prepared),
        )

    def unquantized_modules(self, recipe) -> list[str]:
        """Modules left out of 4-/8-bit quantization (a new head, which must train in full)."""
        return []

    def model_options(self, recipe, prepared: PreparedData) -> dict:
        """Extra from_pretrained keyword arguments (a classifier's labels); may refuse a recipe before loading."""
        return {}

    def configure_model(self, model, recipe, prepared: PreparedData) -> list[str]:
        """The task's settings on the loaded model (KV cache off for training, generation ids); returns notes."""
        return []

    def load_trained_base(self, recipe, prepared: PreparedData, model_args=None):
        """The base as training loaded it, from the training seed (so a new head starts as it did)."""
        from transformers import set_seed

        set_seed(recipe.training.seed)
        model, _ = self.load_model(recipe, prepared, model_args)
        return model

    def load_trained(self, recipe, prepared: PreparedData, adapter_dir, model_args=None):
        """The model as trained, in eval mode: the base as training loaded it, with the adapter in `adapter_dir`."""
        return attach_adapter(self.load_trained_base(recipe, prepared, model_args), adapter_dir, recipe).eval()

    # ------------------------------------------------------------ merge

    def fidelity_probe(self, recipe, prepared: PreparedData):
        """How the merge checks this task's export against the trained model (tasks/fidelity.py)."""
        return MetricProbe(self, recipe, prepared)

    def prepare_export(self, model, prepared: PreparedData) -> None:
        """Settings the merged model needs for inference, set before it is saved."""

    # ------------------------------------------------------------ trainer and metric

    def build_trainer(self, recipe, model, prepared: PreparedData, callbacks=None):
        raise NotImplementedError

    def metric_names_for(self, recipe) -> tuple[str, ...]:
        """The metrics that say whether training helped, headline first (a task may pick them by recipe)."""
        return self.metric_names

    def evaluate(self, model, prepared: PreparedData, recipe) -> dict[str, float]:
        """The task metric on `prepared.eval_rows`; {} where the task has none beyond the eval loss."""
        return {}


def trainer_arguments(recipe, arguments_class=None, **changes):
    """The recipe's training settings (an SFTConfig) as a task's TrainingArguments class: only the fields plain
    TrainingArguments has (the SFT ones, max_length, packing…, would mean nothing to its trainer), with `changes`
    (label names, generation settings) on top."""
    from transformers import TrainingArguments

    training = recipe.training
    values = {f.name: getattr(training, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return (arguments_class or TrainingArguments)(**{**values, **changes})
