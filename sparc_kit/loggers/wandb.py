"""``wandb``: Weights & Biases, when the wandb package is installed (``pip install 'sparc-kit[wandb]'``).

The same numbers as ``metrics.jsonl`` at the same steps, the probe's heat maps as images, the resolved recipe as
the run's config. The wandb run is named after the run folder and its id is kept in ``RUN/wandb_id``, so a
resumed run goes on in the same wandb run (``resume="allow"``). wandb keeps its own settings (project, entity,
``WANDB_MODE=offline``) in its ``WANDB_*`` environment variables; its local files go to ``RUN/wandb/``. wandb
refuses steps below the last one it saw: after a resume, the rows of steps trained again (those logged after the
checkpoint) are dropped by wandb with a warning of its own, and the values it shows there are the first run's.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

from sparc_kit.io import atomic_write
from sparc_kit.loggers.base import SUPPLIED, Logger
from sparc_kit.io import numbers
from sparc_kit.registry import loggers

__all__ = ["WandbLogger", "WANDB_ID"]

WANDB_ID = "wandb_id"  # in the run folder: the id of the wandb run it logs to


@loggers.register("wandb", supplied=SUPPLIED)
class WandbLogger(Logger):
    """Weights & Biases (optional: needs the wandb package): the metrics.jsonl numbers and the probe's heat maps."""

    wants_images = True

    requires = "wandb"

    def __init__(self, run_dir: str, start_step: int, recipe: Any):
        import wandb  # imported here: wandb is optional

        self.wandb = wandb
        id_path = os.path.join(run_dir, WANDB_ID)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write(id_path, run_id + "\n")
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            name=os.path.basename(os.path.abspath(run_dir)),
            dir=run_dir,
            config=recipe.model_dump(mode="json"),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(numbers(metrics), step=step)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.run.log({tag: self.wandb.Image(pixels) for tag, pixels in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
