"""The launcher a run is under, read from the environment `accelerate launch` sets, and what the recipe must change
for it. Checked with the recipe, before any model loads.

The traps this module exists for: `device_map="auto"` turning DDP into one process spread over every GPU; FSDP
refusing to shard 4-bit weights whose storage dtype differs from the other parameters'; accelerate quietly running
N independent single-process trainings on a CPU box; and an FSDP config on a machine without CUDA, where accelerate
1.x falls back to plain data parallelism (its AcceleratorState turns FSDP on only for GPU-type devices).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qlora_pipeline.errors import RecipeError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Launcher:
    kind: str  # "single", "ddp", "fsdp" or "deepspeed"
    processes: int
    zero_stage: int | None = None
    fsdp_version: int | None = None
    fsdp_activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}" if self.kind == "deepspeed" else self.kind.upper()

    @property
    def sharded(self) -> bool:
        """The weights themselves are split over ranks (FSDP, ZeRO-3): no rank holds a whole model."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)


def detect() -> Launcher:
    """The launcher of this process, from accelerate's environment variables (torchrun's WORLD_SIZE for the count)."""
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return Launcher("deepspeed", processes, zero_stage=int(stage) if stage and stage.isdigit() else None)
    if _flag("ACCELERATE_USE_FSDP"):
        return Launcher(
            "fsdp",
            processes,
            fsdp_version=int(os.environ.get("FSDP_VERSION", "1")),
            fsdp_activation_checkpointing=_flag("FSDP_ACTIVATION_CHECKPOINTING"),
        )
    return Launcher("ddp" if processes > 1 else "single", processes)


def adapt(values: dict[str, Any], cuda: bool, fail) -> list[str]:
    """Fit the merged recipe values to the launcher; `fail(key, message)` raises for what cannot work. Returns notes."""
    launcher = detect()
    notes: list[str] = []
    quantized = values["load_in_4bit"] or values["load_in_8bit"]
    if launcher.kind == "fsdp" and not cuda:
        raise RecipeError(
            "accelerate launch: an FSDP config needs CUDA GPUs; on CPU processes accelerate would train with plain "
            "data parallelism and say nothing. Use launch/cpu/ddp.yaml on this machine"
        )
    if launcher.sharded and values["load_in_8bit"]:
        fail("load_in_8bit", f"{launcher.name} cannot shard 8-bit bitsandbytes weights; use load_in_4bit (QLoRA)")
    if launcher.sharded and values["load_in_4bit"]:
        # FSDP and ZeRO-3 shard parameters grouped by dtype: the packed 4-bit weights must be stored in the dtype of
        # the rest of the model (the non-quantized embeddings, norms and LoRA weights).
        dtype = values["dtype"] if values["dtype"] not in (None, "auto") else "float32"
        storage = values.get("bnb_4bit_quant_storage")
        if storage in (None, "uint8"):
            values["bnb_4bit_quant_storage"] = dtype
            notes.append(f"{launcher.name}: 4-bit weights are stored as {dtype} so they shard with the rest")
        elif storage != dtype:
            fail(
                "bnb_4bit_quant_storage",
                f"is {storage} but the model loads in {dtype}; {launcher.name} needs both equal",
            )
    if launcher.fsdp_activation_checkpointing and values["gradient_checkpointing"]:
        values["gradient_checkpointing"] = False
        notes.append("FSDP checkpoints activations itself (fsdp_activation_checkpointing): the recipe's is off")
    if launcher.kind == "deepspeed":
        # Values the accelerate config fixes must agree with the recipe, or the Trainer stops after loading the model.
        fixed = os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
        for field, env, key in (
            ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps"),
            ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", "max_grad_norm"),
        ):
            if field in fixed and os.environ.get(env) and float(os.environ[env]) != float(values[key]):
                fail(
                    key,
                    f"is {values[key]} but the accelerate config sets {field}: {os.environ[env]}; "
                    f"remove {field} from the config (the recipe's value is then used) or make them equal",
                )
    if launcher.kind == "deepspeed" and not cuda:
        # accelerate drops DeepSpeed when use_cpu is set; DeepSpeed's own CPU accelerator runs the processes, and
        # without a named backend accelerate would count each of them as rank 0 of 1.
        values["use_cpu"] = False
        values["ddp_backend"] = values.get("ddp_backend") or "gloo"
    if launcher.processes > 1 and not launcher.sharded:
        notes.append(
            f"{launcher.name}: {launcher.processes} processes, each holding a whole copy of the model"
            + (" (4-bit)" if quantized else "")
        )
    return notes


def device_map(use_cpu: bool) -> dict | None:
    """Where the base model loads. One whole copy per process, `{"": local_rank}`, under DDP and ZeRO-1/2 (never
    "auto", which spreads one copy over every GPU of the node and turns DDP into one process); None under FSDP and
    ZeRO-3, which place and shard the weights themselves."""
    import torch

    launcher = detect()
    if launcher.sharded:
        return None
    if use_cpu or not torch.cuda.is_available():
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}
