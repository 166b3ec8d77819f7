"""Ablations: sweep recipe parameters over a grid, one ordinary run folder per point, then a table and a plot.

    from sparc_kit.ablate import plan_sweep, run_sweep, write_report
    sweep = plan_sweep("sparc_tiny", ["sparsity_threshold"], seeds=3)   # validates every point first
    run_sweep(sweep)                                                     # skips finished points, resumes others
    report = write_report(sweep)                                         # results.md / .csv, runs.csv, results.png

A parameter is a dotted recipe path (``loss.lambda_f``) or a short name that matches the end of exactly one path
(``lambda_f``, ``vision.width``). Values are given as text and typed by the recipe schema exactly like ``--set``
(each point is ``load_recipe(recipe, [*overrides, "loss.lambda_f=5", "train.seed=0"])``); without values a
parameter sweeps its default grid (:func:`default_values`). Each point trains into
``OUT/<param>=<value>/.../seed=<s>``, an ordinary run folder that ``sparc train`` would resume, so a rerun of the
same sweep skips finished points and continues an interrupted one.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel

from sparc_kit.config import COMPONENT_SECTIONS, RecipeError, dump_recipe, load_recipe
from sparc_kit.errors import SparcError

__all__ = [
    "AblationError",
    "Param",
    "Point",
    "Sweep",
    "SweepOutcome",
    "Report",
    "parameter_paths",
    "resolve_param",
    "num_patches",
    "default_values",
    "parse_vary",
    "plan_sweep",
    "point_state",
    "run_sweep",
    "collect_runs",
    "summarize",
    "write_report",
    "plot_results",
    "format_plan",
    "default_mode",
    "DEFAULT_RECIPE",
]

DEFAULT_RECIPE = "sparc_tiny"

# metrics.jsonl keys that describe the run's bookkeeping rather than the model: not reported as metrics
_BOOKKEEPING = {
    "step",
    "lr",
    "samples_per_s",
    "samples_seen",
    "skipped_samples",
    "truncated_captions",
    "elapsed_s",
    "grad_norm",
}
# evaluation keys that count things rather than measure them (retrieval: images, texts; zero-shot: n, classes)
_EVAL_SKIP = {"step", "steps", "n", "images", "texts", "classes", "samples", "seconds"}

# train-section keys that do not change what a run computes: a run folder may differ from the point in these
_OPERATIONAL = {"steps", "device", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints"}


class AblationError(SparcError, ValueError):
    """A sweep that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------------------------------------------
# parameters


def parameter_paths(recipe: BaseModel) -> list[str]:
    """Every settable value of a recipe as a dotted path (component ``name`` keys included; the recipe's own
    ``name`` and ``description`` are not parameters)."""
    out: list[str] = []

    def walk(node: BaseModel, prefix: str) -> None:
        for key in type(node).model_fields:
            if not prefix and key in ("name", "description"):
                continue
            value = getattr(node, key)
            path = f"{prefix}{key}"
            if isinstance(value, BaseModel):
                walk(value, path + ".")
            else:
                out.append(path)

    walk(recipe, "")
    return out


def _sections(recipe: BaseModel) -> list[str]:
    out: list[str] = []

    def walk(node: BaseModel, prefix: str) -> None:
        for key in type(node).model_fields:
            value = getattr(node, key)
            if isinstance(value, BaseModel):
                out.append(prefix + key)
                walk(value, f"{prefix}{key}.")

    walk(recipe, "")
    return out


def resolve_param(recipe: BaseModel, name: str) -> str:
    """The one dotted path ``name`` means: itself, or the only path whose last parts are ``name``.

    Raises :class:`AblationError` (one line) for an ambiguous name (listing the candidates), a section, or an
    unknown name (with the closest paths).
    """
    paths = parameter_paths(recipe)
    query = name.strip()
    if query in paths:
        return query
    parts = query.split(".")
    matches = [p for p in paths if p.split(".")[-len(parts) :] == parts]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AblationError([f"--vary {name}: ambiguous, it matches {', '.join(matches)}; give the dotted path"])
    sections = _sections(recipe)
    section = [s for s in sections if s == query or s.split(".")[-len(parts) :] == parts]
    if len(section) == 1:
        keys = [p[len(section[0]) + 1 :] for p in paths if p.startswith(section[0] + ".")]
        raise AblationError(
            [f"--vary {name}: {section[0]} is a section, not a value; its keys: {', '.join(keys)}"]
        )
    leaves = sorted({p.split(".")[-1] for p in paths})
    close = difflib.get_close_matches(parts[-1], leaves, n=3, cutoff=0.6)
    suggestions = [p for c in close for p in paths if p.split(".")[-1] == c]
    suggestions += [p for p in difflib.get_close_matches(query, paths, n=3, cutoff=0.6) if p not in suggestions]
    hint = f" Did you mean {' or '.join(suggestions[:4])}?" if suggestions else ""
    where = f" of recipe {recipe.name}" if getattr(recipe, "name", None) else ""
    raise AblationError(
        [f"--vary {name}: unknown parameter{where}.{hint} See `sparc recipes show RECIPE` for every path"]
    )


