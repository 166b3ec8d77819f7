"""Running a sweep: every point that is not finished, in this process or in child processes side by side.

:func:`run_sweep` writes the plan (``sweep.json``), skips finished points, and trains the rest: one after another
here (``jobs=1``), or ``jobs`` at a time, each a child process that trains one point's recipe into its run folder
and logs to ``RUN/train.log``. A point that fails is recorded and the others still run; Ctrl-C stops the sweep after
the points in flight have saved a checkpoint of their last step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from sparc_kit.ablate.params import value_label
from sparc_kit.ablate.plan import Point, Sweep, point_state
from sparc_kit.config import dump_recipe
from sparc_kit.io import atomic_write
from sparc_kit.train import (
    NonFiniteGradientError,
    NonFiniteLossError,
    RunFolderBusyError,
    TooManyBadSamplesError,
    TrainingInterrupted,
    train,
)

__all__ = ["SweepOutcome", "run_sweep", "CHILD"]

#: the module each point of a parallel sweep runs as (``python -m CHILD RECIPE_FILE RUN_DIR``): :mod:`.child`
CHILD = "sparc_kit.ablate.child"


@dataclass
class SweepOutcome:
    trained: list[Point] = field(default_factory=list)
    skipped: list[Point] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run_dir -> one-line reason
    interrupted: bool = False


def _write_plan(sweep: Sweep) -> None:
    plan = {
        "recipe": sweep.recipe_spec if isinstance(sweep.recipe_spec, str) else None,
        "overrides": sweep.overrides,
        "params": [{"path": p.path, "key": p.key, "values": [value_label(v) for v in p.values]} for p in sweep.params],
        "seeds": sweep.seeds,
        "num_patches": sweep.patches,
        "points": [
            {"run_dir": p.run_dir, "values": p.labels, "seed": p.seed, "command": sweep.command(p)}
            for p in sweep.points
        ],
    }
    atomic_write(os.path.join(sweep.out_dir, "sweep.json"), json.dumps(plan, indent=1))


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
    that many child processes side by side (``python -m sparc_kit.ablate.child``, :mod:`sparc_kit.ablate.child`),
    each with ``cpu_count // jobs`` torch threads and this process's environment (``SPARC_PLUGINS`` included),
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
        _run_in_process(sweep, todo, outcome, train_fn or train, progress, say)
    else:
        _run_subprocesses(sweep, todo, outcome, jobs, say)
    return outcome


def _run_in_process(sweep, todo, outcome, train_fn, progress, say) -> None:
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
        atomic_write(recipe_path, dump_recipe(point.recipe))
        cmd = [sys.executable, "-m", CHILD, recipe_path, point.run_dir]
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
