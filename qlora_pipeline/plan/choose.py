"""`auto` settings: gradient checkpointing and the per-device batch, chosen from the memory plan against a budget.

A recipe may set `gradient_checkpointing: auto` and `per_device_train_batch_size: auto` (with `effective_batch_size`,
the rows per optimizer step, which the batch and gradient_accumulation_steps then split). The candidates are tried
fastest first, and the first whose plan (`MemoryPlan.total`: weights + what training adds) fits the budget is taken:

  1. checkpointing off before on: it saves recomputing every decoder layer's forward in the backward, a third of a
     step's matmul work (measured on the Starling-shaped base model: docs/performance.md);
  2. then the largest per-device batch that divides effective_batch_size: fewer, larger matmuls for the same rows.

A candidate's plan first counts every position as labelled (an upper bound that reads no data), and only where that
does not fit the share of labelled positions estimated from the recipe's data. The budget is the recipe's
`memory_budget`, else the device's free memory before the model loads (a CPU's shared by
the processes on it) less MARGIN. Nothing is retried at run time: a run that outgrows its plan is a planner bug.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.plan.model_facts import ModelFacts, model_facts
from qlora_pipeline.plan.precision import precision_for, this_machine
from qlora_pipeline.plan.predict import plan_from_facts
from qlora_pipeline.plan.show import human
from qlora_pipeline.sizes import parse_size

# The share of free memory left out of the default budget: the allocator's fragmentation on a GPU, the page cache and
# other processes on a CPU.
MARGIN = 0.10


@dataclass
class Choice:
    """The settings `auto` chose, the plan's total for them and the budget they fit, and every candidate tried."""

    gradient_checkpointing: bool
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    planned_bytes: int
    budget_bytes: int
    budget_source: str
    auto: list[str]
    fits: bool = True
    tried: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        batch = self.per_device_train_batch_size
        bound = " (every position counted as labelled)" if self.tried[-1]["labelled_fraction"] == 1.0 else ""
        text = (
            f"auto ({', '.join(self.auto)}): gradient checkpointing {checkpointing}, batch {batch} x "
            f"{self.gradient_accumulation_steps} accumulation: planned {human(self.planned_bytes)}{bound} of a "
            f"{human(self.budget_bytes)} budget ({self.budget_source})"
        )
        if not self.fits:
            return text.replace(": planned", ": nothing fits; the smallest is planned", 1)
        skipped = [tried for tried in self.tried if not tried["fits"]]
        if skipped:  # the one tried just before the choice: the next faster, which did not fit
            text += f"; {_candidate(skipped[-1])} did not fit ({human(skipped[-1]['planned_bytes'])})"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def choose(
    recipe,
    *,
    device: str | None = None,
    budget: int | None = None,
    local_processes: int | None = None,
    strict: bool = True,
    facts: ModelFacts | None = None,
) -> Choice:
    """The fastest candidate settings whose plan fits the budget (see the module docstring). `budget`: bytes (default:
    the recipe's memory_budget, else free memory less MARGIN). When none fits: PipelineError, or with strict=False
    the smallest candidate, with `fits` False (the planner's command shows its rows). `facts`: the recipe's model
    facts on `device`, where the caller has them (they hold the labelled share once estimated)."""
    device = device or this_machine()
    budget, source = (budget, "given") if budget is not None else memory_budget(recipe, device, local_processes)
    facts = facts or model_facts(recipe, precision_for(recipe, device))
    effective = recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps
    options = candidates(recipe)
    tried = []
    for checkpointing, batch in options:
        # Every position labelled is an upper bound that needs no data read; the data's own share only when that
        # bound does not fit.
        plan = plan_from_facts(
            facts, recipe, batch_size=batch, gradient_checkpointing=checkpointing, labelled_fraction=1.0
        )
        if plan.total > budget:
            plan = plan_from_facts(facts, recipe, batch_size=batch, gradient_checkpointing=checkpointing)
        fits = plan.total <= budget
        tried.append(
            {
                "gradient_checkpointing": checkpointing,
                "batch": batch,
                "planned_bytes": plan.total,
                "labelled_fraction": plan.labelled_fraction,
                "fits": fits,
            }
        )
        if fits or (not strict and len(tried) == len(options)):
            return Choice(
                gradient_checkpointing=checkpointing,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=effective // batch,
                planned_bytes=plan.total,
                budget_bytes=budget,
                budget_source=source,
                auto=list(recipe.auto),
                fits=fits,
                tried=tried,
            )
    smallest = tried[-1]
    raise PipelineError(
        f"{recipe.source}: no setting fits the memory budget of {human(budget)} ({source}): the smallest, "
        f"{_candidate(smallest)}, is planned at {human(smallest['planned_bytes'])} ('qlora-pipeline plan' shows the "
        "rows); raise memory_budget, or lower max_length"
    )


def candidates(recipe) -> list[tuple[bool, int]]:
    """(checkpointing, per-device batch) pairs, fastest first: checkpointing off before on, then larger batches."""
    training = recipe.training
    checkpointing = [bool(training.gradient_checkpointing)]
    if "gradient_checkpointing" in recipe.auto:
        checkpointing = [False, True]
    if "per_device_train_batch_size" in recipe.auto:
        effective = training.per_device_train_batch_size * training.gradient_accumulation_steps
        batches = [size for size in range(effective, 0, -1) if effective % size == 0]
    else:
        batches = [training.per_device_train_batch_size]
    return [(on, batch) for on in checkpointing for batch in batches]


def memory_budget(recipe, device: str, local_processes: int | None = None) -> tuple[int, str]:
    """(bytes, where it came from): the recipe's memory_budget, else the device's free memory less MARGIN; a CPU's
    free memory is shared by the training processes on this machine."""
    written = recipe.resources.memory_budget
    if written is not None:
        return parse_size(written, "memory_budget"), f"memory_budget {written}"
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * (1 - MARGIN)), f"free GPU memory {human(free)} less {MARGIN:.0%}"
    import psutil

    free = psutil.virtual_memory().available
    processes = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    shared = f" / {processes} processes" if processes > 1 else ""
    return int(free / processes * (1 - MARGIN)), f"available memory {human(free)}{shared} less {MARGIN:.0%}"


def apply(recipe, choice: Choice) -> None:
    """Set the chosen values in the recipe's training arguments (both checkpointing names: transformers 5 reads
    activation_checkpointing, peft's k-bit preparation the old one)."""
    training = recipe.training
    training.per_device_train_batch_size = choice.per_device_train_batch_size
    training.gradient_accumulation_steps = choice.gradient_accumulation_steps
    training.activation_checkpointing = training.gradient_checkpointing = choice.gradient_checkpointing


def _candidate(tried: dict) -> str:
    return f"checkpointing {'on' if tried['gradient_checkpointing'] else 'off'}, batch {tried['batch']}"