def _get(recipe: BaseModel, path: str) -> Any:
    node: Any = recipe
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _annotation(recipe: BaseModel, path: str) -> Any:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get(recipe, parent_path) if parent_path else recipe
    return type(parent).model_fields[leaf].annotation


def _choices(annotation: Any) -> list[Any] | None:
    """The values of a Literal or bool type (None allowed around it: ``Literal[...] | None``)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if annotation is bool:
        return [False, True]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is not None and len(args) == 1 and len(typing.get_args(annotation)) == 2:  # Optional[X]
        return _choices(args[0])
    return None


def num_patches(recipe: BaseModel) -> int:
    """P, the vision tower's patch count: ``(image_size // patch_size) ** 2`` for ``vit``; other towers are built
    on the meta device (no memory, no weights) and asked."""
    vision = recipe.model.vision
    if vision.name == "vit":
        return (vision.image_size // vision.patch_size) ** 2
    import torch

    from sparc_kit.registry import vision_encoders

    params = vision.model_dump(exclude={"name"})
    if "weights" in params:
        params["weights"] = None
    with torch.device("meta"):
        encoder = vision_encoders.get(vision.name).build(params)
    count = getattr(encoder, "num_patches", None)
    if count is None:
        raise AblationError([f"model.vision: {vision.name!r} does not say how many patches it makes (num_patches)"])
    return int(count)


def default_values(recipe: BaseModel, path: str) -> list[Any]:
    """The grid a parameter sweeps when ``--vary`` gives no values.

    - ``loss.sparsity_threshold``: 0, 0.5/P, 1/P, 2/P, 4/P with P the recipe's patch count (the paper's 1/P in
      the middle, so it follows image and patch size);
    - ``loss.lambda_f``: the paper's 0.5, 1, 5, 10;
    - ``loss.weighting``: sparse, dense, softmax;
    - a component's ``name``: every registered component of that kind;
    - any Literal or bool parameter: its choices.

    Anything else raises :class:`AblationError` asking for values.
    """
    if path == "loss.sparsity_threshold":
        p = num_patches(recipe)
        return [0.0, 0.5 / p, 1.0 / p, 2.0 / p, 4.0 / p]
    if path == "loss.lambda_f":
        return [0.5, 1.0, 5.0, 10.0]
    if path == "loss.weighting":
        return ["sparse", "dense", "softmax"]
    parent, _, leaf = path.rpartition(".")
    if leaf == "name" and parent in COMPONENT_SECTIONS:
        from sparc_kit.registry import get_registry

        return list(get_registry(COMPONENT_SECTIONS[parent]).names())
    annotation = _annotation(recipe, path)
    choices = _choices(annotation)
    if choices:
        return choices
    shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    short = path.split(".")[-1]
    raise AblationError(
        [f"--vary {path}: a {shown} parameter has no default grid; give values, e.g. --vary {short}=V1,V2,V3"]
    )


def _split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` to ``["a", "b", "[c,d]"]``: commas inside brackets or quotes do not split."""
    out, buf, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf).strip())
    return out


def parse_vary(text: str) -> tuple[str, list[str] | None]:
    """``PARAM`` to (PARAM, None); ``PARAM=v1,v2`` to (PARAM, ["v1", "v2"])."""
    name, eq, values = text.partition("=")
    name = name.strip()
    if not name or any(not part for part in name.split(".")):
        raise AblationError([f"--vary {text}: expected PARAM or PARAM=V1,V2,... e.g. --vary loss.lambda_f=1,5"])
    if not eq:
        return name, None
    items = _split_values(values)
    if any(not item for item in items):
        raise AblationError([f"--vary {text}: empty value; expected PARAM=V1,V2,... e.g. --vary {name}=1,5"])
    return name, items


_PER_P = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)?\s*/\s*P\s*$")


def _yaml_text(value: Any) -> str:
    """A value as the YAML text of an override (``1.0e-05``, ``null``, ``true``, ``[0.9, 0.98]``)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _label(value: Any) -> str:
    """A short exact text for a value: floats keep 4 significant digits when that reads back the same number."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:.4g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_label(v) for v in value)
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._,+\-]", "_", text) or "_"


# --------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Param:
    """One varied parameter: its path, the key used in folder names and tables, and its typed values."""

    path: str
    key: str
    values: list[Any]
    labels: list[str]
    texts: list[str]  # the override text of each value (``path=text``)


@dataclass
class Point:
    """One run of the sweep: a value of every varied parameter and a seed."""

    index: int
    values: dict[str, Any]  # param key -> typed value
    labels: dict[str, str]  # param key -> label
    seed: int
    overrides: list[str]  # the point's own overrides (after the sweep's --set ones)
    run_dir: str
    recipe: Any = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items())

    @property
    def combo(self) -> tuple[str, ...]:
        return tuple(self.labels.values())


