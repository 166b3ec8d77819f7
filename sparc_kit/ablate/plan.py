"""The plan of a sweep: every grid point as a validated recipe and a run folder, before anything runs.

:func:`plan_sweep` types each value by the recipe schema exactly like ``--set`` (each point is
``load_recipe(recipe, [*overrides, "loss.lambda_f=5", "train.seed=0"])``), builds the model and loss of every point
on the meta device, and refuses a run folder that holds a run of another recipe. :func:`point_state` reads what a
point's run folder already holds (done, partial, new); :func:`format_plan` prints the grid with those states.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from sparc_kit.ablate.params import (
    PER_PATCH,
    AblationError,
    default_values,
    get_value,
    grid_declaration,
    num_patches,
    parse_vary,
    resolve_param,
    safe_name,
    value_label,
    yaml_text,
)
from sparc_kit.checkpoint import CHECKPOINTS, RECIPE, latest_checkpoint, step_of_folder
from sparc_kit.config import RecipeError, dump_recipe, load_recipe
from sparc_kit.losses import build_loss
from sparc_kit.models import build_model
from sparc_kit.train import read_metrics

__all__ = ["DEFAULT_RECIPE", "Param", "Point", "Sweep", "plan_sweep", "point_state", "format_plan"]

DEFAULT_RECIPE = "sparc_tiny"

# train-section keys that do not change what a run computes: a run folder may differ from the point in these
_OPERATIONAL = {"steps", "device", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints"}


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


def _requests(base: BaseModel, vary: list[str] | tuple[str, ...]) -> list[tuple[str, str, list[str] | None]]:
    """(name as given, path, raw values or None) per ``--vary`` item; raises :class:`AblationError` listing every
    name that does not resolve."""
    problems: list[str] = []
    requests: list[tuple[str, str, list[str] | None]] = []
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
    return requests


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
    requests = _requests(base, vary)

    # type every value by the schema, exactly as --set would
    problems: list[str] = []
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
                texts = [yaml_text(v) for v in default_values(base, path)]
            else:
                texts = []
                for text in raw:
                    m = PER_PATCH.match(text)
                    if m:  # "1/P", "0.5/P": relative to the recipe's patch count
                        patches = patches or num_patches(base)
                        texts.append(yaml_text(float(m.group(1) or 1.0) / patches))
                    else:
                        texts.append(text)
        except AblationError as exc:
            problems += exc.problems
            continue
        values, labels, kept = [], [], []
        for text in texts:
            try:
                typed = get_value(load_recipe(spec, [*overrides, f"{path}={text}"]), path)
            except RecipeError as exc:
                problems += [f"--vary {given}={text}: {p}" for p in exc.problems]
                continue
            if value_label(typed) in labels:
                problems.append(f"--vary {given}: value {value_label(typed)} is given twice")
                continue
            values.append(typed)
            labels.append(value_label(typed))
            kept.append(text)
        safe = [safe_name(lab) for lab in labels]
        if len(set(safe)) != len(safe):  # two labels that only differ in characters a folder name cannot hold
            safe = [f"{s}_{i}" for i, s in enumerate(safe)]
        params.append(Param(path=path, key=key, values=values, labels=safe, texts=kept))
    if problems:
        raise AblationError(problems)
    if any(grid_declaration(base, p.path)[1] == "1/num_patches" for p in params):  # the plan and report name P
        patches = patches or num_patches(base)

    seed_list = list(range(seeds)) if seeds is not None else [int(base.train.seed)]
    name = _recipe_name(spec, base)
    out_dir = out_dir or os.path.join("runs", "ablate", safe_name(name), "+".join(safe_name(p.key) for p in params))

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
                out_dir, *[f"{safe_name(k)}={lab}" for k, lab in labels.items()], f"seed={seed}"
            )
            points.append(Point(len(points), values, labels, seed, point_over, run_dir, recipe=cfg))
    if not problems and check_folders:
        for point in points:
            problem = _folder_mismatch(point)
            if problem:
                problems.append(problem)
    if problems:
        raise AblationError(list(dict.fromkeys(problems)))
    return Sweep(spec, overrides, params, seed_list, out_dir, points, recipe=base, patches=patches)


def _probe_build(cfg: BaseModel, cache: dict[str, str | None]) -> str | None:
    """Build the model and loss on the meta device to catch what validation cannot (image_size not a multiple of
    patch_size, a pooler the tower cannot feed); cached by the sections that matter."""
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


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b": value}``."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _folder_mismatch(point: Point) -> str | None:
    """A run folder that already holds a run of another recipe (e.g. an --out reused for another sweep)."""
    path = os.path.join(point.run_dir, RECIPE)
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
    a, b = flatten(old), flatten(new)
    diffs = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diffs:
        return None
    return (
        f"run folder {point.run_dir} holds a run of another recipe ({'; '.join(diffs[:3])}); "
        "use another --out, or the same --set values as the sweep that made it"
    )


def point_state(point: Point) -> str:
    """``done`` (metrics and newest checkpoint at train.steps), ``partial`` (something to resume) or ``new``."""
    steps = point.recipe.train.steps
    rows = read_metrics(point.run_dir)
    last = int(rows[-1].get("step", 0)) if rows else 0
    ckpt = latest_checkpoint(os.path.join(point.run_dir, CHECKPOINTS))
    ckpt_step = step_of_folder(os.path.basename(ckpt)) if ckpt else None
    if last >= steps and (ckpt_step is None or ckpt_step >= steps):
        return "done"
    if rows or ckpt_step:
        return "partial"
    return "new"


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
