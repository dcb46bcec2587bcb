"""Sizes read and written for people: `--gpu-memory 24GiB` parsed, the plan printed as a table."""

from __future__ import annotations

from qlora_pipeline import sizes
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.plan.result import MemoryPlan
from qlora_pipeline.sizes import GIB, MIB


def parse_size(text: str) -> int:
    """--gpu-memory's value in bytes (qlora_pipeline/sizes.py); a bad one is a one-line error."""
    try:
        return sizes.parse_size(text, "--gpu-memory")
    except ValueError as exc:
        raise PipelineError(str(exc)) from None


def human(size: float) -> str:
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB"


def count(number: int) -> str:
    """A parameter count: 6.98 B, 262.4 M, 131.1 K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= size:
            return f"{number / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(number)


def linear_weights_label(plan: MemoryPlan) -> str:
    params = f"{count(plan.quantized_parameters)} params"
    if plan.quantization == "none":
        return f"linear weights ({plan.weights_dtype}, not quantized, {params})"
    if plan.quantization == "int8":
        return f"quantized linear weights (int8 + row scales, {params})"
    kind = plan.quantization.replace("nf4", "NF4").replace("fp4", "FP4")
    return f"quantized linear weights ({kind}, {params})"


def row_labels(plan: MemoryPlan) -> dict[str, str]:
    return {
        "quantized_weights": linear_weights_label(plan),
        "other_weights": f"embeddings, norms, lm_head ({plan.weights_dtype}, {count(plan.other_parameters)})",
        "kbit_upcast": "  + their float32 upcast (prepare_model_for_kbit_training)",
        "lora_weights": f"LoRA adapter ({count(plan.trainable_parameters)} params)",
        "gradients": "gradients (trainable parameters)",
        "optimizer_states": f"optimizer states ({plan.optimizer})",
        "activations": "activations ("
        + ("gradient checkpointing" if plan.gradient_checkpointing else "no gradient checkpointing")
        + f", {plan.tokens_per_batch} tokens)",
        "logits": f"logits ({plan.scored_positions} positions x vocab)",
        "allocator_retention": "freed activations malloc keeps resident (CPU)",
        "step_overhead": "runtime overhead of a training step (CPU)",
        "cuda_context": "CUDA context and workspaces (assumed)",
    }


def format_plan(plan: MemoryPlan, budget: int | None = None, largest: int | None = None) -> str:
    labels = row_labels(plan)
    precision = f"{plan.mixed_precision} mixed precision" if plan.mixed_precision else "no mixed precision"
    lines = [
        f"model       {plan.model} ({count(plan.parameters)} parameters; config from {plan.config_source})",
        f"device      {plan.device}: {precision}, weights load in {plan.weights_dtype}",
        f"batch       {plan.batch_size} per device x {plan.max_length} tokens, gradient checkpointing "
        + ("on" if plan.gradient_checkpointing else "off"),
        f"loss        {plan.loss_kernel}: {plan.scored_positions} positions x {plan.vocab} vocab at once",
        f"labelled    {plan.labelled_fraction:.0%} of the positions ({plan.labelled_source})",
        "",
    ]
    width = max(len(label) for label in labels.values())
    for row in MemoryPlan.ROWS:
        value = getattr(plan, row)
        if value:
            lines.append(f"{labels[row]:<{width}}  {human(value):>11}")
    lines.append("-" * (width + 13))
    lines.append(f"{'total (peak of a training step)':<{width}}  {human(plan.total):>11}")
    lines.append(f"{'  loaded model':<{width}}  {human(plan.loaded_model):>11}")
    lines.append(f"{'  training growth':<{width}}  {human(plan.training_growth):>11}")
    if budget is not None:
        verdict = (
            f"fits ({human(budget - plan.total)} to spare)"
            if plan.total <= budget
            else f"does NOT fit ({human(plan.total - budget)} short)"
        )
        lines += ["", f"GPU memory  {human(budget)}: {verdict}"]
        lines.append(
            f"largest per-device batch that fits: {largest} (at {plan.max_length} tokens)"
            if largest
            else f"largest per-device batch that fits: none, even batch 1 at {plan.max_length} tokens is too large"
        )
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
