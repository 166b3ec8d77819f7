"""Training curves: the ``metrics.jsonl`` of one or several run folders drawn on shared axes (``sparc plot``, and
the ``curves.png`` of ``sparc ablate``).

:func:`plot_curves` draws one subplot per metric, step on the x axis, one line per run in the same colour in
every subplot, and one legend of the run names. ``smooth`` is an exponential moving average, TensorBoard's
slider: ``s_t = smooth * s_(t-1) + (1 - smooth) * x_t``, divided by ``1 - smooth^t`` so the curve starts at the
first value rather than at 0 (0 draws the values as logged; 0.9 averages over about the last 10 rows); the logged
values are drawn faintly behind a smoothed line. A metric logged at a few steps only (``eval/...``) is drawn with
markers. Drawn with matplotlib's Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from sparc_kit.checkpoint import METRICS
from sparc_kit.errors import SparcError
from sparc_kit.io import atomic_path, is_number
from sparc_kit.train.run_folder import read_metrics

__all__ = ["CurvesError", "plot_curves", "read_curves", "ema", "run_labels", "DEFAULT_METRIC"]

DEFAULT_METRIC = "loss"
_MARKERS_UP_TO = 30  # a series of at most this many points is drawn with markers


class CurvesError(SparcError, ValueError):
    """A run folder with nothing to plot, a metric no run logged, a smoothing weight out of range."""


def ema(values: Sequence[float], smooth: float) -> list[float]:
    """The debiased exponential moving average of ``values`` with weight ``smooth`` in [0, 1) (see the module)."""
    if not 0.0 <= smooth < 1.0:
        raise CurvesError(f"--smooth {smooth}: the smoothing weight is a number from 0 (none) up to, not including, 1")
    out, running = [], 0.0
    for t, value in enumerate(values, start=1):
        running = smooth * running + (1.0 - smooth) * value
        out.append(running / (1.0 - smooth**t))
    return out


def read_curves(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of a run folder's ``metrics.jsonl``: every finite number of its rows."""
    if not os.path.isdir(run_dir):
        raise CurvesError(f"{run_dir}: no such run folder")
    if not os.path.exists(os.path.join(run_dir, METRICS)):
        raise CurvesError(f"{run_dir}: not a run folder with metrics (no {METRICS}); give the folder `sparc train` wrote")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for row in read_metrics(run_dir):
        step = row.get("step")
        for key, value in row.items():
            if key == "step" or not isinstance(step, int) or not is_number(value):
                continue
            steps, values = curves.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    if not curves:
        raise CurvesError(f"{run_dir}: {METRICS} holds no logged row yet")
    return curves


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """A legend name per run: its folder's name, or its path where two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(r)) or r for r in run_dirs]
    return [r if names.count(n) > 1 else n for r, n in zip(run_dirs, names)]


def plot_curves(
    run_dirs: Sequence[str],
    out: str,
    metrics: Sequence[str] = (DEFAULT_METRIC,),
    smooth: float = 0.0,
    labels: Sequence[str] | None = None,
) -> str:
    """Draw ``metrics`` of the runs ``run_dirs`` into the PNG ``out`` (written atomically); returns ``out``.

    Every metric must be logged by at least one of the runs; an unknown one is an error listing the metrics the
    runs have. ``labels``: the legend's run names (default :func:`run_labels`)."""
    if not run_dirs:
        raise CurvesError("no run folder to plot")
    ema([], smooth)  # checks the weight before anything is read
    runs = [read_curves(r) for r in run_dirs]
    available = sorted(set().union(*runs), key=lambda k: (k.startswith("eval/"), k))
    metrics = list(dict.fromkeys(metrics or [DEFAULT_METRIC]))
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise CurvesError(
            f"--metric {unknown[0]}: no run logs it; the runs' metrics: {', '.join(available)}"
        )
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    from matplotlib.figure import Figure  # imported here: only drawing needs matplotlib

    ncols = 1 if len(metrics) == 1 else 2
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(6.5 * ncols, 3.6 * nrows + 0.6), dpi=100)
    handles = {}
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, (curves, label) in enumerate(zip(runs, labels)):
            if metric not in curves:
                continue
            steps, values = curves[metric]
            colour = f"C{j % 10}"
            marker = "o" if len(steps) <= _MARKERS_UP_TO else None
            if smooth > 0:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1.0)
                values = ema(values, smooth)
            (line,) = ax.plot(steps, values, color=colour, linewidth=1.8, marker=marker, markersize=3, label=label)
            handles.setdefault(label, line)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 4), fontsize=9,
               frameon=False)
    title_space = 0.6 / fig.get_figheight()
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - title_space))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