@dataclass
class Sweep:
    recipe_spec: Any
    overrides: list[str]
    params: list[Param]
    seeds: list[int]
    out_dir: str
    points: list[Point]
    recipe: Any = field(repr=False, default=None)  # the recipe with --set applied, before any --vary
    patches: int | None = None

    @property
    def combos(self) -> list[tuple[str, ...]]:
        seen: dict[tuple[str, ...], None] = {}
        for p in self.points:
            seen.setdefault(p.combo, None)
        return list(seen)

    def command(self, point: Point) -> str:
        """The ``sparc train`` command that trains one point on its own."""
        spec = self.recipe_spec if isinstance(self.recipe_spec, str) else "RECIPE"
        sets = " ".join(f"--set {o}" for o in [*self.overrides, *point.overrides])
        return f"sparc train {spec} {sets} --out {point.run_dir}".replace("  ", " ")


def _recipe_name(spec: Any, recipe: BaseModel) -> str:
    if getattr(recipe, "name", None):
        return recipe.name
    if isinstance(spec, str):
        return os.path.splitext(os.path.basename(spec))[0] or "recipe"
    return "recipe"


def plan_sweep(
    recipe: Any = None,
    vary: list[str] | tuple[str, ...] = (),
    *,
    seeds: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | None = None,
    check_folders: bool = True,
) -> Sweep:
    """The whole grid, every point validated (``load_recipe``) before anything runs.

    ``vary`` holds ``PARAM`` or ``PARAM=v1,v2,...`` items; several make the product grid. ``seeds=N`` repeats
    every point with ``train.seed`` 0..N-1 (None: the recipe's one seed). ``out_dir`` defaults to
    ``runs/ablate/RECIPE_NAME/PARAM+PARAM``. Raises :class:`AblationError` listing every problem.
    """
    spec = DEFAULT_RECIPE if recipe is None else recipe
    overrides = list(overrides)
    try:
        base = load_recipe(spec, overrides)
    except RecipeError as exc:
        src = f"{exc.source}: " if exc.source else ""
        raise AblationError([p if p.startswith("recipe") else f"{src}{p}" for p in exc.problems]) from None
    if not vary:
        raise AblationError(
            ["--vary: give at least one parameter to vary, e.g. --vary sparsity_threshold or --vary lambda_f=1,5"]
        )
    if seeds is not None and seeds < 1:
        raise AblationError([f"--seeds {seeds}: must be at least 1"])

    problems: list[str] = []
    requests: list[tuple[str, str, list[str] | None]] = []  # (name as given, path, raw values)
    for item in vary:
        try:
            name, raw = parse_vary(item)
            path = resolve_param(base, name)
        except AblationError as exc:
            problems += exc.problems
            continue
        if path == "train.seed":
            problems.append(f"--vary {item}: use --seeds N to repeat points over train.seed 0..N-1")
            continue
        if any(path == p for _, p, _ in requests):
            problems.append(f"--vary {item}: {path} is varied twice; give all its values in one --vary")
            continue
        requests.append((name, path, raw))  # applied after --set: a varied path also given by --set is varied
    if problems:
        raise AblationError(problems)

    # type every value by the schema, exactly as --set would
    patches: int | None = None
    params: list[Param] = []
    leaf_counts: dict[str, int] = {}
    for _, path, _ in requests:
        leaf = path.split(".")[-1]
        leaf_counts[leaf] = leaf_counts.get(leaf, 0) + 1
    for given, path, raw in requests:
        leaf = path.split(".")[-1]
        key = leaf if leaf_counts[leaf] == 1 else path
        try:
            if raw is None:
                texts = [_yaml_text(v) for v in default_values(base, path)]
            else:
                texts = []
                for text in raw:
                    m = _PER_P.match(text)
                    if m:  # "1/P", "0.5/P": relative to the recipe's patch count
                        patches = patches or num_patches(base)
                        texts.append(_yaml_text(float(m.group(1) or 1.0) / patches))
                    else:
                        texts.append(text)
        except AblationError as exc:
            problems += exc.problems
            continue
        values, labels, kept = [], [], []
        for text in texts:
            try:
                typed = _get(load_recipe(spec, [*overrides, f"{path}={text}"]), path)
            except RecipeError as exc:
                problems += [f"--vary {given}={text}: {p}" for p in exc.problems]
                continue
            if _label(typed) in labels:
                problems.append(f"--vary {given}: value {_label(typed)} is given twice")
                continue
            values.append(typed)
            labels.append(_label(typed))
            kept.append(text)
        safe = [_safe(lab) for lab in labels]
        if len(set(safe)) != len(safe):  # two labels that only differ in characters a folder name cannot hold
            safe = [f"{s}_{i}" for i, s in enumerate(safe)]
        params.append(Param(path=path, key=key, values=values, labels=safe, texts=kept))
    if problems:
        raise AblationError(problems)
    if "loss.sparsity_threshold" in [p.path for p in params]:
        patches = patches or num_patches(base)

    seed_list = list(range(seeds)) if seeds is not None else [int(base.train.seed)]
    name = _recipe_name(spec, base)
    out_dir = out_dir or os.path.join("runs", "ablate", _safe(name), "+".join(_safe(p.key) for p in params))

    points: list[Point] = []
    probed: dict[str, str | None] = {}
    for combo in itertools.product(*[range(len(p.values)) for p in params]):
        combo_over = [f"{p.path}={p.texts[i]}" for p, i in zip(params, combo)]
        labels = {p.key: p.labels[i] for p, i in zip(params, combo)}
        values = {p.key: p.values[i] for p, i in zip(params, combo)}
        where = " ".join(f"{k}={v}" for k, v in labels.items())
        for seed in seed_list:
            point_over = [*combo_over, f"train.seed={seed}"]
            try:
                cfg = load_recipe(spec, [*overrides, *point_over])
            except RecipeError as exc:
                problems += [f"point {where}: {p}" for p in exc.problems]
                break  # the seed never makes a point invalid: one report per grid point
            problem = _probe_build(cfg, probed)
            if problem:
                problems.append(f"point {where}: {problem}")
                break
            run_dir = os.path.join(
                out_dir, *[f"{_safe(k)}={lab}" for k, lab in labels.items()], f"seed={seed}"
            )
            points.append(
                Point(
                    index=len(points),
                    values=values,
                    labels=labels,
                    seed=seed,
                    overrides=point_over,
                    run_dir=run_dir,
                    recipe=cfg,
                )
            )
    if not problems and check_folders:
        for point in points:
            problem = _folder_mismatch(point)
            if problem:
                problems.append(problem)
    if problems:
        raise AblationError(list(dict.fromkeys(problems)))
    return Sweep(
        recipe_spec=spec,
        overrides=overrides,
        params=params,
        seeds=seed_list,
        out_dir=out_dir,
        points=points,
        recipe=base,
        patches=patches,
    )


