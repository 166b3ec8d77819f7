"""The run folders under a folder, one summary each: what ``sparc runs`` prints.

A run folder is recognised by its files: ``recipe.yaml`` (:data:`~sparc_kit.checkpoint.RECIPE`) with a
``metrics.jsonl``, a ``checkpoints/`` folder or the trainer's ``.lock`` beside it. Nothing is loaded but text
and JSON (no model, no plugin), so listing hundreds of runs is quick, and a run in progress is read without
disturbing it:

- ``step``: the newest of the last logged step and the newest complete checkpoint; ``total``: the recipe's
  ``train.steps``; ``last_loss``: the ``loss`` of the last ``metrics.jsonl`` row;
- the best evaluation: the one a sweep report would rank by (:func:`~sparc_kit.ablate.report.preferred_eval`,
  a top-1 or R@1-like one first), its best value over the logged rows and ``RUN/eval/*.json``, in the direction
  its evaluator declares (:func:`~sparc_kit.ablate.report.default_mode`);
- ``status``: ``running`` while a process holds the folder's lock (its pid from ``.lock``); else ``finished`` when
  a checkpoint of the last step exists; else ``failed`` when the run's last start ended on an unexpected error
  (``RUN/error.log``, where ``sparc train`` writes the traceback, is at least as new as ``metrics.jsonl``); else
  ``interrupted`` (stopped by Ctrl-C or SIGTERM, killed, or stopped by a run error such as a non-finite loss: the
  lock is released by the operating system when the process ends, whatever ended it);
- ``size``: the bytes of every file in the folder.

A folder whose ``recipe.yaml`` cannot be read is passed over and reported in :attr:`RunList.skipped`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import yaml

from sparc_kit.ablate.report import (
    default_mode,
    entry_tasks,
    eval_file_metrics,
    preferred_eval,
    row_eval_metrics,
    with_file_tasks,
)
from sparc_kit.checkpoint import CHECKPOINTS, ERROR_LOG, LOCK, METRICS, RECIPE
from sparc_kit.errors import SparcError
from sparc_kit.train.run_folder import checkpoint_step, read_metrics

__all__ = ["RunSummary", "RunList", "RunsError", "list_runs", "summarize_run", "lock_holder", "is_run_folder"]

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it: about 7x faster on a recipe


class RunsError(SparcError, ValueError):
    """The folder to list does not exist or is not a folder."""


@dataclass
class RunSummary:
    path: str
    recipe: str  # the recipe's name (else the folder's)
    loss: str | None  # the recipe's loss name
    step: int  # the newest of the last logged step and the last checkpoint
    total: int | None  # train.steps
    checkpoint_step: int  # the newest complete checkpoint (0: none)
    last_loss: float | None
    best_metric: str | None  # eval/NAME/KEY
    best_value: float | None
    best_step: int | None
    best_mode: str | None  # "max" or "min"
    status: str  # "running", "finished", "failed" or "interrupted"
    pid: int | None  # the training process, while running (-1: not known yet)
    size_bytes: int

    @property
    def status_text(self) -> str:
        if self.status != "running":
            return self.status
        return f"running (pid {self.pid})" if self.pid and self.pid > 0 else "running (pid ?)"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status_text": self.status_text}


@dataclass
class RunList:
    root: str
    runs: list[RunSummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "PATH: why", one per unreadable run folder


def is_run_folder(path: str) -> bool:
    """Whether ``path`` holds a run: ``recipe.yaml`` and one of ``metrics.jsonl``, ``checkpoints/``, ``.lock``."""
    return os.path.isfile(os.path.join(path, RECIPE)) and any(
        os.path.exists(os.path.join(path, name)) for name in (METRICS, CHECKPOINTS, LOCK)
    )


def list_runs(root: str = ".") -> RunList:
    """Every run folder under ``root`` (``root`` itself included), sorted by path; a run folder's own
    sub-folders are not searched (its checkpoints are not runs)."""
    if not os.path.isdir(root):
        raise RunsError(f"{root}: no such folder (give the folder that holds run folders, e.g. runs)")
    found = RunList(root=root)
    for folder, subfolders, _ in os.walk(root, onerror=lambda exc: found.skipped.append(_why(exc))):
        subfolders.sort()
        if not is_run_folder(folder):
            continue
        subfolders[:] = []
        try:
            found.runs.append(summarize_run(folder))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            found.skipped.append(f"{folder}: {_why(exc)}")
    found.runs.sort(key=lambda r: r.path)
    return found


def _failed_last(run_dir: str) -> bool:
    """Whether the traceback file is at least as new as the metrics: the last start ended on an unexpected error
    (an older one belongs to a start that a later resume went past)."""
    try:
        failed_at = os.path.getmtime(os.path.join(run_dir, ERROR_LOG))
    except OSError:
        return False
    try:
        return failed_at >= os.path.getmtime(os.path.join(run_dir, METRICS))
    except OSError:
        return True  # failed before the first logged step


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def summarize_run(run_dir: str) -> RunSummary:
    """One run folder's summary (see the module docs). ``ValueError`` when its ``recipe.yaml`` is not a recipe."""
    with open(os.path.join(run_dir, RECIPE)) as f:
        recipe = yaml.load(f, Loader=_LOADER)
    if not isinstance(recipe, dict):
        raise ValueError(f"{RECIPE} holds no recipe mapping")
    section = lambda name: recipe.get(name) if isinstance(recipe.get(name), dict) else {}  # noqa: E731
    total = section("train").get("steps")
    rows = read_metrics(run_dir)
    ckpt = checkpoint_step(os.path.join(run_dir, CHECKPOINTS))
    last = rows[-1] if rows else {}
    pid = lock_holder(run_dir)
    best = _best_eval(run_dir, rows, recipe.get("eval"))
    if pid is not None:
        status = "running"
    elif isinstance(total, int) and ckpt >= total:
        status = "finished"
    elif _failed_last(run_dir):
        status = "failed"
    else:
        status = "interrupted"
    return RunSummary(
        path=run_dir,
        recipe=str(recipe.get("name") or os.path.basename(os.path.abspath(run_dir))),
        loss=section("loss").get("name"),
        step=max(ckpt, int(last.get("step", 0) or 0)),
        total=total if isinstance(total, int) else None,
        checkpoint_step=ckpt,
        last_loss=float(last["loss"]) if isinstance(last.get("loss"), (int, float)) else None,
        best_metric=best[0],
        best_value=best[1],
        best_step=best[2],
        best_mode=best[3],
        status=status,
        pid=pid,
        size_bytes=_size(run_dir),
    )


