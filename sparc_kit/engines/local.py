"""The single-process engine: one device, optional bf16 autocast."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from sparc_kit.registry import engines

__all__ = ["LocalEngine", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {device!r} but CUDA is not available here (use 'auto' or 'cpu')")
    return dev


@engines.register("local", internal=("device", "precision"))
class LocalEngine:
    """Runs the loop in this process on one device. The loop talks to an engine, never to DDP or DeepSpeed.

    The interface every engine implements: ``prepare(model, optimizer)``, ``autocast()``, ``backward(loss)``,
    ``step(grad_clip)`` (returns the gradient norm), ``barrier()``, ``rank``, ``world_size``, ``is_main``,
    ``device``.
    """

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str = "auto", precision: str = "fp32"):
        self.device = resolve_device(device)
        self.precision = precision
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.model, self.optimizer = model, optimizer
        return model

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, grad_clip: float | None) -> torch.Tensor:
        assert self.model is not None and self.optimizer is not None, "call prepare() first"
        # every optimised tensor, the loss's own parameters included
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def barrier(self) -> None:
        pass
