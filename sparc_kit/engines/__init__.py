"""Engines: how the training loop runs (one process now; DDP and DeepSpeed plug in behind the same interface)."""

from sparc_kit.engines.local import LocalEngine, resolve_device

__all__ = ["LocalEngine", "resolve_device"]
