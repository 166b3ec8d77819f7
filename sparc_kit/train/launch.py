"""Starting N local training processes, and reporting a failure of any of them in one line.

``launch(["train", RECIPE, "--out", DIR], nproc=N)`` runs ``python -m sparc_cli train RECIPE --out DIR`` in N
processes through torch's own launcher (``torch.distributed.run``, in this process, as ``--standalone``: a
free rendezvous port on this host). When any process fails, the launcher stops the others; the failing
process leaves a one-line record (:func:`record_failure`) and :func:`launch` returns that process's exit code
with its line, so the user sees the root cause, not the other processes being stopped.

Multi-node runs use the launchers directly (``torchrun --nnodes``, ``srun``, the ``deepspeed`` launcher); see
docs/distributed.md.

What ``sparc train`` does around :func:`~sparc_kit.train.train` lives here too, so the command stays a thin layer:
:func:`check_nproc` and :func:`launch_train` for ``--nproc N``; :func:`run_training`, which turns a collective
broken by another process into :class:`PeerFailure`; :func:`relay_failure`, which leaves one process's error line
for the launching command; :func:`write_traceback`, which keeps an unexpected error's traceback in
``RUN/error.log``.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sparc_kit.checkpoint import ERROR_LOG
from sparc_kit.engines import BatchLayout
from sparc_kit.errors import EngineSetupError, RunError, SparcError
from sparc_kit.io import atomic_write
from sparc_kit.train.loop import TrainResult, train
from sparc_kit.train.stopping import TrainingInterrupted

__all__ = [
    "launch",
    "launch_train",
    "check_nproc",
    "train_argv",
    "default_run_dir",
    "run_training",
    "relay_failure",
    "write_traceback",
    "rank_and_world",
    "LaunchResult",
    "LaunchError",
    "PeerFailure",
    "record_failure",
    "is_peer_failure",
    "ERROR_DIR_ENV",
]

ERROR_DIR_ENV = "SPARC_ERROR_DIR"  # where the processes of a `sparc train --nproc` run leave failure records

_PEER_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "socket timeout",
    "connection refused",
    "failed to recv",
    "failed to send",
)


class LaunchError(SparcError, ValueError):
    """A ``--nproc`` that cannot run the recipe (a count below 1, the one-process ``local`` engine, a batch the
    processes cannot share)."""


class PeerFailure(RunError):
    """This process stopped because another process of its run went away (a collective broke); that process's
    own error is the one to read."""


@dataclass
class LaunchResult:
    exit_code: int
    rank: int | None = None  # the process whose failure is reported
    message: str | None = None  # its one-line error


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that broke because another process of the run went away."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)


def record_failure(line: str, exit_code: int, *, from_main: bool = False, peer: bool = False) -> bool:
    """Leave this process's one-line failure for the launching ``sparc train --nproc``; False when this process
    was not started by it (then the caller prints the line itself)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    rank = int(os.environ.get("RANK", "0") or 0)
    record = {"rank": rank, "code": exit_code, "line": line, "time": time.time(), "from_main": from_main, "peer": peer}
    path = os.path.join(folder, f"rank_{rank}.json")
    atomic_write(path, json.dumps(record))
    return True


