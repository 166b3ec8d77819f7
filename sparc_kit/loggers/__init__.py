"""Where a run's metrics go while it trains: one :class:`~sparc_kit.loggers.base.Logger` per name in the recipe's
``train.loggers`` (``jsonl``, always on: ``RUN/metrics.jsonl``; ``tensorboard``; ``wandb``), each registered in
:data:`sparc_kit.registry.loggers` by its own module here, so a new one is one new file (or a plugin's
``@loggers.register("NAME")``). The loop builds them on rank 0 only, through :func:`build_loggers`, and calls one
:meth:`~sparc_kit.loggers.base.RunLoggers.log` per logged row (docs/monitoring.md)."""

from sparc_kit.loggers.base import (
    SUPPLIED,
    Logger,
    RunLoggers,
    build_loggers,
    check_loggers,
    heatmaps_due,
    logger_names,
    wants_images,
)
from sparc_kit.loggers import base, probe
from sparc_kit.loggers.probe import FIRST_SAMPLES, Probe, read_probe
from sparc_kit.registry import import_submodules

__all__ = [*base.__all__, *probe.__all__]

import_submodules(__name__, __path__)
