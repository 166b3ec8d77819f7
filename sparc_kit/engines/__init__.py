"""Engines: how the training loop runs. ``local`` (one process), ``ddp`` (torch DistributedDataParallel) and
``deepspeed`` (ZeRO 0-3, offload), all behind the interface of :class:`~sparc_kit.engines.base.Engine`."""

from sparc_kit.engines.base import (
    BatchLayout,
    Engine,
    EngineSetupError,
    NonFiniteGradient,
    OptimizerSpec,
    param_groups,
    resolve_device,
)
from sparc_kit.engines.ddp import DDPEngine
from sparc_kit.engines.deepspeed import DeepSpeedEngine, consolidate_zero_checkpoint
from sparc_kit.engines.local import LocalEngine
from sparc_kit.registry import import_submodules

__all__ = [
    "Engine",
    "LocalEngine",
    "DDPEngine",
    "DeepSpeedEngine",
    "BatchLayout",
    "OptimizerSpec",
    "EngineSetupError",
    "NonFiniteGradient",
    "param_groups",
    "resolve_device",
    "consolidate_zero_checkpoint",
]


import_submodules(__name__, __path__)  # every module registers its components: a new one is one new file
