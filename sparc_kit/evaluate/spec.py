"""What to evaluate: one :class:`EvalConfig` per evaluation (the recipe's ``eval:`` list, or ``sparc eval``'s
arguments).

Each evaluator registers its options model (``evaluators.register(TASK, config=..., supplied=TASK_ARGS)``); the
recipe schema builds the ``eval:`` entries from the registry as it builds ``loss:``, a union keyed on ``task``
(:mod:`sparc_kit.config.schema`), and :func:`eval_entry` validates one entry the same way outside a recipe."""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from sparc_kit.errors import SparcError
from sparc_kit.evaluate.data import load_classnames
from sparc_kit.registry import evaluators

__all__ = [
    "EvalOptions",
    "EvalConfig",
    "EvalTaskError",
    "eval_entry",
    "metric_direction",
    "entry_model",
    "available_tasks",
    "AVAILABLE_TASKS",
    "PLANNED_TASKS",
    "TASK_ARGS",
    "spec_names",
    "template_problem",
]

AVAILABLE_TASKS = ("zeroshot", "retrieval", "segmentation")  # the built-in evaluators, in the docs' order
PLANNED_TASKS: tuple[str, ...] = ()  # tasks named in the CLI contract but not implemented yet (none now)


class EvalTaskError(SparcError, ValueError):
    """An evaluation asked for that cannot run (unknown or not yet available task, no data given)."""


def available_tasks() -> tuple[str, ...]:
    """The registered evaluators: the built-in ones first, then any a plugin registered."""
    names = evaluators.names()
    return tuple([t for t in AVAILABLE_TASKS if t in names] + [t for t in names if t not in AVAILABLE_TASKS])

#: what every evaluator is called with (``evaluators.register(TASK, supplied=TASK_ARGS)``); its options are the
#: ``spec``, one :class:`EvalConfig`
TASK_ARGS = ("model", "tokenizer", "spec", "transform")


def template_problem(templates: Sequence[str]) -> str | None:
    """What is wrong with a list of prompt templates (none given, one without ``{}`` for the class name), or None."""
    if not templates:
        return "none given"
    bad = [t for t in templates if "{}" not in t]
    return f"{bad[0]!r} has no '{{}}' for the class name" if bad else None


class EvalOptions(BaseModel):
    """One evaluation: a task on a data set, with the settings every evaluator has. An evaluator's options model
    extends it with its own fields (:class:`EvalConfig` for the prompted ones; retrieval uses this one as it is).

    In a recipe, ``eval:`` is a list of these; during training each runs every ``every`` steps (and at the last
    step); ``every: null`` runs it at the last step only. ``sparc eval`` builds them from its arguments.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    #: whether a larger value of this evaluator's metrics is better (accuracies, recalls, IoU: yes); an evaluator
    #: whose metrics are errors or distances sets it False. ``sparc ablate`` ranks points by it.
    higher_is_better: ClassVar[bool] = True
    #: metric keys that count things rather than measure them (never ranked)
    count_keys: ClassVar[tuple[str, ...]] = ("n", "classes", "images", "texts")

    task: str = Field(description="the evaluator (its registered name); each evaluator's entry model pins it")
    data: str | list[str] = Field(description="manifest path/URL, or webdataset shard URL(s) (brace expansion)")
    name: str | None = Field(None, description="results name (eval/NAME.json, metric keys); default: the task")
    every: int | None = Field(None, gt=0, description="during training: run every N steps (null: last step only)")
    batch_size: int = Field(64, gt=0)
    max_samples: int | None = Field(None, gt=0, description="evaluate the first N images only")

    @field_validator("data")
    @classmethod
    def _data(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("give a data path")
        return value

    def check_data(self) -> None:
        """Before training: read what the evaluation needs besides its data files (which the runner checks), so a
        missing file fails now, not at the first evaluation; an options model extends it."""


class EvalConfig(EvalOptions):
    """The options of an evaluator that scores class names through prompts (``zeroshot``, ``segmentation``): the
    class names and the prompt templates, on top of :class:`EvalOptions`."""

    classnames: str | list[str] | None = Field(
        None, description="class names, or a file of them; default: classnames.txt beside the data"
    )
    templates: str | list[str] = Field(
        "clip", description="prompts: 'label' (class name only), 'clip' (ensemble), a file, or a list"
    )

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (problem := template_problem(value)):
            raise ValueError(f"templates: {problem}")
        return value

    def check_data(self) -> None:
        load_classnames(self.classnames, self.data)


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


@lru_cache(maxsize=None)
def _entry_model(task: str, config: type[BaseModel]) -> type[BaseModel]:
    return create_model(f"eval.{task}", __base__=config, task=(Literal[task], ...))  # type: ignore[valid-type]


def entry_model(task: str) -> type[BaseModel]:
    """The model of one ``eval:`` entry of ``task``: its evaluator's options with ``task`` fixed to the name."""
    if task not in evaluators:
        known = [*available_tasks(), *PLANNED_TASKS]
        hint = difflib.get_close_matches(str(task), known, n=1)
        dym = f" Did you mean {hint[0]!r}?" if hint else ""
        raise EvalTaskError(f"unknown task {task!r}.{dym} Known: {', '.join(available_tasks())}")
    return _entry_model(task, evaluators.get(task).config)


def metric_direction(task: str, metric: str) -> str | None:
    """``"max"`` or ``"min"`` for a metric key of a registered evaluator's results (``top1``, ``miou``), from its
    options model's :attr:`EvalConfig.higher_is_better`; None for a count (``n``) or an unknown task."""
    if task not in evaluators:
        return None
    options = evaluators.get(task).config
    if metric in getattr(options, "count_keys", ()):
        return None
    return "max" if getattr(options, "higher_is_better", True) else "min"


def eval_entry(raw: EvalOptions | dict[str, Any]) -> EvalOptions:
    """One evaluation's options, validated against its evaluator's model (pydantic's ``ValidationError`` for a bad
    field, :class:`EvalTaskError` for an unknown task); an already-validated entry is returned as it is."""
    if isinstance(raw, EvalOptions):
        return raw
    return entry_model(dict(raw).get("task")).model_validate(raw)
