"""The logger interface and the set of loggers a run writes to.

A logger is registered with ``@loggers.register("NAME", supplied=SUPPLIED)`` on a :class:`Logger` subclass whose
``__init__`` takes ``run_dir`` (the run folder), ``start_step`` (the step the run starts or resumes from: rows of
later steps from an earlier start are trained again) and ``recipe`` (the validated recipe). It is built on rank 0
only, after the run folder is prepared, and receives:

- :meth:`Logger.log` ``(step, metrics)``: the row ``metrics.jsonl`` gets at that step, less ``step`` (numbers,
  ``lr`` among them);
- :meth:`Logger.log_images` ``(step, images)``, only when its class sets ``wants_images``: the probe's alignment
  heat maps at the evaluation steps (:func:`heatmaps_due`), ``{tag: uint8 [H, W, 3]}``;
- :meth:`Logger.close` once, when the run ends, however it ends.

A logger that needs a package names it in ``requires``: a run that lists it where the package is missing is
refused before it starts (:meth:`Logger.problem`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from sparc_kit.errors import RecipeError
from sparc_kit.evaluate.runner import evaluations_due
from sparc_kit.registry import loggers

__all__ = [
    "SUPPLIED",
    "Logger",
    "RunLoggers",
    "build_loggers",
    "check_loggers",
    "heatmaps_due",
    "logger_names",
    "wants_images",
]

#: what the loop supplies to every logger's ``__init__``
SUPPLIED = ("run_dir", "start_step", "recipe")
ALWAYS = "jsonl"


class Logger:
    """One destination of a run's metrics (rank 0 only)."""

    #: whether it takes the probe's heat maps (:meth:`log_images`); the loop draws them only when one does
    wants_images = False

    #: the package it needs, also the name of sparc-kit's extra that installs it; checked before the run starts
    requires: str | None = None

    @classmethod
    def problem(cls, name: str) -> str | None:
        """Why the logger registered as ``name`` cannot run here (its package is not installed), as one line
        naming ``train.loggers``; None when it can."""
        if cls.requires and importlib.util.find_spec(cls.requires) is None:
            return (f"train.loggers: {name!r} is listed but the {cls.requires} package is not installed; "
                    f"pip install 'sparc-kit[{cls.requires}]', or take it out of train.loggers")
        return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """``images``: ``{tag: uint8 [H, W, 3]}``; by default dropped."""

    def close(self) -> None:
        """Flush and release what the logger holds."""


def logger_names(recipe: Any) -> list[str]:
    """The loggers of ``recipe``: ``jsonl`` first (always on), then ``train.loggers`` in order, each once."""
    return list(dict.fromkeys([ALWAYS, *recipe.train.loggers]))


def check_loggers(recipe: Any) -> None:
    """Refuse a recipe whose loggers cannot run here (``wandb`` listed but not installed), naming
    ``train.loggers``, before anything is written."""
    problems = [
        line for name in logger_names(recipe)
        if (problem := getattr(loggers.get(name).builder, "problem", None)) and (line := problem(name))
    ]
    if problems:
        raise RecipeError(problems)


def wants_images(recipe: Any) -> bool:
    """Whether any of the recipe's loggers takes heat maps (every process can ask: the answer decides whether the
    weights are consolidated for drawing them, a collective under DeepSpeed)."""
    return any(getattr(loggers.get(name).builder, "wants_images", False) for name in logger_names(recipe))


def heatmaps_due(recipe: Any, step: int) -> bool:
    """Whether the probe's heat maps are drawn at ``step``: at the recipe's evaluation steps (each entry's
    ``every``, and the last step); with no ``eval:`` entry, at the checkpoint steps (``train.checkpoint_every``,
    and the last step)."""
    final = step == recipe.train.steps
    if recipe.eval:
        return evaluations_due(recipe.eval, step, final)
    return final or step % recipe.train.checkpoint_every == 0


class RunLoggers:
    """Every logger of a run, called as one; closes them all (also when one fails to close)."""

    def __init__(self, members: list[Logger]):
        self.members = members

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for member in self.members:
            member.log(step, metrics)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for member in self.members:
            if member.wants_images:
                member.log_images(step, images)

    def close(self) -> None:
        errors = []
        for member in self.members:
            try:
                member.close()
            except Exception as exc:  # the others still close; the first failure is raised after
                errors.append(exc)
        if errors:
            raise errors[0]


def build_loggers(recipe: Any, run_dir: str, start_step: int) -> RunLoggers:
    """The loggers of ``recipe`` writing for ``run_dir``, a run that starts after ``start_step`` (rank 0)."""
    offer = {"run_dir": run_dir, "start_step": start_step, "recipe": recipe}
    built: list[Logger] = []
    try:
        for name in logger_names(recipe):
            built.append(loggers.get(name).build(offer=offer))
    except BaseException:
        RunLoggers(built).close()
        raise
    return RunLoggers(built)
