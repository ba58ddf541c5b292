"""Stopping cleanly: preemption signals, the wall-time limit, and one agreed decision for all ranks.

SLURM's `--signal=USR1@120` (or SIGTERM at the end of the time limit, or `scancel`) reaches each
process separately and not always at the same step; a rank that stops alone hangs the others in
their next collective. So a signal only sets a flag here, and after every step all ranks all-reduce
their flags (`agree`): if any rank was signalled, every rank finishes the same step, saves the same
checkpoint and exits with the same code.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Remembers the first SIGTERM/SIGUSR1 instead of dying; `restore()` puts the old handlers back."""

    def __init__(self, signums: Sequence[int] = STOP_SIGNALS):
        self.received: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread; nothing to catch then
        for s in signums:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class Deadline:
    """`train.exit_duration_minutes` measured from the start of this process."""

    def __init__(self, minutes: Optional[float]):
        self.start = time.monotonic()
        self.minutes = minutes

    def passed(self) -> bool:
        return self.minutes is not None and (time.monotonic() - self.start) / 60.0 >= self.minutes


def agree(flags: Sequence[bool], device=None) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
