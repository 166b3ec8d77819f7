"""The single-process engine: one device, a torch AdamW, optional bf16 autocast."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from sparc_kit.checkpoint import load_module_weights
from sparc_kit.engines.base import Engine, EngineSetupError, NonFiniteGradient, OptimizerSpec, resolve_device
from sparc_kit.registry import engines

__all__ = ["LocalEngine", "resolve_device"]


@engines.register("local", supplied=("device", "precision"))
class LocalEngine(Engine):
    """Runs the loop in this process on one device (the default). The loop talks to an engine, never to DDP or
    DeepSpeed; see :mod:`sparc_kit.engines.base` for the interface."""

    name = "local"

    def __init__(self, device: str = "auto", precision: str = "fp32"):
        super().__init__(device, precision)
        self.optimizer: torch.optim.Optimizer | None = None

    def prepare(self, module: nn.Module, optimizer: OptimizerSpec) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise EngineSetupError(
                f"this process is one of {world} (WORLD_SIZE={world}) but engine.name is 'local', which runs one "
                "process; set engine.name=ddp or engine.name=deepspeed"
            )
        self._take(module, optimizer)
        self.wrapped = self.module

    def _take(self, module: nn.Module, optimizer: OptimizerSpec) -> None:
        """Move the module to the device, build the torch optimizer, find the bounded parameters."""
        self.module = module.to(self.device)
        self.optimizer = optimizer.build()
        self.bounded = self._bounded_parameters(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _params(self) -> list[torch.Tensor]:
        assert self.optimizer is not None, "call setup() first"
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, grad_clip: float | None) -> float:
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            return 0.0
        # the norm once, before clipping: a non-finite norm must stop the update
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(norm):
            bad = next(
                (n for n, p in self.unwrap().named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()),
                None,
            )
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradient(bad)
        total = float(norm)
        coefficient = min(1.0, grad_clip / (total + 1e-6)) if grad_clip is not None else 1.0  # clip_grad_norm_'s rule
        if coefficient < 1.0 and self._fused():
            # the fused AdamW divides every gradient by ``grad_scale`` as it reads it (the hook GradScaler uses):
            # the clipping without a pass of its own over the gradients (docs/performance.md)
            self.optimizer.grad_scale = torch.tensor(1.0 / coefficient, device=norm.device)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
        else:
            if coefficient < 1.0:
                for g in grads:
                    g.mul_(coefficient)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # after the update, as open_clip clamps its temperature: gradients still flow
            for p, low, high in self.bounded:
                p.clamp_(low, high)
        return total

    def _fused(self) -> bool:
        """Whether the optimizer is torch's fused AdamW/Adam, whose step takes a ``grad_scale``."""
        return isinstance(self.optimizer, (torch.optim.AdamW, torch.optim.Adam)) and all(
            group.get("fused") for group in self.optimizer.param_groups
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ----------------------------------------------------------------------------------- checkpoints
    def save(self, folder: str) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()} if self.is_main else {}

    def load(self, folder: str, trainer_state: dict[str, Any]) -> None:
        load_module_weights(self.unwrap(), folder)
        self.optimizer.load_state_dict(trainer_state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.is_main:
            return None
        return {k: v.detach().cpu().contiguous() for k, v in self.unwrap().state_dict().items()}
