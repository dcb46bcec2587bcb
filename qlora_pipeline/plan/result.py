"""The plan itself: each part of a training step's peak memory, in bytes, and the totals read from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training process, in bytes, one field per component.

    `total` is what the device must hold at the peak of a training step: every row added up.
    `loaded_model` is what is in memory once the model is loaded, quantized and wrapped in LoRA, before training.
    `training_growth` is what the training step adds on top of that: gradients, optimizer states, activations, logits
    and (on CPU) the step overhead. It is meant to be compared with the measured growth of memory over training:
      on CPU, the process's peak resident set during `trainer.train()` (sampled from /proc/self/statm, or
      ru_maxrss) minus its resident set right before `trainer.train()` is called (model loaded, trainer built);
      on CUDA, torch.cuda.max_memory_allocated() during training minus torch.cuda.memory_allocated() right before it.
    """

    quantized_weights: int
    other_weights: int
    kbit_upcast: int
    lora_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    allocator_retention: int
    step_overhead: int
    cuda_context: int
    # What was planned: the settings and counts the rows come from.
    device: str
    model: str
    config_source: str
    batch_size: int
    max_length: int
    tokens_per_batch: int
    scored_positions: int
    labelled_fraction: float
    labelled_source: str
    vocab: int
    gradient_checkpointing: bool
    quantization: str
    weights_dtype: str
    mixed_precision: str | None
    optimizer: str
    loss_kernel: str
    parameters: int
    quantized_parameters: int
    other_parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    ROWS = (
        "quantized_weights",
        "other_weights",
        "kbit_upcast",
        "lora_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "allocator_retention",
        "step_overhead",
        "cuda_context",
    )
    GROWTH_ROWS = ("gradients", "optimizer_states", "activations", "logits", "allocator_retention", "step_overhead")

    @property
    def total(self) -> int:
        return sum(getattr(self, row) for row in self.ROWS)

    @property
    def training_growth(self) -> int:
        return sum(getattr(self, row) for row in self.GROWTH_ROWS)

    @property
    def loaded_model(self) -> int:
        return self.total - self.training_growth

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.update(total=self.total, loaded_model=self.loaded_model, training_growth=self.training_growth)
        return values
