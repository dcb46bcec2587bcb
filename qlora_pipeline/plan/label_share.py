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


@dataclass(frozen=True)
class LabelShare:
    """How much of a batch carries a label, in the worst of many batches drawn from the recipe's data."""

    columns: float  # share of next-token columns where some row of the batch has a label
    positions: float  # share of next-token positions with a label
    source: str

    def for_kernel(self, kernel: LossKernel) -> float:
        return self.columns if kernel.positions == "labelled-columns" else self.positions


def estimate_label_share(recipe, rows: int, length: int, cache: dict | None = None) -> LabelShare:
    """The labelled share of the run's worst batch, expected: LABEL_SAMPLE_BATCHES random batches of `rows` rows
    (seeded by the recipe) drawn from the first LABEL_SAMPLE_EXAMPLES training examples, as the pipeline's own code
    tokenizes, templates, masks and packs them, give the distribution of one batch; the largest of as many batches
    as the run trains on is expected at `expected_maximum`. A short run meets fewer batches, so its worst one is
    milder. Raises PipelineError where the data or tokenizer cannot be had locally. `cache` keeps the tokenized rows
    by length, for planning many batch sizes."""
    import numpy as np

    name = recipe.data.dataset_name
    if not (samples.is_embedded(name) or Path(name).expanduser().exists()):
        raise PipelineError(f"{name} is on the Hub, not downloaded to plan")
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
        f"the expected worst of the run's {run} batches of {rows}, from {len(labelled)} "
        f"{'packed rows' if recipe.training.packing else 'examples'} of {name}"
    )
    return LabelShare(
        expected_maximum(columns, run) / (length - 1), expected_maximum(positions, run) / (rows * (length - 1)), source
    )


def expected_maximum(samples: list[int], draws: int) -> float:
    """E[max of `draws` independent values] under the samples' empirical distribution: the i-th smallest of M
    samples is the maximum with probability (i/M)^draws - ((i-1)/M)^draws."""
    ordered = sorted(samples)
    size = len(ordered)
    return sum(value * ((i / size) ** draws - ((i - 1) / size) ** draws) for i, value in enumerate(ordered, start=1))


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
