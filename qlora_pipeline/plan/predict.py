"""The prediction: the recipe's model facts, precision and batch into a `MemoryPlan`, and the largest batch a budget
allows."""

from __future__ import annotations

from qlora_pipeline.plan.activations import Batch, activation_bytes, allocator_retention_bytes
from qlora_pipeline.plan.label_share import label_share
from qlora_pipeline.plan.logits import PIPELINE_LOSS, LossKernel, loss_bytes, scored_positions
from qlora_pipeline.plan.model_facts import ModelFacts, model_facts
from qlora_pipeline.plan.precision import Precision, precision_for, this_machine
from qlora_pipeline.plan.result import MemoryPlan
from qlora_pipeline.plan.weights import DTYPE_BYTES, optimizer_name, optimizer_state_bytes, quantized_linear_bytes
from qlora_pipeline.sizes import MIB

# What the runtime adds beyond tensors. On CPU: the growth of a batch of 1 x 128 tokens less the tensors counted for it
# (docs/performance.md): code pages faulted in by the first backward, autograd and allocator bookkeeping.
CPU_STEP_OVERHEAD = 64 * MIB


# On CUDA: the context and cuBLAS workspaces. An assumption (not calibrated here, no GPU): typical of torch 2.x on a
# recent data-centre GPU. It counts against --gpu-memory but is not part of torch.cuda.max_memory_allocated.
CUDA_CONTEXT = 512 * MIB


def predict(
    recipe,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    labelled_fraction: float | None = None,
    precision: Precision | None = None,
    loss_kernel: LossKernel | None = None,
    gradient_checkpointing: bool | None = None,
) -> MemoryPlan:
    """Predict the peak memory of training `recipe` on one device, from its model's config alone (meta device).

    device: "cpu" or "cuda" (default: this machine's). On "cuda" the recipe's fp16/bf16 and dtype are taken as the
    recipe file and command line give them (on a CPU machine load_recipe has switched them off); pass `precision`
    (see `precision_for`) to plan other values. batch_size, max_length: the per-device batch and sequence length
    (default: the recipe's). labelled_fraction: the share of a batch's positions the loss computes logits for (with
    the pipeline's loss: the columns where some row of the batch has a label); default: estimated from the recipe's
    data where it is local (`estimate_label_share`), else 1.0, an upper bound. loss_kernel: PIPELINE_LOSS (default)
    or one of TRL's (TRL_CHUNKED_TORCH, TRL_CHUNKED_TRITON). gradient_checkpointing: on or off (default: the
    recipe's).

    The returned plan's `training_growth` is meant to be compared with the measured growth of memory over training:
    on CPU the peak resident set during `trainer.train()` minus the resident set right before it; on CUDA
    torch.cuda.max_memory_allocated() during training minus torch.cuda.memory_allocated() right before it."""
    device = device or this_machine()
    facts = model_facts(recipe, precision or precision_for(recipe, device))
    return plan_from_facts(
        facts,
        recipe,
        batch_size=batch_size,
        max_length=max_length,
        labelled_fraction=labelled_fraction,
        loss_kernel=loss_kernel,
        gradient_checkpointing=gradient_checkpointing,
    )


def plan_from_facts(
    facts: ModelFacts,
    recipe,
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    labelled_fraction: float | None = None,
    loss_kernel: LossKernel | None = None,
    gradient_checkpointing: bool | None = None,
) -> MemoryPlan:
    """The plan for one batch shape, from model facts counted once (see `predict`)."""
    training = recipe.training
    precision = facts.precision
    notes = list(facts.notes)
    length = max_length or training.max_length
    if length is None:
        length = 1024
        notes.append(f"the recipe sets no max_length: planned for {length} tokens")
    rows = batch_size or training.per_device_train_batch_size
    batch = Batch(rows, length, flattened=bool(training.padding_free))
    kernel = loss_kernel or PIPELINE_LOSS
    fraction, fraction_source = label_share(recipe, kernel, batch, labelled_fraction, facts.labelled_rows)
    checkpointing = bool(training.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing)

    weights_bytes = DTYPE_BYTES[precision.weights_dtype]
    trainable_bytes = DTYPE_BYTES[facts.trainable_dtype]
    trainable = sum(numel for _, numel in facts.trainable)
    optim = optimizer_name(training.optim)
    optimizer, note = optimizer_state_bytes(optim, facts.trainable, trainable_bytes)
    if note:
        notes.append(note)
    upcast = 0
    if facts.quantization != "none":  # prepare_model_for_kbit_training: 16-bit non-quantized weights → float32
        upcast = facts.other_parameters * max(0, 4 - weights_bytes)
    return MemoryPlan(
        quantized_weights=quantized_linear_bytes(facts.quantized_shapes, facts.quantization, precision.weights_dtype),
        other_weights=facts.other_parameters * weights_bytes,
        kbit_upcast=upcast,
        lora_weights=trainable * trainable_bytes if recipe.model.use_peft else 0,
        gradients=trainable * trainable_bytes,
        optimizer_states=optimizer,
        activations=activation_bytes(facts, batch, checkpointing),
        logits=loss_bytes(facts, kernel, batch, fraction),
        allocator_retention=allocator_retention_bytes(facts, batch) if precision.device == "cpu" else 0,
        step_overhead=CPU_STEP_OVERHEAD if precision.device == "cpu" else 0,
        cuda_context=CUDA_CONTEXT if precision.device == "cuda" else 0,
        device=precision.device,
        model=facts.name,
        config_source=facts.config_source,
        batch_size=rows,
        max_length=length,
        tokens_per_batch=batch.tokens,
        scored_positions=scored_positions(kernel, batch, fraction),
        labelled_fraction=fraction,
        labelled_source=fraction_source,
        vocab=facts.vocab,
        gradient_checkpointing=checkpointing,
        quantization=facts.quantization,
        weights_dtype=precision.weights_dtype,
        mixed_precision=precision.mixed,
        optimizer=optim,
        loss_kernel=kernel.name,
        parameters=facts.parameters,
        quantized_parameters=facts.quantized_parameters,
        other_parameters=facts.other_parameters,
        trainable_parameters=trainable,
        notes=notes,
    )


def largest_batch_size(facts: ModelFacts, recipe, budget: int, **kwargs) -> int:
    """The largest per-device batch whose plan fits in `budget` bytes (0 if not even one row fits)."""

    def fits(rows: int) -> bool:
        return plan_from_facts(facts, recipe, batch_size=rows, **kwargs).total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):  # the total grows with the batch: double until it no longer fits, then bisect
        low, high = high, high * 2
        if high > 1 << 20:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
