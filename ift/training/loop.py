"""Pieces of the training loop that are not the recipe: accumulation windows, when gradients synchronise, and
the stop signal every process obeys together."""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator


@dataclass
class Window:
    """One optimizer step's worth of micro-batches, reduced over every process."""

    loss_sum: float = 0.0  # summed token losses
    loss_tokens: int = 0
    seq_tokens: int = 0  # every non-padding token: the throughput figure
    stop: bool = False  # a stop signal reached some process
    grad_norm: Any = None  # the last step's gradient norm before clipping, a device tensor (read when logged)

    def __add__(self, later: "Window") -> "Window":
        """Windows summed for logging: the later one's gradient norm and stop flag."""
        return Window(self.loss_sum + later.loss_sum, self.loss_tokens + later.loss_tokens,
                      self.seq_tokens + later.seq_tokens, later.stop, later.grad_norm)


    def log_entry(self, step: int, seconds: float, learning_rate: float) -> dict:
        """What a logged step records in the run's history: mean token loss, rate, throughput, gradient norm."""
        entry = {"step": step, "train_loss": self.loss_sum / max(self.loss_tokens, 1), "learning_rate": learning_rate,
                 "tokens_per_second": self.seq_tokens / max(seconds, 1e-9)}
        if self.grad_norm is not None:
            entry["grad_norm"] = float(self.grad_norm)
        return entry


class Stop(Exception):
    """A stop signal reached some process: save a checkpoint, then exit (every process together)."""


def accumulation_windows(batches: Iterable, size: int) -> Iterator[list]:
    """Group micro-batches into accumulation windows (the last one may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def gradient_sync(accelerator, model, last: bool):
    """No gradient all-reduce until the window's last micro-batch."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine accumulates itself and steps at the boundary Accelerate tells it of; Accelerate
        # has no public setter for that flag outside `accumulate()`, whose dataloader coupling we avoid
        accelerator.gradient_state._set_sync_gradients(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def stop_handlers() -> Callable[[], bool]:
    """SIGTERM / Ctrl-C: finish the current step, save a checkpoint, exit. Returns "was a stop requested?"."""
    requested = {"flag": False}

    def handler(signum, frame):
        if requested["flag"]:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        requested["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a notebook helper)
            pass
    return lambda: requested["flag"]
