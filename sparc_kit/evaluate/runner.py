"""Running evaluations: after training (``sparc eval``, :func:`run_evaluations`, which writes ``RUN/eval/*.json``)
and during it (:func:`evaluate_during_training`, which returns metrics for the loop to log)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sparc_kit.evaluate.data import EvalDataError, detect_task, is_manifest, shard_urls
from sparc_kit.evaluate.spec import (  # EvalTaskError: re-exported, its earlier home
    PLANNED_TASKS,
    EvalOptions,
    EvalTaskError,
    available_tasks,
    entry_model,
    eval_entry,
    spec_names,
)
from sparc_kit.io import atomic_write
from sparc_kit.registry import evaluators

__all__ = [
    "EvalResult",
    "EvalTaskError",
    "run_task",
    "run_evaluations",
    "evaluate_during_training",
    "evaluations_due",
    "build_eval_specs",
    "check_task",
    "result_rows",
    "COUNT_KEYS",
]

COUNT_KEYS = ("n", "classes", "images", "texts")  # integer entries of a metrics dict; the rest are fractions
PROMPTED_TASKS = ("zeroshot", "segmentation")  # the tasks whose options use class names and prompt templates


@dataclass
class EvalResult:
    name: str
    task: str
    data: str | list[str]
    metrics: dict[str, float | int]
    n: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # the JSON file written, if any

    def to_json(self, step: int | None = None, checkpoint: str | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "data": self.data,
            "step": step,
            "checkpoint": checkpoint,
            "n": self.n,
            "metrics": self.metrics,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def run_task(model: Any, tokenizer: Any, spec: EvalOptions, transform: Any = None) -> tuple[dict[str, Any], dict]:
    """Run one evaluation through its registered evaluator; ``(metrics, settings)``. The model should be in
    eval mode."""
    if spec.task not in evaluators:  # pragma: no cover  (eval_entry only admits registered tasks)
        raise EvalTaskError(f"task {spec.task!r} is not available")
    metrics, settings = evaluators.get(spec.task).builder(model, tokenizer, spec, transform)
    settings.update(max_samples=spec.max_samples, batch_size=spec.batch_size)
    return metrics, settings


def _count(metrics: dict[str, Any]) -> int:
    return int(metrics["n"] if "n" in metrics else metrics.get("images", 0))


def run_evaluations(
    pretrained: Any,
    specs: Sequence[EvalOptions | dict],
    out_dir: str | None = None,
    write: bool = True,
) -> list[EvalResult]:
    """Run ``specs`` on a :class:`~sparc_kit.pretrained.Pretrained` model; write ``OUT/NAME.json`` for each
    (``out_dir`` defaults to ``RUN/eval``), atomically, holding the metrics, the checkpoint's step, the data
    path, ``n`` (images evaluated), the settings and a UTC timestamp. Returns the results in order."""
    specs = [eval_entry(s) for s in specs]
    out_dir = out_dir or os.path.join(pretrained.run_dir, "eval")
    model = pretrained.model
    was_training = model.training
    model.eval()
    results = []
    try:
        for spec, name in zip(specs, spec_names(specs)):
            t0 = time.perf_counter()
            metrics, settings = run_task(model, pretrained.tokenizer, spec, pretrained.transform)
            result = EvalResult(
                name, spec.task, spec.data, metrics, _count(metrics), time.perf_counter() - t0, settings
            )
            if write:
                result.path = os.path.join(out_dir, f"{name}.json")
                atomic_write(result.path, json.dumps(result.to_json(pretrained.step, pretrained.checkpoint), indent=1) + "\n")
            results.append(result)
    finally:
        model.train(was_training)
    return results


def check_eval_data(specs: Sequence[EvalOptions | dict]) -> None:
    """Fail before training starts, not at the first evaluation hundreds of steps in, when an evaluation's data
    or class-name file does not exist. Reads nothing but the file listings (and the class names)."""
    import fsspec

    for spec in [eval_entry(s) for s in specs]:
        paths = [spec.data] if is_manifest(spec.data) else shard_urls(spec.data)
        for path in paths:
            fs, _, (local,) = fsspec.get_fs_token_paths(path)
            if not fs.exists(local):
                raise EvalDataError(f"eval ({spec.task}): data not found: {path}")
        spec.check_data()  # the evaluator's own files (class names, ...)


def evaluations_due(eval_specs: Sequence[EvalOptions | dict], step: int, final: bool = False) -> bool:
    """Whether any of ``eval_specs`` runs at ``step`` (every process can ask, without running anything)."""
    specs = [eval_entry(s) for s in eval_specs]
    return any(final or (s.every is not None and step % s.every == 0) for s in specs)


def evaluate_during_training(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_specs: Sequence[EvalOptions | dict],
    step: int,
    final: bool = False,
    transform: Any = None,
) -> dict[str, float | int]:
    """Metrics of the evaluations due at ``step`` (``step % every == 0``, or all of them when ``final``), as
    flat keys ``eval/NAME/METRIC`` for the loop to merge into its ``metrics.jsonl`` row; ``{}`` when none is due.

    Call it on the main process only, between optimizer steps; the model is switched to eval mode, run without
    gradients, and put back in the mode it was in. An engine wrapper (``.module``) is unwrapped.
    """
    specs = [eval_entry(s) for s in eval_specs]
    due = [(s, n) for s, n in zip(specs, spec_names(specs)) if final or (s.every is not None and step % s.every == 0)]
    if not due:
        return {}
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    out: dict[str, float | int] = {}
    try:
        with torch.no_grad():
            for spec, name in due:
                metrics, _ = run_task(inner, tokenizer, spec, transform)
                out.update({f"eval/{name}/{key}": value for key, value in metrics.items()})
    finally:
        inner.train(was_training)
    return out


def _make_spec(**fields: Any) -> EvalOptions:
    from pydantic import ValidationError

    try:
        return eval_entry(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "eval"
        raise EvalTaskError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None


def _split_task_prefix(item: str) -> tuple[str | None, str]:
    head, sep, tail = item.partition("=")
    if sep and head in available_tasks() + PLANNED_TASKS:
        return head, tail
    return None, item


def check_task(task: str) -> None:
    """Raise :class:`EvalTaskError` for a task that is unknown or not implemented yet."""
    known = available_tasks() + PLANNED_TASKS + ("all",)
    if task in PLANNED_TASKS:
        raise EvalTaskError(
            f"task {task!r} is not available yet; available: {', '.join(available_tasks())} (or all)"
        )
    if task not in known:
        import difflib

        hint = difflib.get_close_matches(task, known, n=1)
        dym = f" Did you mean {hint[0]!r}?" if hint else ""
        raise EvalTaskError(f"unknown task {task!r}.{dym} Known: {', '.join(known)}")


def build_eval_specs(
    task: str = "all",
    data: Sequence[str] = (),
    classnames: str | None = None,
    templates: str | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    recipe_specs: Sequence[EvalOptions | dict] = (),
    ignore_index: int | None = None,
) -> list[EvalOptions]:
    """The evaluations ``sparc eval`` runs.

    ``task``: ``zeroshot``, ``retrieval``, ``segmentation`` or ``all``. Each ``data`` item is a path (its task
    read from the data when ``task`` is ``all``: shards and manifests with ``label`` are zeroshot, manifests with
    ``captions`` are retrieval, with ``mask`` segmentation) or ``TASK=PATH``. Without ``data`` the run's recipe
    ``eval:`` entries of that task are used. Options given here override those entries' settings, for the tasks
    they concern (class names and templates: zeroshot and segmentation; ``ignore_index``: segmentation). ``all``
    runs every task that has data.
    """
    check_task(task)
    given = dict(
        classnames=classnames,
        templates=templates,
        batch_size=batch_size,
        max_samples=max_samples,
        ignore_index=ignore_index,
    )
    overrides = {k: v for k, v in given.items() if v is not None}

    def settings_for(kind: str) -> dict[str, Any]:
        fields = entry_model(kind).model_fields  # an option the task's model lacks is not for it
        prompted = kind in PROMPTED_TASKS
        return {k: v for k, v in overrides.items() if k in fields and (prompted or k not in ("classnames", "templates"))}

    specs: list[EvalOptions] = []
    if data:
        for item in data:
            prefix, path = _split_task_prefix(item)
            if prefix is not None:
                check_task(prefix)
            if prefix is not None and task != "all" and prefix != task:
                raise EvalTaskError(f"--data {item}: a {prefix} set, but --task is {task}")
            kind = prefix or (task if task != "all" else detect_task(path))
            specs.append(_make_spec(task=kind, data=path, **settings_for(kind)))
    else:
        for raw in recipe_specs:
            spec = eval_entry(raw)
            if task in ("all", spec.task):
                specs.append(spec.model_copy(update=settings_for(spec.task)))
    if not specs:
        which = "" if task == "all" else f"{task} "
        raise EvalTaskError(
            f"no {which}evaluation data: pass --data PATH (a manifest or webdataset shards), or add an eval: "
            "section to the recipe"
        )
    return specs


def _percent(value: float) -> str:
    return f"{100.0 * value:.2f}"


def result_rows(results: Sequence[EvalResult]) -> list[tuple[str, str, str, str, str]]:
    """Rows ``(name, data, metric, value, n)`` for a table: one per metric, recalls and accuracies in %."""
    rows = []
    for r in results:
        data = r.data if isinstance(r.data, str) else " ".join(r.data)
        first = True
        for key, value in r.metrics.items():
            if key in COUNT_KEYS:
                continue
            head = (r.name, data) if first else ("", "")
            rows.append((*head, key, _percent(value), str(r.n) if first else ""))
            first = False
    return rows
