"""The precision a run computes in, on the device it plans for: what mixed precision and the 4-bit compute dtype
become there."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """The dtypes a run uses on its device: what the recipe says, as load_recipe adapts it on a CPU."""

    device: str  # "cpu" or "cuda"
    weights_dtype: str  # non-quantized weights as loaded (float32/float16/bfloat16)
    mixed: str | None  # autocast dtype on CUDA (float16/bfloat16), None without mixed precision
    bnb_compute_dtype: str  # dtype 4-bit layers compute in

    @property
    def autocast(self) -> bool:
        return self.mixed is not None


def this_machine() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_for(recipe, device: str) -> Precision:
    """The dtypes of a run of `recipe` on `device`. On "cuda" the recipe's precision keys are taken as written
    (`Recipe.written`), since on a machine without CUDA load_recipe has already turned them into the CPU's."""
    if device == "cuda":
        fp16, bf16 = bool(recipe.written("fp16")), bool(recipe.written("bf16"))
        mixed = "bfloat16" if bf16 else "float16" if fp16 else None
        weights = recipe.written("dtype")
        compute = recipe.written("bnb_4bit_compute_dtype") or mixed or "float32"
    else:  # what recipe.checks.adapt_to_hardware does without CUDA: no mixed precision, 16-bit weights load in float32
        mixed = None
        weights = recipe.model.dtype
        weights = "float32" if weights in ("float16", "bfloat16") else weights
        compute = recipe.model.bnb_4bit_compute_dtype or "float32"
    return Precision(device, weights or "float32", mixed, compute)
