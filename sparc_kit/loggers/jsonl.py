"""``jsonl``: ``RUN/metrics.jsonl``, one JSON object per logged step; always on, whatever ``train.loggers`` says.

The file is appended to, one flushed line per row; the run folder's preparation drops the rows of steps a resumed
run trains again (:func:`sparc_kit.train.run_folder.truncate_metrics`), so the file holds each step once.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sparc_kit.checkpoint import METRICS, WRITE_DELAY_ENV, write_pause
from sparc_kit.loggers.base import SUPPLIED, Logger
from sparc_kit.registry import loggers

__all__ = ["JsonlLogger", "append_row"]


def append_row(f, row: dict[str, Any]) -> None:
    """One metrics row, flushed (a crash can cut the line short: the next start drops a cut line)."""
    line = json.dumps(row) + "\n"
    if os.environ.get(WRITE_DELAY_ENV):  # fault tests: hold the row half-written for a while
        f.write(line[: len(line) // 2])
        f.flush()
        write_pause()
        line = line[len(line) // 2 :]
    f.write(line)
    f.flush()


@loggers.register("jsonl", supplied=SUPPLIED)
class JsonlLogger(Logger):
    """RUN/metrics.jsonl: one JSON object per logged step (always on)."""

    def __init__(self, run_dir: str, start_step: int, recipe: Any):
        self.file = open(os.path.join(run_dir, METRICS), "a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        append_row(self.file, {"step": step, **metrics})

    def close(self) -> None:
        self.file.close()
