"""Starting N local training processes, and reporting a failure of any of them in one line.

``launch(["train", RECIPE, "--out", DIR], nproc=N)`` runs ``python -m sparc_cli train RECIPE --out DIR`` in N
processes through torch's own launcher (``torch.distributed.run``, in this process, as ``--standalone``: a
free rendezvous port on this host). When any process fails, the launcher stops the others; the failing
process leaves a one-line record (:func:`record_failure`) and :func:`launch` returns that process's exit code
with its line, so the user sees the root cause, not the other processes being stopped.

Multi-node runs use the launchers directly (``torchrun --nnodes``, ``srun``, the ``deepspeed`` launcher); see
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

__all__ = ["launch", "LaunchResult", "record_failure", "is_peer_failure", "ERROR_DIR_ENV"]

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
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
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
        raise ValueError(f"--nproc: must be at least 1, got {nproc}")
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