def _probe_build(cfg: BaseModel, cache: dict[str, str | None]) -> str | None:
    """Build the model and loss on the meta device to catch what validation cannot (image_size not a multiple of
    patch_size, a pooler the tower cannot feed); cached by the sections that matter."""
    import torch

    from sparc_kit.models import build_model
    from sparc_kit.train.loop import build_loss

    dumped = cfg.model_dump(mode="json")
    jobs = (
        ("model", json.dumps([dumped["model"], dumped["tokenizer"]], sort_keys=True), lambda: build_model(cfg)),
        ("loss", json.dumps([dumped["loss"], dumped["model"]["embed_dim"]], sort_keys=True), lambda: build_loss(cfg)),
    )
    for kind, key, build in jobs:
        key = f"{kind}:{key}"
        if key not in cache:
            try:
                with torch.device("meta"):
                    build()
                cache[key] = None
            except ValueError as exc:
                cache[key] = str(exc).splitlines()[0]
            except Exception:  # noqa: BLE001  a probe that cannot run on meta must not block the sweep
                cache[key] = None
        if cache[key]:
            return cache[key]
    return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _folder_mismatch(point: Point) -> str | None:
    """A run folder that already holds a run of another recipe (e.g. an --out reused for another sweep)."""
    path = os.path.join(point.run_dir, "recipe.yaml")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    new = yaml.safe_load(dump_recipe(point.recipe))
    for d in (old, new):
        for key in ("name", "description", "eval"):  # labels and evaluations do not change what is trained
            d.pop(key, None)
        for key in _OPERATIONAL:
            (d.get("train") or {}).pop(key, None)
    a, b = _flatten(old), _flatten(new)
    diffs = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diffs:
        return None
    return (
        f"run folder {point.run_dir} holds a run of another recipe ({'; '.join(diffs[:3])}); "
        "use another --out, or the same --set values as the sweep that made it"
    )


# --------------------------------------------------------------------------------------------------------------
# running


def point_state(point: Point) -> str:
    """``done`` (metrics and newest checkpoint at train.steps), ``partial`` (something to resume) or ``new``."""
    from sparc_kit.train import latest_checkpoint, read_metrics

    steps = point.recipe.train.steps
    rows = read_metrics(point.run_dir)
    last = int(rows[-1].get("step", 0)) if rows else 0
    ckpt = latest_checkpoint(os.path.join(point.run_dir, "checkpoints"))
    ckpt_step = int(os.path.basename(ckpt).split("_")[1]) if ckpt else None
    if last >= steps and (ckpt_step is None or ckpt_step >= steps):
        return "done"
    if rows or ckpt_step:
        return "partial"
    return "new"


@dataclass
class SweepOutcome:
    trained: list[Point] = field(default_factory=list)
    skipped: list[Point] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run_dir -> one-line reason
    interrupted: bool = False


def _write_plan(sweep: Sweep) -> None:
    os.makedirs(sweep.out_dir, exist_ok=True)
    plan = {
        "recipe": sweep.recipe_spec if isinstance(sweep.recipe_spec, str) else None,
        "overrides": sweep.overrides,
        "params": [{"path": p.path, "key": p.key, "values": [_label(v) for v in p.values]} for p in sweep.params],
        "seeds": sweep.seeds,
        "num_patches": sweep.patches,
        "points": [
            {"run_dir": p.run_dir, "values": p.labels, "seed": p.seed, "command": sweep.command(p)}
            for p in sweep.points
        ],
    }
    tmp = os.path.join(sweep.out_dir, "sweep.json.tmp")
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=1)
    os.replace(tmp, os.path.join(sweep.out_dir, "sweep.json"))


