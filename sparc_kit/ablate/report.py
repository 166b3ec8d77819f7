"""The results of a sweep: the finished runs' metrics, a summary per grid point, the best point, the files.

:func:`write_report` writes ``results.md``, ``results.csv`` (one row per grid point, mean and std over seeds),
``runs.csv`` (one row per finished run), ``results.png`` (:func:`plot_results`) and ``curves.png`` (every run's loss
against the step, :func:`sparc_kit.train.curves.plot_curves`, as ``sparc plot`` draws it) into the sweep folder. The best
point is named by a metric that means the same at every point (:func:`default_metric`), in the direction
:func:`default_mode` gives it, unless the caller names one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterator

from sparc_kit.ablate.plan import Sweep, flatten, point_state
from sparc_kit.checkpoint import EVAL
from sparc_kit.evaluate.spec import metric_direction, spec_names
from sparc_kit.io import atomic_open, atomic_write, is_number
from sparc_kit.train import read_metrics
from sparc_kit.train.curves import plot_curves

__all__ = [
    "Report",
    "collect_runs",
    "run_metrics",
    "row_eval_metrics",
    "eval_file_metrics",
    "eval_file_tasks",
    "summarize",
    "default_mode",
    "default_metric",
    "write_report",
    "plot_results",
]

# metrics.jsonl keys that describe the run's bookkeeping rather than the model: not reported as metrics
CURVES = "curves.png"  # in the sweep folder: every run's loss against the step (sparc_kit.train.curves)
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


def run_metrics(run_dir: str, steps: int | None = None) -> dict[str, float]:
    """One run folder's results over its metrics rows (those up to ``steps`` when given): ``final_loss``, the other
    numbers of the last metrics.jsonl row (evaluations the loop ran as ``eval/NAME/KEY``), the numbers of every
    ``RUN/eval/NAME.json`` (:func:`eval_file_metrics`; a file overrides the row), and ``samples_per_s`` (the mean
    over the rows). Empty results when no row was logged."""
    rows = [r for r in read_metrics(run_dir) if steps is None or r.get("step", 0) <= steps]
    if not rows:
        return {}
    last = rows[-1]
    metrics: dict[str, float] = {"final_loss": float(last["loss"])} if is_number(last.get("loss")) else {}
    metrics.update(row_eval_metrics(last, include_training=True))
    metrics.update(eval_file_metrics(run_dir))
    speeds = [float(r["samples_per_s"]) for r in rows if is_number(r.get("samples_per_s"))]
    if speeds:
        metrics["samples_per_s"] = statistics.fmean(speeds)
    return metrics


def row_eval_metrics(row: dict[str, Any], include_training: bool = False) -> dict[str, float]:
    """The measurements of one metrics.jsonl row: its ``eval/NAME/KEY`` numbers (counts such as ``n`` left out);
    with ``include_training`` also the loss's diagnostics (not the bookkeeping, not ``loss`` itself)."""
    out = {}
    for k, v in row.items():
        if k in _BOOKKEEPING or k == "loss" or not is_number(v):
            continue
        if k.startswith("eval/") and k.split("/")[-1] in _EVAL_SKIP:
            continue
        if include_training or k.startswith("eval/"):
            out[k] = float(v)
    return out


