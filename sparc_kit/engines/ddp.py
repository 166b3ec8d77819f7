"""Data parallel with torch's DistributedDataParallel: one process per device, gradients averaged in buckets.

Started by any launcher (``sparc train --nproc N``, torchrun, srun, mpirun; see
:mod:`sparc_kit.engines.distributed`); gloo on CPU, nccl on CUDA. Without a launcher it runs as a group of one.
Every process holds the whole model and the whole optimizer state; rank 0 writes the checkpoint, every process
reads it back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sparc_kit.engines.base import EngineSetupError, OptimizerSpec
from sparc_kit.engines.local import LocalEngine
from sparc_kit.registry import engines

__all__ = ["DDPEngine"]


@engines.register("ddp", supplied=("device", "precision"))
class DDPEngine(LocalEngine):
    """torch DistributedDataParallel over the processes of a launcher (gloo on CPU, nccl on CUDA).

    ``bucket_cap_mb``, ``static_graph`` and ``find_unused_parameters`` are DDP's own options. A loss whose
    recipe leaves a parameter without gradient (a baseline with ``lambda_g: 0`` leaves the global image head
    unused) needs ``find_unused_parameters: true``. ``timeout_s`` bounds every collective, evaluation on rank 0
    included.
    """

    name = "ddp"

    def __init__(
        self,
        device: str = "auto",
        precision: str = "fp32",
        backend: Literal["auto", "gloo", "nccl"] = "auto",
        bucket_cap_mb: float = 25.0,
        static_graph: bool = False,
        find_unused_parameters: bool = False,
        timeout_s: float = 1800.0,
    ):
        super().__init__(device, precision)
        self.backend = backend
        self.bucket_cap_mb = bucket_cap_mb
        self.static_graph = static_graph
        self.find_unused_parameters = find_unused_parameters
        self.timeout_s = timeout_s
        self._owns_group = False
        self._started = False

    def start(self) -> None:
        self._join_group(self.backend, self.timeout_s)

    def prepare(self, module: nn.Module, optimizer: OptimizerSpec) -> None:
        self._take(module, optimizer)
        self.wrapped = DistributedDataParallel(
            self.module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_cap_mb,
            static_graph=self.static_graph,
            find_unused_parameters=self.find_unused_parameters,
        )

    def __call__(self, *args, **kwargs):
        try:
            return self.wrapped(*args, **kwargs)
        except RuntimeError as exc:  # DDP notices a parameter without gradient at the next forward
            if "Expected to have finished reduction" in str(exc):
                raise EngineSetupError(
                    "engine ddp: some parameters get no gradient with this recipe's loss (e.g. a baseline with "
                    "loss.lambda_g=0 leaves the global image head unused); set engine.find_unused_parameters=true"
                ) from None
            raise

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with self.wrapped.no_sync():
            yield