def _best_eval(run_dir: str, rows: list[dict[str, Any]], entries: Any) -> tuple[Any, Any, Any, Any]:
    """``(metric, best value, its step, mode)`` over the logged rows and ``RUN/eval/*.json``; all None when the
    run has no evaluation."""
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    specs = [SimpleNamespace(name=e.get("name"), task=e.get("task"), data=e.get("data", "")) for e in entries]
    tasks = with_file_tasks(entry_tasks(specs), [run_dir])
    seen: list[tuple[str, float, int | None]] = []
    for row in rows:
        seen += [(k, v, row.get("step")) for k, v in row_eval_metrics(row).items()]
    files = eval_file_metrics(run_dir)
    seen += [(k, v, None) for k, v in files.items()]
    names = list(dict.fromkeys(k for k, _, _ in seen))
    metric = preferred_eval(names, tasks)
    if metric is None:
        return None, None, None, None
    mode = default_mode(metric, tasks)
    values = [(v, s) for k, v, s in seen if k == metric]
    value, step = (max if mode == "max" else min)(values, key=lambda vs: vs[0])
    return metric, value, step, mode


def _size(run_dir: str) -> int:
    total = 0
    for folder, _, files in os.walk(run_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while we walked (a checkpoint being pruned)
                continue
    return total


def lock_holder(run_dir: str) -> int | None:
    """The pid of the process training into ``run_dir`` (it holds ``.lock``; -1 while it has not yet written its
    pid there), else None.

    Read without taking the lock (a trainer starting at that moment would be refused): on Linux the kernel's
    table of held locks (``/proc/locks``) says whether one is held on the file; elsewhere the pid the trainer
    wrote into it must be a live process."""
    path = os.path.join(run_dir, LOCK)
    try:
        with open(path) as f:
            text = f.read().strip()
        info = os.stat(path)
    except OSError:
        return None
    pid = int(text) if text.isdigit() else None
    held = _held_in_proc_locks(info, pid)
    if held is None:
        held = pid is not None and _alive(pid)
    return (pid or -1) if held else None


def _held_in_proc_locks(info: os.stat_result, pid: int | None) -> bool | None:
    """Whether ``/proc/locks`` lists a lock on the file ``info`` describes (its device and inode; or its inode,
    held by ``pid``, where a layered filesystem reports another device); None when there is no such table."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":  # "->": a process waiting for the lock, not holding it
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if int(inode) != info.st_ino:
                continue
            if os.makedev(int(major, 16), int(minor, 16)) == info.st_dev or parts[4] == str(pid):
                return True
        except ValueError:
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
