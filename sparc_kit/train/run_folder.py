"""A run folder across runs: its lock, its ``metrics.jsonl`` and the checks that a resume trains the same run.

A second trainer on a folder is refused (:class:`RunFolderBusyError`); a resume whose recipe would build
another model, or whose engine, process count or data-loader workers would change what is trained, is refused
before anything in the folder changes (:class:`ResumeMismatchError`); rows logged after the checkpoint a run
resumes from are dropped, since those steps are trained again.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any

import torch
import yaml

from sparc_kit.checkpoint import (
    LOCK,
    METRICS,
    RECIPE,
    ResumeWarning,
    latest_checkpoint,
    resume_checkpoint,
)
from sparc_kit.config import canonical_values, recipe_schema
from sparc_kit.engines.base import Engine, EngineSetupError
from sparc_kit.errors import RunError
from sparc_kit.io import atomic_open

__all__ = [
    "RunFolderBusyError",
    "ResumeMismatchError",
    "run_lock",
    "read_metrics",
    "truncate_metrics",
    "check_resume",
    "check_engine_resume",
    "resume_point",
    "checkpoint_step",
]


class RunFolderBusyError(RunError, RuntimeError):
    """Another process is training into the same run folder."""


@contextlib.contextmanager
def run_lock(out_dir: str):
    """An exclusive lock on ``out_dir/.lock`` for the whole run: two trainers in one folder would interleave
    their checkpoints and metrics. The lock is released by the OS if the process dies."""
    import fcntl

    path = os.path.join(out_dir, LOCK)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise RunFolderBusyError(
                f"run folder {out_dir} is in use by another training process (pid {owner}); wait for it, or use "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ResumeMismatchError(RunError, ValueError):
    """The run folder holds a checkpoint of a different model or tokenizer than the recipe asks for."""


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
    return rows


def truncate_metrics(run_dir: str, last_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: those steps are trained again."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    path = os.path.join(run_dir, METRICS)
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def check_resume(run_dir: str, recipe: Any) -> None:
    path = os.path.join(run_dir, RECIPE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = _with_defaults(canonical_values(yaml.safe_load(f) or {}))
    new = recipe.model_dump(mode="json")
    diffs = []
    for section in ("model", "tokenizer"):
        for key, (a, b) in _diff(old.get(section), new.get(section), section).items():
            if key != RESUME_IGNORES and not key.startswith(RESUME_IGNORES + "."):
                diffs.append(f"{key} (checkpoint: {a!r}, recipe: {b!r})")
    if diffs:
        raise ResumeMismatchError(
            f"run folder {run_dir} holds a checkpoint of another model: {'; '.join(diffs[:4])}. "
            "Use a new --out folder, or the recipe the run was started with"
        )


#: where a resumed run may differ: the weights it started from (it loads its own checkpoint, not those)
RESUME_IGNORES = "model.init_from"


def _with_defaults(old: dict[str, Any]) -> dict[str, Any]:
    """A run folder's recipe with the defaults of fields added since it was written (a resume compares it with
    a recipe that has them); as written when it no longer validates."""
    try:
        return recipe_schema().model_validate(old).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - compared as written; the differences are reported then
        return old


def _diff(a: Any, b: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(a) | set(b)):
            out.update(_diff(a.get(key), b.get(key), f"{prefix}.{key}"))
        return out
    return {} if a == b else {prefix: (a, b)}


def resume_point(root: str) -> str | None:
    """The checkpoint to resume from; a warning of one line when a newer one had to be passed over."""
    path, note = resume_checkpoint(root)
    if note:
        warnings.warn(note, ResumeWarning, stacklevel=2)
    return path


def checkpoint_step(root: str) -> int:
    path = latest_checkpoint(root)
    return int(os.path.basename(path).split("_")[1]) if path else 0


def check_engine_resume(saved: dict[str, Any], recipe: Any, engine: Engine, dataset: Any, out_dir: str) -> None:
    """What a checkpoint of another engine, process count or worker count can and cannot be resumed with."""
    old_engine = saved.get("engine", "local")
    old_world = int(saved.get("world_size", 1))
    torch_format = {"local", "ddp"}
    if (old_engine in torch_format) != (engine.name in torch_format):
        raise EngineSetupError(
            f"run folder {out_dir} was trained with engine {old_engine!r}, whose checkpoints engine "
            f"{engine.name!r} cannot resume; resume with --set engine.name={old_engine}, or use a new --out"
        )
    if engine.name == "deepspeed" and old_engine == "deepspeed":
        old_stage = saved.get("zero_stage")
        if old_world != engine.world_size or (old_stage is not None and old_stage != recipe.engine.zero_stage):
            raise EngineSetupError(
                f"run folder {out_dir} holds a DeepSpeed ZeRO-{old_stage} checkpoint of {old_world} processes; "
                f"resume it with {old_world} processes (--nproc {old_world}) and engine.zero_stage={old_stage}, "
                "or use a new --out"
            )
    started_workers = saved.get("num_workers", recipe.train.num_workers)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if started_workers != recipe.train.num_workers:
            raise ResumeMismatchError(
                f"run folder {out_dir} was trained with train.num_workers={started_workers}; a streaming dataset's "
                f"sample order depends on it, so resume with --set train.num_workers={started_workers}"
            )
        if old_world != engine.world_size:
            raise EngineSetupError(
                f"run folder {out_dir} was trained by {old_world} process(es) on a streaming dataset, whose sample "
                f"order depends on the process count; resume with {old_world} process(es)"
            )
