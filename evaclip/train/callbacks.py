"""Listeners of a training run: the engine reports, callbacks log (progress bar, metrics file, MLflow...).

The engine never imports a tracking library: the tracking layer is one more `Callback`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol


class Callback(Protocol):
    def on_train_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_train_end(self, info: dict[str, Any]) -> None: ...


class BaseCallback:
    def on_train_start(self, info):
        pass

    def on_step(self, step, metrics):
        pass

    def on_checkpoint(self, step, path):
        pass

    def on_train_end(self, info):
        pass


class ProgressBar(BaseCallback):
    """Progress on rank 0: a tqdm bar in a terminal; in a log (a Prefect flow, CI) one plain line every
    `every` steps, since a bar redrawn with carriage returns never reaches a line-based log."""

    def __init__(self, every: int = 10, interactive: bool | None = None, desc: str = "train"):
        self.every, self.desc = every, desc
        self.interactive = sys.stderr.isatty() if interactive is None else interactive

    def on_train_start(self, info):
        from tqdm import tqdm

        self.total, self.started = info["steps"], time.perf_counter()
        self.first = info["start_step"]
        if self.interactive:
            self.bar = tqdm(total=info["steps"], initial=info["start_step"], unit="step", dynamic_ncols=True,
                            desc=self.desc, mininterval=2.0)

    def on_step(self, step, metrics):
        if self.interactive:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr/visual']:.2e}",
                                 samples_s=f"{metrics['samples_per_s']:.1f}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.first, 1) * (self.total - step)
            line = (f"{self.desc} step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['lr/visual']:.2e} "
                    f"samples/s {metrics['samples_per_s']:.1f} eta {eta:.0f}s")
            try:
                print(line, flush=True)
            except BrokenPipeError:  # whoever read our output is gone (a stopped flow run): train on, unread
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    def on_train_end(self, info):
        if self.interactive:
            self.bar.close()


class MetricsFile(BaseCallback):
    """Every step's metrics as JSON lines (what DVC plots and the tracking layer read)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, info):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # After a resume, steps past the checkpoint will be logged again: drop their old lines.
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= info["start_step"]]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_step(self, step, metrics):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def on_train_end(self, info):
        """The same rows as CSV beside it, for `dvc plots` (which reads CSV / JSON, not JSON lines)."""
        import csv

        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(self.path.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
