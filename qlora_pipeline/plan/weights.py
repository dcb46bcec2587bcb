"""Bytes of the weights and the training state: bitsandbytes' 4-/8-bit storage, and each optimizer's states per
trainable parameter."""

from __future__ import annotations

import math

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# bitsandbytes 4-bit storage (bitsandbytes.functional.quantize_4bit): one absmax per block of 64 values; with double
# quantization (use_bnb_nested_quant) the absmax values are themselves 8-bit, with a float32 absmax per 256 of them.
NF4_BLOCKSIZE = 64


NESTED_BLOCKSIZE = 256


# bitsandbytes 8-bit optimizers keep 32-bit states for tensors smaller than this (Optimizer8bit min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096


# Optimizer states per trainable parameter: (number of states, bytes each; None = the parameter's own dtype).
# bitsandbytes optimizers (8bit, paged, *_bnb) keep float32 states in 32-bit mode; torch's in the parameter's dtype.
OPTIMIZER_STATES = {
    "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None),
    "adamw_torch_xla": (2, None),
    "adamw_torch_npu_fused": (2, None),
    "adamw_anyprecision": (2, None),
    "stable_adamw": (2, None),
    "grokadamw": (2, None),
    "schedule_free_adamw": (2, None),
    "schedule_free_radam": (2, None),
    "adamw_torch_8bit": (2, 1),
    "adamw_torch_4bit": (2, 0.5),
    "adamw_bnb_8bit": (2, 1),
    "adamw_8bit": (2, 1),
    "paged_adamw_8bit": (2, 1),
    "paged_adamw_32bit": (2, 4),
    "ademamix": (3, None),
    "ademamix_8bit": (3, 1),
    "paged_ademamix_8bit": (3, 1),
    "paged_ademamix_32bit": (3, 4),
    "lion_8bit": (1, 1),
    "paged_lion_8bit": (1, 1),
    "lion_32bit": (1, 4),
    "paged_lion_32bit": (1, 4),
    "sgd": (0, None),
    "adagrad": (1, None),
    "rmsprop": (1, None),
    "rmsprop_bnb": (1, 4),
    "rmsprop_bnb_32bit": (1, 4),
    "rmsprop_bnb_8bit": (1, 1),
    "adafactor": (1, 4),  # factored in truth (rows + columns): counting it whole is an upper bound
}


ASSUMED_OPTIMIZER_STATES = (2, 4)


def quantized_linear_bytes(shapes: list[tuple[int, int]], quantization: str, weights_dtype: str) -> int:
    """Bytes bitsandbytes stores for the quantized Linear weights (code tables of ~100 bytes per layer left out)."""
    if quantization == "int8":  # int8 weights + a float32 scale per output row (SCB)
        return sum(out * inp + 4 * out for out, inp in shapes)
    if quantization == "none":
        return sum(out * inp for out, inp in shapes) * DTYPE_BYTES[weights_dtype]
    return sum(four_bit_bytes(out * inp, nested="double quant" in quantization) for out, inp in shapes)


def four_bit_bytes(numel: int, nested: bool) -> int:
    """NF4/FP4: two values a byte, one absmax per 64-value block: float32, or with double quantization 8-bit plus a
    float32 second-level absmax per 256 blocks."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) if nested else 4 * blocks
    return math.ceil(numel / 2) + absmax


def optimizer_name(optim) -> str:
    """The recipe's optim as its name ('paged_adamw_32bit'), whether given as a string or transformers' enum."""
    return str(getattr(optim, "value", optim))


def optimizer_state_bytes(optim: str, trainable: list[tuple[str, int]], param_bytes: int) -> tuple[int, str | None]:
    """Bytes of the optimizer's states for the trainable tensors, and a note if the optimizer is not in the table."""
    states, size = OPTIMIZER_STATES.get(optim, ASSUMED_OPTIMIZER_STATES)
    note = None
    if optim not in OPTIMIZER_STATES:
        note = f"optimizer '{optim}' is not in the planner's table: assumed 2 float32 states per parameter"
    total = 0
    for _, numel in trainable:
        # bitsandbytes keeps 32-bit states for small tensors even in its 8-bit optimizers
        each = 4 if size == 1 and numel < BNB_MIN_8BIT_SIZE else (param_bytes if size is None else size)
        total += states * numel * each
    return int(total), note
