"""SIGINT / SIGTERM during training become a request the loop honours between optimizer steps (``minilcm.train``):
the step in flight finishes, a consistent checkpoint is saved, and ``errors.TrainingInterrupted`` is raised."""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopRequest:
    """SIGINT / SIGTERM become a request that the loop honours between steps (so an optimizer step is never cut in
    half). A second signal raises KeyboardInterrupt at once. Handlers are installed only in the main thread and
    restored afterwards. With several processes (``sync``: an accelerate.Accelerator) the request, and the
    wall-clock checkpoint decision, are max-reduced across ranks so every rank stops, or saves, at the same step."""

    def __init__(self, sync=None):
        self.signum, self.sync, self.old = None, sync, {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):
                pass

    def _handler(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def poll(self, due: bool):
        """(signal number or None, whether a checkpoint is due), agreed by every rank."""
        if self.sync is None:
            return self.signum, due
        t = torch.tensor([self.signum or 0, int(due)], device=self.sync.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum = int(t[0])
        return (signum or None), bool(t[1])