def _eval_files(run_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(NAME, contents)`` of every readable ``RUN/eval/NAME.json`` holding an object, in name order."""
    folder = os.path.join(run_dir, EVAL)
    for fname in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not fname.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, fname)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield fname[: -len(".json")], data


def eval_file_metrics(run_dir: str) -> dict[str, float]:
    """The numbers of every ``RUN/eval/NAME.json`` as ``eval/NAME/KEY``: its ``metrics`` mapping when it has one,
    as :mod:`sparc_kit.evaluate` writes; else the file's own top-level numbers; counts such as ``n`` left out."""
    metrics = {}
    for stem, data in _eval_files(run_dir):
        found = data["metrics"] if isinstance(data.get("metrics"), dict) else data
        for k, v in flatten(found).items():
            if k.split(".")[-1] not in _EVAL_SKIP and is_number(v):
                metrics[f"eval/{stem}/{k}"] = float(v)
    return metrics


def eval_file_tasks(run_dir: str) -> dict[str, str]:
    """The ``task`` of each ``RUN/eval/NAME.json`` (``sparc eval`` results), by NAME."""
    return {stem: data["task"] for stem, data in _eval_files(run_dir) if isinstance(data.get("task"), str)}


def collect_runs(sweep: Sweep) -> list[dict[str, Any]]:
    """One dict per finished run: ``point`` and ``metrics`` (:func:`run_metrics`)."""
    out = []
    for point in sweep.points:
        if point_state(point) != "done":
            continue
        out.append({"point": point, "metrics": run_metrics(point.run_dir, point.recipe.train.steps)})
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


def default_mode(metric: str, tasks: dict[str, str] | None = None) -> str:
    """Whether a larger ``metric`` is better. An evaluation's metric (``eval/NAME/KEY``) whose entry's task is known
    (``tasks``: entry name -> task) takes its evaluator's declared direction
    (:attr:`~sparc_kit.evaluate.EvalOptions.higher_is_better`); any other name is read: ``max`` for accuracy-like
    names (acc, recall, r@k, top-k, auc, map, iou, f1), else ``min`` (losses)."""
    parts = metric.split("/")
    if len(parts) == 3 and parts[0] == "eval" and tasks and parts[1] in tasks:
        declared = metric_direction(tasks[parts[1]], parts[2])
        if declared is not None:
            return declared
    leaf = parts[-1].lower()
    return "max" if any(tok in leaf for tok in _HIGHER_IS_BETTER) else "min"


def eval_tasks(sweep: Sweep) -> dict[str, str]:
    """The task of every evaluation a sweep's runs logged, by entry name: the recipe's ``eval:`` entries, and the
    ``task`` of each ``RUN/eval/NAME.json`` (``sparc eval`` results)."""
    tasks: dict[str, str] = {}
    for recipe in [sweep.recipe, *(p.recipe for p in sweep.points)]:
        tasks.update(entry_tasks(getattr(recipe, "eval", None) or []))
    return with_file_tasks(tasks, [p.run_dir for p in sweep.points])


def entry_tasks(entries: Any) -> dict[str, str]:
    """The task of each ``eval:`` entry (objects with ``name``, ``task``, ``data``), by the entry's name."""
    entries = list(entries)
    return {n: e.task for n, e in zip(spec_names(entries), entries) if isinstance(e.task, str)}


def with_file_tasks(tasks: dict[str, str], run_dirs: list[str]) -> dict[str, str]:
    """``tasks`` plus the ``task`` of each ``RUN/eval/NAME.json`` whose NAME it lacks."""
    for run_dir in run_dirs:
        for name, task in eval_file_tasks(run_dir).items():
            tasks.setdefault(name, task)
    return tasks


def preferred_eval(names: list[str], tasks: dict[str, str] | None = None) -> str | None:
    """The evaluation a run or sweep is judged by: a maximised top-1 or R@1-like one first, then any maximised
    one, then any evaluation (``eval/...``); None without one."""
    evals = [n for n in names if n.startswith("eval/")]
    maximised = [n for n in evals if default_mode(n, tasks) == "max"]
    for token in _EVAL_PREFERENCE:
        for n in maximised:
            if token in n.split("/")[-1].lower():
                return n
    return next(iter(maximised or evals), None)


# Which varied paths change what a loss value means. Every contrastive term depends on the batch size (its
# log B), so a loss is compared across points only when none of these is varied.
_CHANGES_ANY_LOSS = ("train.batch_size", "loss.name")
_CHANGES_GLOBAL_TERM = ("loss.global_loss",)
_EVAL_PREFERENCE = ("top1", "r@1", "r1", "acc")


def default_metric(
    names: list[str], varied: list[str], tasks: dict[str, str] | None = None
) -> tuple[str | None, str]:
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
    chosen = preferred_eval(names, tasks)
    if chosen is not None and default_mode(chosen, tasks) == "max":
        return chosen, "an evaluation, the same measurement at every point"
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
    ``runs.csv`` (one row per finished run), ``results.png`` and ``curves.png`` into the sweep folder; name the best point by
    ``metric`` (default :func:`default_metric`: one comparable across the points) and ``mode`` (default
    :func:`default_mode`)."""
    runs = collect_runs(sweep)
    names, rows = summarize(sweep, runs)
    problems: list[str] = []
    tasks = eval_tasks(sweep)
    chosen, why = default_metric(names, [p.path for p in sweep.params], tasks)
    if metric:
        resolved, reason = _resolve_metric(metric, names)
        if resolved is None:
            problems.append(reason)
        else:
            chosen, why = resolved, "chosen with --metric"
    if mode not in (None, "min", "max"):
        problems.append(f"--mode {mode}: expected min or max")
        mode = None
    mode = mode or (default_mode(chosen, tasks) if chosen else "min")
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
    atomic_write(files["csv"], buf.getvalue())

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
    atomic_write(files["runs_csv"], buf.getvalue())

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
        logged = [p for p in sweep.points if read_metrics(p.run_dir)]
        if logged:  # the runs' loss curves, drawn as `sparc plot` draws them
            files["curves"] = plot_curves(
                [p.run_dir for p in logged], os.path.join(sweep.out_dir, CURVES),
                labels=[f"{p.name} seed={p.seed}" if len(sweep.seeds) > 1 else p.name for p in logged],
            )
            lines += ["", f"![each run's loss against the step]({CURVES})"]
    markdown = "\n".join(lines) + "\n"
    atomic_write(files["markdown"], markdown)
    return Report(markdown, names, rows, chosen, mode, best, files, problems, why)


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
    try:  # imported here: matplotlib is optional and heavy, needed only for the plot
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
        numeric = all(is_number(v) for v in param.values)
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
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return True