def run_sweep(
    sweep: Sweep,
    *,
    jobs: int = 1,
    train_fn: Callable[..., Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> SweepOutcome:
    """Train every point that is not finished, in order; a rerun skips finished points and resumes partial ones.

    ``jobs == 1`` trains in this process (``train_fn``, default :func:`sparc_kit.train.train`); ``jobs > 1`` runs
    that many ``sparc train ... --quiet`` processes side by side, each with ``cpu_count // jobs`` torch threads,
    logging to ``RUN/train.log``. A failing point (non-finite loss, ...) is recorded and the others still run;
    Ctrl-C stops the sweep after checkpointing the points in flight (``interrupted``).
    """
    say = log or (lambda _msg: None)
    outcome = SweepOutcome()
    _write_plan(sweep)
    todo = []
    for point in sweep.points:
        if point_state(point) == "done":
            outcome.skipped.append(point)
        else:
            todo.append(point)
    if outcome.skipped:
        say(f"{len(outcome.skipped)} of {len(sweep.points)} runs already finished; {len(todo)} to train")
    if jobs <= 1:
        _run_in_process(sweep, todo, outcome, train_fn, progress, say)
    else:
        _run_subprocesses(sweep, todo, outcome, jobs, say)
    return outcome


def _run_in_process(sweep, todo, outcome, train_fn, progress, say) -> None:
    from sparc_kit.train import (
        NonFiniteGradientError,
        NonFiniteLossError,
        RunFolderBusyError,
        TooManyBadSamplesError,
        TrainingInterrupted,
    )

    if train_fn is None:
        from sparc_kit.train import train as train_fn
    total = len(sweep.points)
    for point in todo:
        state = point_state(point)
        verb = "resuming" if state == "partial" else "training"
        say(f"[{point.index + 1}/{total}] {verb} {point.name} seed={point.seed} -> {point.run_dir}")
        try:
            train_fn(point.recipe, point.run_dir, progress=progress)
        except (TrainingInterrupted, KeyboardInterrupt):
            outcome.interrupted = True
            return
        except (
            NonFiniteLossError, NonFiniteGradientError, TooManyBadSamplesError, RunFolderBusyError, ValueError
        ) as exc:
            outcome.failed[point.run_dir] = str(exc).splitlines()[0]
            say(f"  failed: {outcome.failed[point.run_dir]}")
            continue
        outcome.trained.append(point)


def _run_subprocesses(sweep, todo, outcome, jobs, say) -> None:
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    stop = threading.Event()
    running: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()
    total = len(sweep.points)

    def one(point: Point) -> tuple[Point, int | None]:
        if stop.is_set():
            return point, None
        os.makedirs(point.run_dir, exist_ok=True)
        recipe_path = os.path.join(point.run_dir, ".ablate_recipe.yaml")
        with open(recipe_path, "w") as f:
            f.write(dump_recipe(point.recipe))
        cmd = [sys.executable, "-m", "sparc_cli.main", "train", recipe_path, "--out", point.run_dir, "--quiet"]
        with lock:
            if stop.is_set():
                return point, None
            say(f"[{point.index + 1}/{total}] training {point.name} seed={point.seed} -> {point.run_dir}")
            log_file = open(os.path.join(point.run_dir, "train.log"), "a")
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            running[point.run_dir] = proc
        try:
            rc = proc.wait()
        finally:
            log_file.close()
            with lock:
                running.pop(point.run_dir, None)
        return point, rc

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, p) for p in todo]
    try:
        for fut in futures:
            point, rc = fut.result()
            if rc is None:
                continue
            if rc == 0:
                outcome.trained.append(point)
            elif rc == 130:
                outcome.interrupted = True
            else:
                outcome.failed[point.run_dir] = _last_error(point.run_dir, rc)
                say(f"  failed: {point.name} seed={point.seed}: {outcome.failed[point.run_dir]}")
    except KeyboardInterrupt:
        outcome.interrupted = True
        stop.set()
        with lock:
            procs = list(running.values())
        for proc in procs:  # they save a checkpoint of their last step and exit 130
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _last_error(run_dir: str, rc: int) -> str:
    try:
        with open(os.path.join(run_dir, "train.log")) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f"exit status {rc}" + (f": {last}" if last else "") + f" (see {os.path.join(run_dir, 'train.log')})"


