"""Bytes of the loss's [positions, vocab] buffers at their peak, for the loss kernel the run uses and the positions it
scores (those with a label)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_pipeline.plan.activations import Batch
from qlora_pipeline.plan.model_facts import ModelFacts
from qlora_pipeline.plan.weights import DTYPE_BYTES

# TRL's chunked log-prob loss (trl.kernels.chunked_logprob): tiles of this many positions x this many vocab columns.
LOSS_TOKEN_TILE = 4096


LOSS_VOCAB_TILE = 32768


@dataclass(frozen=True)
class LossKernel:
    """How the loss materializes logits: for which positions it projects the hidden state onto the vocabulary, in
    tiles of how many positions, and how many bytes per [position, vocab] entry are live at its peak.

    positions: "all" (every position), "labelled" (only positions whose next token has a label), or
    "labelled-columns" (every row of the batch at each position where some row has a label)."""

    name: str
    positions: str
    tile_positions: int | None  # None: all at once
    bytes_per_logit: float | None  # None: the size of the compute dtype (one tile, worked on in place)


# The pipeline's loss (qlora_pipeline/training/trainer.py): logits_to_keep = the labelled columns, float32 logits, plain
# cross-entropy; its peak is in the forward, as the metrics run: the logits, the log-softmax cross-entropy keeps,
# and the metrics' log-softmax, its exp and their product: 5 float32 values a logit (measured: 5.05-5.09).
PIPELINE_LOSS = LossKernel(
    "cross-entropy on the labelled positions (qlora_pipeline/training/trainer.py)", "labelled-columns", None, 5 * 4
)


# TRL 1.16 SFTTrainer.compute_loss → add_fused_lm_head → ChunkedLogProbFunction, for what the pipeline's loss leaves to
# it. Without Triton (CPU) it projects every position and its torch backward (_backward_tile) holds 8 float32
# [positions, vocab] tensors and a boolean one at once (measured: 8.8-9.3).
TRL_CHUNKED_TORCH = LossKernel("TRL chunked log-probs, torch tiles (no Triton)", "all", LOSS_TOKEN_TILE, 8 * 4 + 1)


# With Triton (CUDA) only labelled positions are projected, and the kernels work on one tile in place.
TRL_CHUNKED_TRITON = LossKernel("TRL chunked log-probs, Triton tiles", "labelled", LOSS_TOKEN_TILE, None)


def logits_buffer_bytes(positions: int, vocab: int, bytes_per_logit: float) -> int:
    """The loss's logits at their peak: positions x vocab entries, each holding `bytes_per_logit` bytes across every
    buffer live at once (logits, softmax, gradient, temporaries). The one term to recalibrate if the loss changes."""
    return int(positions * vocab * bytes_per_logit)


def scored_positions(kernel: LossKernel, batch: Batch, labelled_fraction: float) -> int:
    """Positions the loss projects at once (in its largest tile). `labelled_fraction`: the share of positions with
    a label ("labelled"), or of columns where some row has one ("labelled-columns")."""
    if kernel.positions == "all":
        positions = batch.positions
    elif kernel.positions == "labelled" or batch.flattened:
        positions = math.ceil(batch.positions * labelled_fraction)
    else:
        positions = batch.rows * math.ceil((batch.length - 1) * labelled_fraction)
    return min(positions, kernel.tile_positions) if kernel.tile_positions else positions


def loss_bytes(facts: ModelFacts, kernel: LossKernel, batch: Batch, labelled_fraction: float) -> int:
    """The logits buffers, plus the 16-bit copy of the output head autocast makes (the head is float32 after
    prepare_model_for_kbit_training) and keeps for the backward pass."""
    compute = DTYPE_BYTES[facts.precision.mixed or "float32"]
    per_logit = kernel.bytes_per_logit if kernel.bytes_per_logit is not None else compute
    vocab = min(facts.vocab, LOSS_VOCAB_TILE) if kernel.tile_positions else facts.vocab
    logits = logits_buffer_bytes(scored_positions(kernel, batch, labelled_fraction), vocab, per_logit)
    head_bytes = 4 if facts.quantization != "none" else DTYPE_BYTES[facts.precision.weights_dtype]
    head_copy = facts.vocab * facts.hidden * compute if facts.precision.autocast and compute != head_bytes else 0
    return logits + head_copy
