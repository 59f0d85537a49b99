"""Stopping on a signal (a cancelled flow run, a preempted node): every rank saves the same step, then exits.

The chain: Prefect sends SIGTERM to the flow run's process group; the launcher (`evaclip train`) forwards it
once to torchrun, which runs in a session of its own and forwards it to every rank (each in a session of its
own too) and kills them only after `SHUTDOWN_TIMEOUT_S`, before Prefect's own 30 s run out. A rank notes the
signal; the ranks agree on it every step through a one-element all-reduce on a gloo group (on the CPU: it
does not wait for the GPU), so all of them checkpoint at the same step and exit with 128 + the signal's number.
The next run resumes from that checkpoint (`train.resume`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import EvaclipError

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SHUTDOWN_TIMEOUT_S = 25  # torchrun's wait for its ranks after forwarding a signal (Prefect kills at 30 s)


class TrainingStopped(EvaclipError):
    """Stopped by a signal after saving a checkpoint: not a failure of the recipe, and resumable."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint} "
                         "saved, the next run resumes from it")
        self.exit_code = 128 + signum


class StopRequest:
    """A signal noted on this rank (`signum`), and whether any rank noted one (`agreed`, a collective)."""

    def __init__(self, log_file: Path):
        self.signum: Optional[int] = None
        self.redirected = False
        self.log_file = Path(log_file)
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        for signum in SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        # A repeated signal (torchrun's shutdown restarts on a second one) changes nothing.
        if self.signum is None:
            self.signum = signum
            self._output_to_file(flush=False)  # no flush here: the handler may interrupt a write (reentrant call)

    def agreed(self) -> bool:
        if self.group is None:
            stop = self.signum is not None
        else:
            flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item() and self.signum is None:
                self.signum = int(flag.item())  # another rank's signal: stop with it
            stop = bool(flag.item())
        if stop and not self.redirected:
            self._output_to_file(flush=True)  # another rank's signal
        return stop

    def _output_to_file(self, flush: bool) -> None:
        """The rank's output may be a pipe whose reader has gone (a stopped worker killed the flow run that read
        it): writing to it would fail mid-checkpoint. From here on it goes to a file in the run's folder."""
        self.redirected = True
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if flush:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def close(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: after fork, only the call itself is safe


def die_with_parent() -> None:
    """preexec_fn of the launcher: SIGTERM when `evaclip train` dies (SIGKILLed), so its ranks are never orphaned."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
