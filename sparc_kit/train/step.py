"""One training step: forward, a non-finite check every process agrees on, backward (accumulated), update.

``train_step(engine, batch, accum_steps, grad_clip)`` is the whole step; :func:`compute_gradients` is it without
the update, for tests and tools that inspect gradients.

Gradient accumulation (``accum_steps = k``) is contrastive-correct, open_clip's feature-cache scheme: the k
micro-batches are first embedded without gradient; the loss of the whole batch is computed once on that cache
(the logged values, checked for non-finite values before anything is applied); then each micro-batch is
embedded again with gradient and its outputs spliced into the cache, so its loss is contrasted against the
negatives of the whole batch and its backward adds exactly its part of the whole batch's gradient. The
per-sample fine-grained terms are computed on the micro-batch's rows only (with the whole batch's count as the
divisor). Under DDP every backward but the last runs in ``no_sync``. The cost: one extra forward of the towers
without gradient, and the whole batch's model outputs (patch and token embeddings included) held in memory.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from sparc_kit.engines.base import NonFiniteGradient
from sparc_kit.errors import RunError
from sparc_kit.train.module import snapshot_rng
from sparc_kit.train.padding import trim_padding, trims_padding

__all__ = [
    "train_step",
    "compute_gradients",
    "StepResult",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "split_batch",
]


class NonFiniteLossError(RunError, RuntimeError):
    """The loss became NaN or infinite; nothing of that step was applied."""

    def __init__(self, step: int, value: float, last_finite_step: int | None):
        self.step, self.value, self.last_finite_step = step, value, last_finite_step
        since = f"; last finite loss at step {last_finite_step}" if last_finite_step is not None else ""
        super().__init__(
            f"loss is {value} at step {step}{since}. The update was not applied and the last checkpoint is intact; "
            "try a lower optim.lr, train.precision=fp32 or a smaller model.init_temperature range"
        )

    def __reduce__(self):  # survives pickling (sent between processes)
        return (NonFiniteLossError, (self.step, self.value, self.last_finite_step))


class NonFiniteGradientError(RunError, RuntimeError):
    """The loss was finite but a gradient was not; the update was not applied (unless ``applied``)."""

    def __init__(self, step: int, parameter: str | None, applied: bool = False):
        self.step, self.parameter, self.applied = step, parameter, applied
        where = f"in {parameter}" if parameter else "(the engine reports only the norm)"
        effect = (
            "the engine had already applied the update; resume from the last checkpoint, which is intact"
            if applied
            else "the update was not applied and the last checkpoint is intact"
        )
        super().__init__(
            f"gradient is not finite at step {step} {where} while the loss is finite; {effect}; try a lower "
            "optim.lr, optim.grad_clip, or train.precision=fp32"
        )

    def __reduce__(self):
        return (NonFiniteGradientError, (self.step, self.parameter, self.applied))


@dataclass
class StepResult:
    values: dict[str, float]  # the loss terms and diagnostics, averaged over processes
    grad_norm: float
    extras: dict[str, float]  # the caller's ``extras``, averaged over processes


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``parts`` contiguous micro-batches of (nearly) equal size."""
    n = next(iter(batch.values())).shape[0]
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def _scalars(terms: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().reshape(()) for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1}


def _reduce(engine, terms: dict[str, Any], extras: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """One all-reduce for every logged number of the step (and the caller's extras: counts, a stop flag)."""
    scalars = _scalars(terms)
    device = scalars["loss"].device
    stacked = torch.stack([*scalars.values(), *(torch.tensor(float(v), device=device) for v in extras.values())])
    reduced = engine.all_reduce_mean(stacked).tolist()
    return dict(zip(scalars, reduced)), dict(zip(extras, reduced[len(scalars) :]))


def compute_gradients(
    engine,
    batch: dict[str, torch.Tensor],
    accum_steps: int = 1,
    *,
    step: int | None = None,
    last_finite: int | None = None,
    extras: dict[str, float] | None = None,
    pad_to: str = "longest",
) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward of one batch (this process's part of the global batch) through ``engine``.

    Returns the loss terms averaged over processes and the averaged ``extras``. Raises
    :class:`NonFiniteLossError` on every process, before any backward, when the loss is not finite anywhere.
    ``pad_to="longest"`` first cuts the captions to the global batch's longest (:mod:`sparc_kit.train.padding`);
    ``"context_length"`` keeps them as they come.
    """
    extras = dict(extras or {})
    if pad_to == "longest" and trims_padding(engine.unwrap()):
        batch = trim_padding(engine, batch)
    elif pad_to not in ("longest", "context_length"):
        raise ValueError(f"pad_to must be 'longest' or 'context_length', got {pad_to!r}")
    if accum_steps <= 1:
        with engine.autocast():
            terms = engine(**batch)
        values, extras_out = _reduce(engine, terms, extras)
        _check_finite(values, step, last_finite)
        engine.backward(terms["loss"])
        return values, extras_out

    micro = split_batch(batch, accum_steps)
    module = engine.unwrap()
    with torch.no_grad(), engine.autocast():
        outputs = [module.model(**mb) for mb in micro]
        cache = {
            k: (torch.cat([o[k] for o in outputs]) if torch.is_tensor(v) and v.ndim > 0 else v)
            for k, v in outputs[0].items()
        }
        rng = snapshot_rng(cache["token_mask"].device)
        terms = module.loss(**cache)  # the whole batch's loss: what is logged and checked
    values, extras_out = _reduce(engine, terms, extras)
    _check_finite(values, step, last_finite)
    start = 0
    passes = len(micro)
    with _shared_gradients(module.loss.parameters(), passes):  # every pass uses the loss's parameters whole
        for j, mb in enumerate(micro):
            size = mb["images"].shape[0]
            rows = slice(start, start + size)
            start += size
            sync = j == passes - 1
            with engine.no_sync() if not sync else contextlib.nullcontext():
                with engine.autocast():
                    part = engine(**mb, cache=cache, rows=rows, passes=passes, loss_rng=rng)
                engine.backward(part["loss"])
    # every loss pass drew from the same RNG state, so the RNG is left as one pass leaves it
    return values, extras_out


@contextlib.contextmanager
def _shared_gradients(params, passes: int):
    """Scale the gradient reaching each of ``params`` by ``1 / passes`` (a hook before it is accumulated, so
    DDP and DeepSpeed see the scaled value)."""
    handles = [p.register_hook(lambda g: g / passes) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_finite(values: dict[str, float], step: int | None, last_finite: int | None) -> None:
    loss = values["loss"]
    if not math.isfinite(loss):
        raise NonFiniteLossError(step if step is not None else -1, loss, last_finite)


def train_step(
    engine,
    batch: dict[str, torch.Tensor],
    *,
    accum_steps: int = 1,
    grad_clip: float | None = None,
    step: int | None = None,
    last_finite: int | None = None,
    extras: dict[str, float] | None = None,
    pad_to: str = "longest",
) -> StepResult:
    """One optimizer step on one batch: :func:`compute_gradients`, then ``engine.step(grad_clip)``."""
    values, extras_out = compute_gradients(
        engine, batch, accum_steps, step=step, last_finite=last_finite, extras=extras, pad_to=pad_to
    )
    try:
        grad_norm = engine.step(grad_clip)
    except NonFiniteGradient as exc:
        raise NonFiniteGradientError(step if step is not None else -1, exc.parameter, exc.applied) from None
    return StepResult(values, float(grad_norm), extras_out)
