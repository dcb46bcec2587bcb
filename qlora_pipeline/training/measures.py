"""What a training run measures about itself: memory in use and at its peak, the share of real tokens in the
batches, how the launcher spread it."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def non_padding_fraction(trainer, max_batches: int = 32) -> float | None:
    """Share of real tokens in the training batches, from the first batches in dataset order (no RNG used): what
    padding each batch to its longest row (packed) or example (unpacked) costs."""
    dataset, collate = trainer.train_dataset, trainer.data_collator
    size = trainer.args.per_device_train_batch_size
    real = total = 0
    for start in range(0, min(len(dataset), size * max_batches), size):
        batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        total += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        if mask is None:  # packed rows carry no mask: their padding is the pad token
            mask = batch["input_ids"] != trainer.processing_class.pad_token_id
        real += int(mask.sum())
    return round(real / total, 4) if total else None


def current_memory_mib() -> float | None:
    """Memory in use now: allocated GPU memory, else this process's resident set (Linux)."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.memory_allocated() / 2**20, 1)
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def zero3(trainer) -> bool:
    if not trainer.is_deepspeed_enabled:
        return False
    plugin = trainer.accelerator.state.deepspeed_plugin
    return bool(plugin and plugin.zero_stage == 3)


def launcher_summary(trainer) -> dict:
    """How the run was spread: accelerate's distributed type and each rank's process id, so a run that silently fell
    back to one process shows it. Every rank must call it (it gathers)."""
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    return {
        "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1],
        "processes": accelerator.num_processes,
        "ranks": gather_object([{"rank": accelerator.process_index, "pid": os.getpid()}]),
    }
