"""LoRA dropout on a CPU with a quarter of the random draws.

peft applies `nn.Dropout` to the input of every LoRA layer: a fresh Bernoulli mask over the whole activation
(batch x length x width) for each of a decoder layer's seven adapted projections, drawn again when gradient
checkpointing recomputes the layer. On a GPU that mask is a fused Philox kernel and costs nothing next to the
matmuls; on a CPU torch draws one Mersenne-Twister number per element, serially, and the profile of a
Starling-shaped step (docs/performance.md) showed the masks at about a quarter of the step, as long as the adapted
layers' own matmuls. `WordDropout` draws one 64-bit word per four elements and takes 15 bits of it for each: the same
Bernoulli mask, with the drop probability rounded to a multiple of 1/32768 (0.05 becomes 0.049988) and the kept values
scaled by the exact inverse of the keep probability, so the expectation is unchanged. It draws from torch's CPU
generator like nn.Dropout, so the seed, a checkpoint's saved RNG state (exact resume) and the recomputation under
gradient checkpointing (which replays the RNG state) give the same masks as before.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 15  # 15 random bits per element: four elements per 64-bit word, top bit of each 16 masked off


class WordDropout(nn.Module):
    """Dropout whose mask takes 15 random bits per element from 64-bit random words (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * _LEVELS)  # an element is dropped when its 15 bits fall below this
        self.scale = _LEVELS / (_LEVELS - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        count = x.numel()
        words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_()
        keep = words.view(torch.int16)[:count].bitwise_and_(_LEVELS - 1) >= self.threshold
        # where() keeps only the boolean mask for the backward, one byte an element as nn.Dropout; a product with
        # the mask would first copy it to x's dtype (measured: three times slower).
        return torch.where(keep.view(x.shape), x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}, effective p={self.threshold / _LEVELS:.6f}"


def use_word_dropout(model) -> int:
    """Replace the dropout of every LoRA layer whose weights are on the CPU with WordDropout of the same p. Returns how
    many were replaced (0 on a GPU, or where lora_dropout is 0)."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            lora_a = getattr(module, "lora_A", {})
            on_cpu = name in lora_a and lora_a[name].weight.device.type == "cpu"
            if on_cpu and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = WordDropout(dropout.p)
                count += 1
    return count
