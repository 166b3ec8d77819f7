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

One module per job: :mod:`~sparc_kit.ablate.params` (what a parameter name means and its default grid),
:mod:`~sparc_kit.ablate.plan` (the validated grid of points and what their run folders hold),
:mod:`~sparc_kit.ablate.run` (training the points) and :mod:`~sparc_kit.ablate.report` (the results).
"""

from sparc_kit.ablate.params import (
    AblationError,
    default_values,
    num_patches,
    parameter_paths,
    parse_vary,
    resolve_param,
)
from sparc_kit.ablate.plan import DEFAULT_RECIPE, Param, Point, Sweep, format_plan, plan_sweep, point_state
from sparc_kit.ablate.report import (
    Report,
    collect_runs,
    default_metric,
    default_mode,
    plot_results,
    summarize,
    write_report,
)
from sparc_kit.ablate.run import SweepOutcome, run_sweep

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
    "default_metric",
    "DEFAULT_RECIPE",
]