# --------------------------------------------------------------------------------------------------------------
# results


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def collect_runs(sweep: Sweep) -> list[dict[str, Any]]:
    """One dict per finished run: ``point`` and ``metrics``: ``final_loss``, the other numbers of the last
    metrics.jsonl row (evaluations the loop ran as ``eval/NAME/KEY``), the numbers of every ``RUN/eval/NAME.json``
    as ``eval/NAME/KEY`` (its ``metrics`` mapping when it has one, as :mod:`sparc_kit.evaluate` writes; else the
    file's own top-level numbers; counts such as ``n`` or ``images`` left out; a file overrides the row), and
    ``samples_per_s`` (the mean over the rows)."""
    from sparc_kit.train import read_metrics

    out = []
    for point in sweep.points:
        if point_state(point) != "done":
            continue
        rows = [r for r in read_metrics(point.run_dir) if r.get("step", 0) <= point.recipe.train.steps]
        last = rows[-1]
        metrics: dict[str, float] = {"final_loss": float(last["loss"])}
        for k, v in last.items():
            if k in _BOOKKEEPING or k == "loss" or not _number(v):
                continue
            if k.startswith("eval/") and k.split("/")[-1] in _EVAL_SKIP:
                continue
            metrics[k] = float(v)
        eval_dir = os.path.join(point.run_dir, "eval")
        if os.path.isdir(eval_dir):
            for fname in sorted(os.listdir(eval_dir)):
                if not fname.endswith(".json"):
                    continue
                try:
                    with open(os.path.join(eval_dir, fname)) as f:
                        data = json.load(f)
                except (OSError, json.JSONDecodeError):
                    continue
                if not isinstance(data, dict):
                    continue
                stem = fname[: -len(".json")]
                found = data["metrics"] if isinstance(data.get("metrics"), dict) else data
                for k, v in _flatten(found).items():
                    if k.split(".")[-1] not in _EVAL_SKIP and _number(v):
                        metrics[f"eval/{stem}/{k}"] = float(v)
        speeds = [float(r["samples_per_s"]) for r in rows if _number(r.get("samples_per_s"))]
        if speeds:
            metrics["samples_per_s"] = statistics.fmean(speeds)
        out.append({"point": point, "metrics": metrics})
    return out


