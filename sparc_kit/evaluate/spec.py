"""What to evaluate: one :class:`EvalConfig` per evaluation (the recipe's ``eval:`` list, or ``sparc eval``'s
arguments)."""

from __future__ import annotations

import os
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["EvalConfig", "AVAILABLE_TASKS", "PLANNED_TASKS", "TASK_ARGS", "spec_names", "template_problem"]

AVAILABLE_TASKS = ("zeroshot", "retrieval")
PLANNED_TASKS = ("segmentation",)  # part of the CLI contract; not implemented yet

#: what every evaluator is called with (``evaluators.register(TASK, supplied=TASK_ARGS)``); its options are the
#: ``spec``, one :class:`EvalConfig`
TASK_ARGS = ("model", "tokenizer", "spec", "transform")


def template_problem(templates: Sequence[str]) -> str | None:
    """What is wrong with a list of prompt templates (none given, one without ``{}`` for the class name), or None."""
    if not templates:
        return "none given"
    bad = [t for t in templates if "{}" not in t]
    return f"{bad[0]!r} has no '{{}}' for the class name" if bad else None


class EvalConfig(BaseModel):
    """One evaluation: a task on a data set, with its settings.

    In a recipe, ``eval:`` is a list of these; during training each runs every ``every`` steps (and at the last
    step); ``every: null`` runs it at the last step only. ``sparc eval`` builds them from its arguments.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    task: Literal["zeroshot", "retrieval"]
    data: str | list[str] = Field(description="manifest path/URL, or webdataset shard URL(s) (brace expansion)")
    name: str | None = Field(None, description="results name (eval/NAME.json, metric keys); default: the task")
    classnames: str | list[str] | None = Field(
        None, description="zeroshot: class names, or a file of them; default: classnames.txt beside the data"
    )
    templates: str | list[str] = Field(
        "clip", description="zeroshot prompts: 'label' (class name only), 'clip' (ensemble), a file, or a list"
    )
    every: int | None = Field(None, gt=0, description="during training: run every N steps (null: last step only)")
    batch_size: int = Field(64, gt=0)
    max_samples: int | None = Field(None, gt=0, description="evaluate the first N images only")

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (problem := template_problem(value)):
            raise ValueError(f"templates: {problem}")
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("give a data path")
        return value


def _folder_name(data: str | Sequence[str]) -> str:
    first = data if isinstance(data, str) else data[0]
    folder = os.path.basename(os.path.dirname(first.rstrip("/")))
    return folder or os.path.splitext(os.path.basename(first))[0] or "data"


def spec_names(specs: Sequence[EvalConfig]) -> list[str]:
    """Unique result names: the spec's ``name``, else its task; two unnamed specs of one task get the data's
    folder name appended (``zeroshot_cifar10``), then a counter if still equal."""
    base = [s.name or s.task for s in specs]
    names = [
        n if s.name or base.count(n) == 1 else f"{n}_{_folder_name(s.data)}" for s, n in zip(specs, base)
    ]
    out: list[str] = []
    for name in names:
        candidate, i = name, 2
        while candidate in out:
            candidate, i = f"{name}_{i}", i + 1
        out.append(candidate)
    return out
