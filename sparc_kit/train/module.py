"""The one module an engine wraps: the model and its loss (the loss may own parameters)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from sparc_kit.losses.distributed import share_gradient

__all__ = ["TrainModule", "splice", "share_gradient"]


def splice(cache: dict[str, Any], live: dict[str, Any], rows: slice, passes: int = 1) -> dict[str, Any]:
    """The model outputs of a whole batch with ``rows`` taken from ``live`` (with gradient) and the rest from
    ``cache`` (without): what the loss sees for one of ``passes`` micro-batches of an accumulated step.

    Outputs without a batch dimension (the logit scale) are the live ones, with ``1 / passes`` of their gradient
    (:func:`share_gradient`): the whole batch's loss depends on them in every pass. ``passes=1`` keeps their
    whole gradient (for a loss that divides its terms itself, see :class:`TrainModule`).
    """
    out: dict[str, Any] = {}
    for key, value in live.items():
        cached = cache.get(key)
        if torch.is_tensor(value) and value.ndim > 0 and torch.is_tensor(cached) and cached.ndim > 0:
            out[key] = torch.cat([cached[: rows.start], value, cached[rows.stop :]], dim=0)
        elif torch.is_tensor(value) and value.is_floating_point():
            out[key] = share_gradient(value, passes)
        else:
            out[key] = value
    return out


class TrainModule(nn.Module):
    """``model`` and ``loss`` as one module, so an engine wraps, shards and checkpoints both.

    ``forward(images, token_ids, token_mask)`` returns the loss's dict (``loss`` plus diagnostics). With
    ``cache`` (the whole local batch's model outputs, computed without gradient), ``rows`` (where this
    micro-batch sits in it) and ``passes`` (how many micro-batches the step has), the loss is computed on the
    spliced batch: the contrastive-correct gradient accumulation of open_clip, where every micro-batch is
    contrasted against the whole batch's negatives. ``loss_rng`` restores the RNG state before the loss, so a
    stochastic loss (FILIP's token drop) draws the same in every pass.

    Exactness: each pass's backward must add only its part of the whole batch's gradient. The rows of the
    micro-batch are live only in their pass, so the towers' gradients add up by construction. What every pass
    uses whole (the logit scale, the loss's own parameters) takes ``1 / passes`` of its gradient per pass
    (:func:`share_gradient` here; a gradient hook on the loss's parameters in
    :func:`~sparc_kit.train.step.compute_gradients`), which is exact because every pass computes the same loss
    value. A loss whose ``forward`` takes ``live_rows`` (SPARC) computes its per-sample term on those rows only;
    it then receives the logit scale with its whole gradient and ``live_passes``, and shares the gradient of its
    whole-batch terms itself.
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
        passes: int = 1,
        loss_rng: Any = None,
    ) -> dict[str, torch.Tensor]:
        out = self.model(images, token_ids, token_mask)
        if loss_rng is not None:
            restore_rng(loss_rng)
        if cache is None:
            return self.loss(**out)
        assert rows is not None, "rows must say where the micro-batch sits in the cache"
        if self.loss_takes_live_rows:
            return self.loss(**splice(cache, out, rows, 1), live_rows=rows, live_passes=passes)
        return self.loss(**splice(cache, out, rows, passes))


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