def _metric_names(runs: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {"final_loss": None}
    for run in runs:
        for k in run["metrics"]:
            if k != "samples_per_s":
                names.setdefault(k, None)
    if any("samples_per_s" in r["metrics"] for r in runs):
        names["samples_per_s"] = None
    return list(names)


def summarize(sweep: Sweep, runs: list[dict[str, Any]] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(metric names, one row per grid point): the values, ``runs`` finished of ``seeds``, and per metric its
    mean and std (sample std over seeds; None with one seed)."""
    runs = collect_runs(sweep) if runs is None else runs
    names = _metric_names(runs)
    by_combo: dict[tuple[str, ...], list[dict[str, float]]] = {}
    for run in runs:
        by_combo.setdefault(run["point"].combo, []).append(run["metrics"])
    rows = []
    for combo in sweep.combos:
        first = next(p for p in sweep.points if p.combo == combo)
        found = by_combo.get(combo, [])
        row: dict[str, Any] = {
            "labels": dict(first.labels),
            "values": dict(first.values),
            "runs": len(found),
            "seeds": len([p for p in sweep.points if p.combo == combo]),
        }
        for name in names:
            xs = [m[name] for m in found if name in m]
            row[name] = (
                statistics.fmean(xs) if xs else None,
                statistics.stdev(xs) if len(xs) > 1 else None,
                len(xs),
            )
        rows.append(row)
    return names, rows


_HIGHER_IS_BETTER = ("acc", "recall", "r@", "r1", "r5", "r10", "top1", "top5", "auc", "map", "ndcg", "iou", "f1")


def default_mode(metric: str) -> str:
    """``max`` for accuracy-like names (acc, recall, r@k, top-k, auc, map, iou, f1), else ``min``."""
    leaf = metric.split("/")[-1].lower()
    return "max" if any(tok in leaf for tok in _HIGHER_IS_BETTER) else "min"


# Which varied paths change what a loss value means. Every contrastive term depends on the batch size (its
# log B), so a loss is compared across points only when none of these is varied.
_CHANGES_ANY_LOSS = ("train.batch_size", "loss.name")
_CHANGES_GLOBAL_TERM = ("loss.global_loss",)
_EVAL_PREFERENCE = ("top1", "r@1", "r1", "acc")


def default_metric(names: list[str], varied: list[str]) -> tuple[str | None, str]:
    """The metric a sweep's best point is named by when ``--metric`` is not given, and why it is comparable.

    ``final_loss`` is the optimised total (e.g. ``lambda_g * global + lambda_f * fine``), whose scale moves with a
    varied loss weight itself, so it ranks points only when nothing under ``loss.`` varies. In order:

    1. an evaluation (``eval/...``; a top-1 or R@1-like one first, then any maximised one): the same measurement
       at every point;
    2. ``global_loss``, the global contrastive term alone, when the sweep varies neither the loss, its global term
       nor the batch size;
    3. ``final_loss``, when nothing under ``loss.`` (nor the batch size) varies.

    Returns ``(None, reason)`` when no logged metric is comparable across the points.
    """
    evals = [n for n in names if n.startswith("eval/") and default_mode(n) == "max"]
    for token in _EVAL_PREFERENCE:
        for n in evals:
            if token in n.split("/")[-1].lower():
                return n, "an evaluation, the same measurement at every point"
    if evals:
        return evals[0], "an evaluation, the same measurement at every point"
    touches = lambda prefixes: any(v == p or v.startswith(p + ".") for v in varied for p in prefixes)  # noqa: E731
    if "global_loss" in names and not touches(_CHANGES_ANY_LOSS + _CHANGES_GLOBAL_TERM):
        return "global_loss", "the global contrastive term, whose scale no varied parameter changes"
    if not touches(_CHANGES_ANY_LOSS) and not any(v.startswith("loss.") for v in varied):
        return "final_loss", "the training loss; the sweep changes nothing in the loss"
    return None, (
        "no logged metric is comparable across these points (the varied parameters change the loss's scale): "
        "add an evaluation to the recipe (eval:) or name one with --metric"
    )


@dataclass
class Report:
    markdown: str
    names: list[str]
    rows: list[dict[str, Any]]
    metric: str | None
    mode: str
    best: dict[str, Any] | None
    files: dict[str, str]
    problems: list[str] = field(default_factory=list)
    why: str = ""


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}g}"


def _cell(stat: tuple[float | None, float | None, int]) -> str:
    mean, std, _ = stat
    if mean is None:
        return "—"
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def _resolve_metric(metric: str, names: list[str]) -> tuple[str | None, str | None]:
    """(the metric ``metric`` names, or None and why): a full name, or the last ``/`` parts of exactly one."""
    if metric in names:
        return metric, None
    parts = metric.split("/")
    hits = [n for n in names if n.split("/")[-len(parts) :] == parts]
    if len(hits) == 1:
        return hits[0], None
    if hits:
        return None, f"--metric {metric}: ambiguous, it matches {', '.join(hits)}"
    return None, f"--metric {metric}: not among the results' metrics: {', '.join(names)}"


def write_report(
    sweep: Sweep,
    *,
    metric: str | None = None,
    mode: str | None = None,
    plot: bool = True,
    failed: dict[str, str] | None = None,
) -> Report:
    """Write ``results.md``, ``results.csv`` (one row per grid point, ``M_mean``/``M_std`` per metric),
    ``runs.csv`` (one row per finished run) and ``results.png`` into the sweep folder; name the best point by
    ``metric`` (default :func:`default_metric`: one comparable across the points) and ``mode`` (default
    :func:`default_mode`)."""
    runs = collect_runs(sweep)
    names, rows = summarize(sweep, runs)
    problems: list[str] = []
    chosen, why = default_metric(names, [p.path for p in sweep.params])
    if metric:
        resolved, reason = _resolve_metric(metric, names)
        if resolved is None:
            problems.append(reason)
        else:
            chosen, why = resolved, "chosen with --metric"
    if mode not in (None, "min", "max"):
        problems.append(f"--mode {mode}: expected min or max")
        mode = None
    mode = mode or (default_mode(chosen) if chosen else "min")
    candidates = [r for r in rows if chosen and r[chosen][0] is not None]
    best = None
    if candidates and not problems:
        pick = min if mode == "min" else max
        best = pick(candidates, key=lambda r: r[chosen][0])

    os.makedirs(sweep.out_dir, exist_ok=True)
    files = {
        "markdown": os.path.join(sweep.out_dir, "results.md"),
        "csv": os.path.join(sweep.out_dir, "results.csv"),
        "runs_csv": os.path.join(sweep.out_dir, "runs.csv"),
    }
    keys = [p.key for p in sweep.params]
    steps = sweep.recipe.train.steps

    # CSV: one row per grid point
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "runs", "seeds", *[f"{n}_{s}" for n in names for s in ("mean", "std")]])
    for row in rows:
        cells = [row["labels"][k] for k in keys] + [row["runs"], row["seeds"]]
        for n in names:
            mean, std, _ = row[n]
            cells += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        writer.writerow(cells)
    _write(files["csv"], buf.getvalue())

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "seed", "run_dir", *names])
    for run in runs:
        point = run["point"]
        writer.writerow(
            [point.labels[k] for k in keys]
            + [point.seed, point.run_dir]
            + [repr(run["metrics"][n]) if n in run["metrics"] else "" for n in names]
        )
    _write(files["runs_csv"], buf.getvalue())

    # Markdown
    spec = sweep.recipe_spec if isinstance(sweep.recipe_spec, str) else "(recipe object)"
    lines = [f"# Ablation: {', '.join(p.path for p in sweep.params)}", ""]
    sets = " ".join("--set " + o for o in sweep.overrides)
    lines.append(f"- recipe: `{spec}`" + (f" with `{sets}`" if sets else ""))
    seeds = ", ".join(map(str, sweep.seeds))
    lines.append(f"- {len(sweep.combos)} grid points x {len(sweep.seeds)} seed(s) ({seeds}), {steps} steps each")
    if sweep.patches:
        lines.append(f"- P = {sweep.patches} patches (the vision tower's num_patches)")
    lines.append(
        "- cells: mean ± std over seeds; final_loss is the last logged training loss; samples_per_s the mean over "
        "the log"
    )
    lines.append("")
    header = [*keys, "runs", *names]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        mark = " **(best)**" if row is best else ""
        cells = [row["labels"][k] for k in keys]
        cells[-1] += mark
        cells.append(f"{row['runs']}/{row['seeds']}")
        cells += [_cell(row[n]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if chosen is None:
        lines.append(f"Best: not named; {why}")
    elif best is not None:
        where = " ".join(f"{k}={best['labels'][k]}" for k in keys)
        lines.append(f"Best by {chosen} ({mode}; {why}): **{where}** ({chosen} {_cell(best[chosen])})")
    else:
        lines.append(f"Best by {chosen} ({mode}): no finished run yet")
    missing = [r for r in rows if r["runs"] < r["seeds"]]
    if missing:
        lines.append("")
        left = sum(r["seeds"] - r["runs"] for r in missing)
        lines.append(f"{left} run(s) not finished; rerun the sweep to complete them.")
    if failed:
        lines.append("")
        lines += [f"- failed: `{d}`: {why}" for d, why in failed.items()]
    if plot and runs:
        png = os.path.join(sweep.out_dir, "results.png")
        if plot_results(sweep, names, rows, png, best=best, metric=chosen):
            files["plot"] = png
            lines += ["", "![metrics against each varied parameter](results.png)"]
    markdown = "\n".join(lines) + "\n"
    _write(files["markdown"], markdown)
    return Report(markdown, names, rows, chosen, mode, best, files, problems, why)


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_results(
    sweep: Sweep,
    names: list[str],
    rows: list[dict[str, Any]],
    path: str,
    best: dict[str, Any] | None = None,
    metric: str | None = None,
) -> bool:
    """One subplot per metric and varied parameter: the metric's mean against the parameter's values (numeric
    axis for numbers, categorical otherwise), error bars = std over seeds, one line per combination of the other
    varied parameters. The ``best`` row is ringed in every panel, and the panel of the ``metric`` it was chosen by
    is titled so. Drawn with matplotlib's Agg canvas (no pyplot, no display). False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    params = sweep.params
    panels = [(n, j) for n in names for j in range(len(params))]
    if len(params) == 1:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
    else:
        ncols, nrows = len(params), len(names)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, j) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        param = params[j]
        numeric = all(_number(v) for v in param.values)
        xs_of = {lab: (float(v) if numeric else k) for k, (lab, v) in enumerate(zip(param.labels, param.values))}
        others = [q.key for q in params if q.key != param.key]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row["labels"][k] for k in others), []).append(row)
        for group, grows in groups.items():
            pts = [
                (xs_of[r["labels"][param.key]], r[name][0], r[name][1] or 0.0)
                for r in grows
                if r[name][0] is not None
            ]
            if not pts:
                continue
            pts.sort()
            label = " ".join(f"{k}={v}" for k, v in zip(others, group)) or None
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=label
            )
        if best is not None and best[name][0] is not None:
            ax.plot(
                [xs_of[best["labels"][param.key]]], [best[name][0]], marker="o", markersize=13, markerfacecolor="none",
                markeredgecolor="crimson", markeredgewidth=2, linestyle="none", label="best" if name == metric else None,
            )
        if numeric:
            ax.set_xticks([float(v) for v in param.values])
        else:
            ax.set_xticks(range(len(param.labels)))
        ax.set_xticklabels(param.labels, rotation=30 if len(param.labels) > 3 else 0, fontsize=8)
        ax.set_xlabel(param.key)
        try:
            ax.ticklabel_format(axis="y", useOffset=False)
        except AttributeError:  # a non-scalar formatter
            pass
        ax.set_title(f"{name} (ranks the points)" if name == metric else name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if (others and len(groups) > 1 and name == names[0]) or (best is not None and name == metric):
            ax.legend(fontsize=7)
    height = 3.2 * nrows
    fig.suptitle(f"{', '.join(p.path for p in params)}: mean ± std over {len(sweep.seeds)} seed(s)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    fig.savefig(path)
    return True


def format_plan(sweep: Sweep) -> str:
    """The grid as text: one line per run with its state and folder (for ``--dry-run`` and before a sweep)."""
    keys = [p.key for p in sweep.params]
    lines = [
        f"recipe {sweep.recipe_spec if isinstance(sweep.recipe_spec, str) else '(object)'}: "
        f"{len(sweep.combos)} grid points x {len(sweep.seeds)} seed(s) = {len(sweep.points)} runs of "
        f"{sweep.recipe.train.steps} steps into {sweep.out_dir}"
    ]
    for p in sweep.params:
        sep = " | " if any("," in lab for lab in p.labels) else ", "
        lines.append(f"  {p.path}: {sep.join(p.labels)}")
    if sweep.patches:
        lines.append(f"  (P = {sweep.patches} patches)")
    widths = [max(len(k), *(len(pt.labels[k]) for pt in sweep.points)) for k in keys]
    head = "  ".join(k.ljust(w) for k, w in zip(keys, widths))
    lines.append(f"  {head}  seed  state    run folder")
    for pt in sweep.points:
        vals = "  ".join(pt.labels[k].ljust(w) for k, w in zip(keys, widths))
        lines.append(f"  {vals}  {str(pt.seed).ljust(4)}  {point_state(pt).ljust(7)}  {pt.run_dir}")
    return "\n".join(lines)