def _records(folder: str) -> dict[int, dict]:
    records = {}
    for path in glob.glob(os.path.join(folder, "rank_*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(path) as f:
                record = json.load(f)
            records[int(record["rank"])] = record
    return records


def _root_cause(folder: str, failures: dict) -> LaunchResult:
    """The failure to report: a process's own error first; then a process that died without a word (killed
    by a signal, out of memory); then an error rank 0 passed on; a broken connection to a dead peer last."""
    import signal

    records = _records(folder)
    own = [r for r in records.values() if not r.get("peer") and not r.get("from_main")]
    if own:
        first = min(own, key=lambda r: r.get("time", 0.0))
        return LaunchResult(int(first["code"]), int(first["rank"]), str(first["line"]))
    silent = [rank for rank in failures if rank not in records]
    if silent:
        rank = min(silent, key=lambda r: failures[r].timestamp)
        code = failures[rank].exitcode
        if code < 0:
            with contextlib.suppress(ValueError):
                return LaunchResult(128 - code, rank, f"process killed by {signal.Signals(-code).name}")
            return LaunchResult(128 - code, rank, f"process killed by signal {-code}")
        return LaunchResult(code or 1, rank, f"process stopped with exit code {code} and no message")
    rest = sorted(records.values(), key=lambda r: (bool(r.get("peer")), r.get("time", 0.0)))
    return LaunchResult(int(rest[0]["code"]), int(rest[0]["rank"]), str(rest[0]["line"]))


def launch(argv: Sequence[str], nproc: int, *, threads_per_process: int | None = None) -> LaunchResult:
    """Run ``python -m sparc_cli ARGV`` in ``nproc`` local processes (torch.distributed.run, standalone).

    Each process gets ``OMP_NUM_THREADS`` = the CPU count divided among the processes (unless already set).
    Returns the exit code (0 when every process succeeded) and, on failure, the failing process's rank and line.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc: must be at least 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.2", "--module", "sparc_cli", *argv]
    )
    saved_env = {k: os.environ.get(k) for k in (ERROR_DIR_ENV, "OMP_NUM_THREADS")}
    # the launcher's loggers set their own levels, so each one is quietened, not only their parent
    quiet = [name for name in logging.Logger.manager.loggerDict if name.startswith("torch.distributed")]
    quiet += ["torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"]
    levels = {name: logging.getLogger(name).level for name in quiet}
    with tempfile.TemporaryDirectory(prefix="sparc-launch-") as folder:
        os.environ[ERROR_DIR_ENV] = folder
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        for name in quiet:  # the launcher's own reports would bury the one line that matters
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            run(args)
            return LaunchResult(0)
        except ChildFailedError as exc:
            return _root_cause(folder, exc.failures)
        except KeyboardInterrupt:
            return LaunchResult(130)
        except Exception as exc:  # the launcher's SignalException: this process got SIGINT or SIGTERM
            sigval = getattr(exc, "sigval", None)
            if sigval is None:
                raise
            return LaunchResult(128 + int(sigval))
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ---------------------------------------------------------------------------------------------------------------
# `sparc train`: the checks before a launch, one process's run, and how its failure is told


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the run's process count, as the launcher set them (0 and 1 without one)."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def default_run_dir(recipe_arg: str, recipe: Any) -> str:
    """``runs/NAME``: the recipe's ``name``, else the stem of the file it was read from."""
    return os.path.join("runs", recipe.name or Path(recipe_arg).stem)


def check_nproc(nproc: int, recipe: Any) -> None:
    """Raise :class:`LaunchError` when ``nproc`` local processes cannot train ``recipe``; before any starts."""
    if nproc < 1:
        raise LaunchError(f"--nproc: must be at least 1, got {nproc}")
    if nproc == 1:
        return
    if recipe.engine.name == "local":
        raise LaunchError(
            f"--nproc {nproc}: engine.name is 'local', which runs one process; add --set engine.name=ddp "
            "(or engine.name=deepspeed)"
        )
    try:
        BatchLayout(recipe.train.batch_size, nproc, recipe.train.accum_steps)
    except EngineSetupError as exc:
        raise LaunchError(f"--nproc {nproc}: {exc}") from None


def train_argv(recipe_arg: str, overrides: Sequence[str], out_dir: str, *, quiet: bool = False) -> list[str]:
    """The ``sparc train`` arguments each launched process runs: the same recipe, overrides and run folder."""
    argv = ["train", recipe_arg, "--out", out_dir]
    for item in overrides:
        argv += ["--set", item]
    return argv + (["--quiet"] if quiet else [])


def launch_train(
    recipe_arg: str, overrides: Sequence[str], out_dir: str, nproc: int, recipe: Any, *, quiet: bool = False
) -> LaunchResult:
    """``sparc train RECIPE --nproc N``: :func:`check_nproc`, then :func:`launch` of N training processes."""
    check_nproc(nproc, recipe)
    return launch(train_argv(recipe_arg, overrides, out_dir, quiet=quiet), nproc)


def run_training(recipe: Any, out_dir: str, *, progress: bool = True) -> TrainResult:
    """:func:`~sparc_kit.train.train` as one process of a run: in a run of several, an error that only says a
    collective broke because another process went away becomes :class:`PeerFailure` (its own line is the one to
    read)."""
    try:
        return train(recipe, out_dir, progress=progress)
    except (SparcError, TrainingInterrupted):
        raise
    except Exception as exc:
        if rank_and_world()[1] > 1 and is_peer_failure(exc):
            first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise PeerFailure(f"stopped: another process of this run failed ({first})") from exc
        raise


def relay_failure(exc: BaseException, lines: Sequence[str], exit_code: int) -> list[str]:
    """The error lines this training process prints. Alone: ``lines``. One of several: its first line is left for
    `sparc train --nproc` to print (:func:`record_failure`; only the root cause is shown) and nothing is printed;
    under another launcher it is printed with the rank, unless it repeats an error of rank 0's."""
    rank, world = rank_and_world()
    if world == 1 or not lines:
        return list(lines)
    from_main = bool(getattr(exc, "from_main", False))
    if record_failure(lines[0], exit_code, from_main=from_main, peer=isinstance(exc, PeerFailure)) or from_main:
        return []
    return [f"[rank {rank}] {lines[0]}"]


def write_traceback(exc: BaseException, run_dir: str | None = None) -> str:
    """Append the whole traceback of ``exc`` to ``RUN/error.log`` (``error.rankN.log`` for process N > 0 of
    several) under a line saying when and what ran; to a temporary file without a run folder or when it cannot
    be written. Returns the file's path."""
    rank, world = rank_and_world()
    header = (
        f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}"
        f"{f' rank {rank}' if world > 1 else ''}: sparc {' '.join(sys.argv[1:])}\n"
    )
    text = header + "".join(traceback.format_exception(exc))
    if run_dir is not None:
        path = os.path.join(run_dir, ERROR_LOG if rank == 0 else f"error.rank{rank}.log")
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="sparc-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
