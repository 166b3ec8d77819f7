"""The one module an engine wraps: the model and its loss (the loss may own parameters)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

__all__ = ["TrainModule", "splice"]


def splice(cache: dict[str, Any], live: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The model outputs of a whole batch with ``rows`` taken from ``live`` (with gradient) and the rest from
    ``cache`` (without): what the loss sees for one micro-batch of an accumulated step. Outputs without a batch
    dimension (the logit scale) are the live ones."""
    out: dict[str, Any] = {}
    for key, value in live.items():
        cached = cache.get(key)
        if torch.is_tensor(value) and value.ndim > 0 and torch.is_tensor(cached) and cached.ndim > 0:
            out[key] = torch.cat([cached[: rows.start], value, cached[rows.stop :]], dim=0)
        else:
            out[key] = value
    return out


class TrainModule(nn.Module):
    """``model`` and ``loss`` as one module, so an engine wraps, shards and checkpoints both.

    ``forward(images, token_ids, token_mask)`` returns the loss's dict (``loss`` plus diagnostics). With
    ``cache`` (the whole local batch's model outputs, computed without gradient) and ``rows`` (where this
    micro-batch sits in it), the loss is computed on the spliced batch: the contrastive-correct gradient
    accumulation of open_clip, where every micro-batch is contrasted against the whole batch's negatives.
    ``loss_rng`` restores the RNG state before the loss, so a stochastic loss (FILIP's token drop) draws the
    same in every pass.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss
        params = inspect.signature(loss.forward).parameters
        self.loss_takes_live_rows = "live_rows" in params

    def forward(
        self,
        images: torch.Tensor,
        token_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        cache: dict[str, Any] | None = None,
        rows: slice | None = None,
        loss_rng: Any = None,
    ) -> dict[str, torch.Tensor]:
        out = self.model(images, token_ids, token_mask)
        if loss_rng is not None:
            restore_rng(loss_rng)
        if cache is None:
            return self.loss(**out)
        assert rows is not None, "rows must say where the micro-batch sits in the cache"
        spliced = splice(cache, out, rows)
        if self.loss_takes_live_rows:
            return self.loss(**spliced, live_rows=rows)
        return self.loss(**spliced)


def snapshot_rng(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["cuda_device"] = torch.tensor(device.index or 0)
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], int(state["cuda_device"]))
