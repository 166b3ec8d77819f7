"""``tensorboard``: ``RUN/tensorboard/``, event files for TensorBoard (``tensorboard --logdir RUN``).

Every number of each ``metrics.jsonl`` row is a scalar under the same name at the same step (``loss``, ``lr``,
``eval/NAME/METRIC``, ...), and the probe's heat maps are images (``heatmaps/weights/NN_PIECE``,
``heatmaps/similarity/NN_PIECE``). A run that starts at step S (a resume from the checkpoint of step S, or a
fresh start at 0) opens a new event file with ``purge_step = S + 1``: TensorBoard hides what an earlier start
logged from that step on, as ``metrics.jsonl`` drops those rows, so each step shows once. Needs the tensorboard
package (``pip install 'sparc-kit[tensorboard]'``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparc_kit.io import numbers
from sparc_kit.loggers.base import SUPPLIED, Logger
from sparc_kit.registry import loggers

__all__ = ["TensorBoardLogger", "TENSORBOARD"]

TENSORBOARD = "tensorboard"  # the event files' folder in the run folder


@loggers.register("tensorboard", supplied=SUPPLIED)
class TensorBoardLogger(Logger):
    """RUN/tensorboard: every metrics.jsonl number as a scalar at its step, and the probe's heat maps as images."""

    wants_images = True

    requires = "tensorboard"

    def __init__(self, run_dir: str, start_step: int, recipe: Any):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is optional

        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, TENSORBOARD), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for tag, value in numbers(metrics).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for tag, pixels in images.items():
            self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
