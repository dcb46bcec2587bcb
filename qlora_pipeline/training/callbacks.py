"""Trainer callbacks of every training run: the metrics file, the checkpoint on SIGINT/SIGTERM, the adapter's dtype
on resume."""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

from qlora_pipeline.training.measures import current_memory_mib


class MetricsFile(TrainerCallback):
    """Appends every trainer log (loss, learning rate, grad norm, eval loss…) to metrics.jsonl on the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs, "memory_mib": current_memory_mib()}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM during training: finish the optimizer step under way, save checkpoint-N through the Trainer's
    own path (weights, optimizer, scheduler, RNG, trainer state), then stop.

    Used as a context manager around `trainer.train()`: the handlers are installed on entry and the previous ones put
    back on exit. The handler only records the signal and puts the previous handlers back at once, so a second
    signal acts as it would without us (SIGINT: KeyboardInterrupt, SIGTERM: terminate): a hard stop. With several
    processes the ranks agree on the stop step (an all-reduce MAX of the signal number at each step end), since a
    rank that stopped alone would leave the others waiting in DDP forever. A signal during the last step finds the
    training complete (`finished`): the run then ends as usual, since a resume from the last step would train one
    step past max_steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, distributed: bool = False, announce: bool = True):
        self.distributed = distributed
        self.announce = announce  # print the "stopping" line (main process only)
        self.received = 0  # the signal this process caught, 0 if none
        self.signum = 0  # the signal training stopped on (agreed by all ranks), 0 if it did not
        self.stopped_at: int | None = None  # the global step whose checkpoint holds the stop
        self.finished = False  # the stop came at the last step: training was complete anyway
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored (nohup, background job): stays so
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        self._restore()
        return False

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        self._restore()
        if self.announce:  # os.write: a signal may land in the middle of a print
            os.write(
                2,
                f"\n{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint "
                f"(send it again to stop at once, without one)\n".encode(),
            )

    def _check(self, args, state, control) -> None:
        if self.signum:
            return
        signum = self.received
        if self.distributed:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([signum], dtype=torch.int64, device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signum = int(flag.item())
        if signum:
            self.signum, self.stopped_at = signum, state.global_step
            self.finished = state.global_step >= state.max_steps
            control.should_save = True
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        self._check(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer saves after on_epoch_end too: a signal during the last step of an epoch stops there.
        self._check(args, state, control)


def keep_adapter_dtype(model) -> None:
    """On --resume the Trainer reloads the adapter with PEFT's load_adapter, which by default upcasts bf16/fp16
    adapter weights to float32, while TRL trains a QLoRA adapter in bf16. Loaded in the dtype it was trained in, the
    resumed run (optimizer state included) continues exactly where the interrupted one stopped."""
    load_adapter = getattr(model, "load_adapter", None)
    if load_adapter is not None and "autocast_adapter_dtype" in inspect.signature(load_adapter).parameters:
        model.load_adapter = functools.partial(load_adapter, autocast_adapter_dtype=False)
