"""The share of positions that carry a label, estimated from the recipe's own data where it is local: the padded,
packed batches the run will see, sampled."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.data import samples
from qlora_pipeline.data.rows import quiet_progress
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.plan.activations import Batch
from qlora_pipeline.plan.logits import LossKernel

# The labelled share is estimated from this many examples of the recipe's data, in this many random batches.
LABEL_SAMPLE_EXAMPLES = 2000


LABEL_SAMPLE_BATCHES = 2048
# The worst batch a run meets is planned at this confidence: labelled columns per batch are heavy-tailed (packed
# rows of short answers), and a plan at the expected worst batch fell short of real runs (benchmarks/planner_check.py:
# 2 x 1024 tokens, 5 steps: 348 columns expected, the run's worst batch had 485, and the growth was under-predicted
# by 13-16%). A memory plan that guards against running out plans for the batch the run meets 9 times in 10.
WORST_BATCH_CONFIDENCE = 0.9


@dataclass(frozen=True)
class LabelShare:
    """How much of a batch carries a label, in the worst of many batches drawn from the recipe's data."""

    columns: float  # share of next-token columns where some row of the batch has a label
    positions: float  # share of next-token positions with a label
    source: str

    def for_kernel(self, kernel: LossKernel) -> float:
        return self.columns if kernel.positions == "labelled-columns" else self.positions


def estimate_label_share(recipe, rows: int, length: int, cache: dict | None = None) -> LabelShare:
    """The labelled share of the run's worst batch: LABEL_SAMPLE_BATCHES random batches of `rows` rows (seeded by
    the recipe) drawn from the first LABEL_SAMPLE_EXAMPLES training examples, as the pipeline's own code tokenizes,
    templates, masks and packs them, give the distribution of one batch; the largest of as many batches as the run
    trains on stays at or under `worst_of` with probability WORST_BATCH_CONFIDENCE. A short run meets fewer batches,
    so its worst one is milder. Raises PipelineError where the data or tokenizer cannot be had locally. `cache`
    keeps the tokenized rows by length, for planning many batch sizes."""
    import numpy as np

    data = recipe.data
    for path in data.dataset_paths:
        if not (samples.is_embedded(path) or Path(path).expanduser().exists()):
            raise PipelineError(f"{path} is on the Hub, not downloaded to plan")
    name = data.data_label
    cache = {} if cache is None else cache
    if length not in cache:
        try:
            cache[length] = labelled_matrix(recipe, length)
        except PipelineError as exc:  # remembered too: planning many batch sizes tries once
            cache[length] = exc
    if isinstance(cache[length], PipelineError):
        raise cache[length]
    labelled, truncated = cache[length]
    rng = np.random.default_rng(recipe.training.seed)
    columns, positions = [], []
    for _ in range(LABEL_SAMPLE_BATCHES):
        batch = labelled[rng.choice(len(labelled), size=min(rows, len(labelled)), replace=False)]
        columns.append(int(batch.any(axis=0).sum()))
        positions.append(int(batch.sum()))
    run = batches_in_run(recipe.training, len(labelled), rows, truncated)
    source = (
        f"the worst of the run's {run} batches of {rows} ({WORST_BATCH_CONFIDENCE:.0%} confidence), from "
        f"{len(labelled)} {'packed rows' if recipe.training.packing else 'examples'} of {name}"
    )
    return LabelShare(worst_of(columns, run) / (length - 1), worst_of(positions, run) / (rows * (length - 1)), source)


def worst_of(samples: list[int], draws: int, confidence: float = WORST_BATCH_CONFIDENCE) -> float:
    """The value the largest of `draws` independent draws stays at or under with probability `confidence`, under the
    samples' empirical distribution F: the smallest sample x with F(x)^draws >= confidence."""
    ordered = sorted(samples)
    size = len(ordered)
    wanted = confidence ** (1 / draws)
    return next((value for i, value in enumerate(ordered, start=1) if i / size >= wanted), ordered[-1])


def batches_in_run(training, rows_in_sample: int, rows: int, truncated: bool) -> int:
    """Micro-batches the run trains on: max_steps x accumulation, else epochs over the rows (over the sample's rows
    when it holds all the data; else at least LABEL_SAMPLE_BATCHES)."""
    if training.max_steps and training.max_steps > 0:
        return training.max_steps * (training.gradient_accumulation_steps or 1)
    batches = math.ceil(training.num_train_epochs * math.ceil(rows_in_sample / rows))
    return max(batches, LABEL_SAMPLE_BATCHES) if truncated else max(1, batches)


def labelled_matrix(recipe, length: int):
    """[rows, length - 1] booleans: which next-token positions of each training row have a label, as the trainer
    sees them (packed rows under packing, else examples); and whether the sample left training rows out."""
    import copy

    import numpy as np

    from qlora_pipeline.data import packing
    from qlora_pipeline.tasks import prepare_data

    limit = recipe.data.max_train_samples
    capped = limit is None or limit > LABEL_SAMPLE_EXAMPLES
    sample = dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, max_train_samples=LABEL_SAMPLE_EXAMPLES if capped else limit),
        training=copy.copy(recipe.training),
    )
    sample.training.max_length = length
    with quiet_progress():
        prepared = prepare_data(sample)
        dataset = prepared.train.dataset.remove_columns(["n_tokens"])
        completion_only = recipe.training.completion_only_loss is not False
        if recipe.training.packing:
            rows = packing.pack(dataset, length, completion_only)["labels"]
        else:
            rows = [
                [token if keep or not completion_only else -100 for token, keep in zip(ids, mask)]
                for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"])
            ]
    labelled = np.zeros((len(rows), length - 1), dtype=bool)
    for index, labels in enumerate(rows):
        next_labels = np.asarray(labels[1:length], dtype=np.int64)  # position p predicts token p + 1
        labelled[index, : len(next_labels)] = next_labels != -100
    truncated = capped and bool((prepared.accounting or {}).get("unused"))
    return labelled, truncated


def label_share(
    recipe, kernel: LossKernel, batch: Batch, labelled_fraction: float | None, cache: dict | None = None
) -> tuple[float, str]:
    """The labelled share to plan with and where it came from: as given, else read from the data, else 1."""
    if labelled_fraction is not None:
        return labelled_fraction, "given"
    if kernel.positions == "all":
        return 1.0, "every position is scored"
    if recipe.training.completion_only_loss is False:
        return 1.0, "completion_only_loss is off: every position has a label"
    try:
        share = estimate_label_share(recipe, batch.rows, batch.length, cache)
    except PipelineError as exc:
        return 1.0, f"assumed, an upper bound: {exc}"
    return share.for_kernel(kernel), share.source
