"""Checkpoints: weights as safetensors, trainer state beside them, written atomically; the one module that
knows the names of a run folder's and a checkpoint folder's files (the constants below) and the step-folder
pattern. It sits below the engines, the training loop and :mod:`sparc_kit.pretrained`, which all read or write
these files.

Layout of ``RUN/`` (``RECIPE``, ``TOKENIZER``, ``METRICS``, ``CHECKPOINTS``; evaluations write ``EVAL/NAME.json``)
and of ``RUN/checkpoints/step_00000200/``:

- ``model.safetensors``: the model weights (no pickle a user must trust);
- ``loss.safetensors``: the loss's own parameters, for losses that have some (SigLIP's bias, MGCA's
  cross-attention);
- ``trainer.pt``: optimizer state (``local`` and ``ddp``) and every process's RNG state, tensors and plain
  containers only, read back with ``torch.load(weights_only=True)``;
- ``deepspeed/``: DeepSpeed's own checkpoint (each process's ZeRO partition of weights and optimizer state),
  for runs of the ``deepspeed`` engine; ``model.safetensors`` beside it holds the consolidated fp32 weights;
- ``state.json``: step, samples seen (the data position), the time trained, the bad-sample and truncation
  counts, the data-loader worker count (a streaming dataset's order depends on it), the engine, the number of
  processes, the accumulation steps, and ``files``: every other file and folder of the checkpoint (written last).

A checkpoint is written into a hidden temporary folder (``.tmp-step_N``, the same name on every process, so
all of them write their parts into it) and renamed into place by rank 0 once every process is done, then
``checkpoints/latest`` is replaced (temporary file, then rename): a crash or SIGKILL at any moment leaves the
previous checkpoint usable, and a stale temporary folder is removed by the next save. A step folder is deleted
(pruned, or replaced by a new save of its step) by renaming it to a temporary name first. A resume takes the
folder ``latest`` names, or, when that is gone or lacks a file, the newest complete one, and says so in one
line (:func:`resume_checkpoint`, :class:`ResumeWarning`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sparc_kit.io import atomic_path, atomic_write, load_torch_file

__all__ = [
    "RECIPE",
    "TOKENIZER",
    "METRICS",
    "CHECKPOINTS",
    "EVAL",
    "LOCK",
    "ERROR_LOG",
    "LATEST",
    "MODEL_WEIGHTS",
    "TRAINER_STATE",
    "STATE",
    "DEEPSPEED",
    "weights_file",
    "step_of_folder",
    "save_checkpoint",
    "save_train_checkpoint",
    "load_checkpoint",
    "read_checkpoint_state",
    "latest_checkpoint",
    "resume_checkpoint",
    "CheckpointInfo",
    "ResumeWarning",
    "load_model_weights",
    "load_module_weights",
    "write_safetensors",
    "step_folder_name",
]

# a run folder
RECIPE = "recipe.yaml"  # the fully resolved recipe the run trains
TOKENIZER = "tokenizer.model"  # the SentencePiece model it trained or was given
METRICS = "metrics.jsonl"  # one row per logged step
CHECKPOINTS = "checkpoints"  # the step folders and the LATEST pointer
EVAL = "eval"  # sparc eval's results, one NAME.json each
LOCK = ".lock"  # locked by the training process for the whole run; holds its pid
ERROR_LOG = "error.log"  # the traceback of an unexpected error that ended a start (error.rankN.log: process N)
# a checkpoint folder
LATEST = "latest"  # in CHECKPOINTS: the name of the newest complete step folder
MODEL_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
STATE = "state.json"  # written last; lists the folder's other files
DEEPSPEED = "deepspeed"  # DeepSpeed's own checkpoint, for runs of that engine

_STEP_DIR = re.compile(r"^step_(\d+)$")


def weights_file(part: str) -> str:
    """The safetensors file of one part of a checkpoint: ``model.safetensors``, ``loss.safetensors``."""
    return f"{part}.safetensors"


def step_of_folder(name: str) -> int | None:
    """The step of a step folder's name (``step_00000200`` -> 200), else None."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None

WRITE_DELAY_ENV = "SPARC_TEST_WRITE_DELAY"


def write_pause() -> None:
    """For fault tests only: when ``$SPARC_TEST_WRITE_DELAY`` is set, sleep that many seconds at the points of a
    checkpoint or metrics write where a crash is worst (between files, between the rename and the pointer, in the
    middle of a metrics row), so that a test's SIGKILL can land there. It changes no number."""
    delay = os.environ.get(WRITE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


class ResumeWarning(UserWarning):
    """A resume passed over a checkpoint it could not use and started from an older one (one line: which, why)."""


@dataclass
class CheckpointInfo:
    path: str
    step: int
    state: dict[str, Any]


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def write_safetensors(path: str, weights: dict[str, torch.Tensor], step: int | None = None) -> None:
    """``weights`` as a safetensors file, written to a temporary name and renamed into place."""
    metadata = {"format": "pt"} if step is None else {"format": "pt", "step": str(step)}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp, metadata=metadata)


def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
    extra_modules: dict[str, torch.nn.Module] | None = None,
) -> str:
    """Write checkpoint ``step`` under ``root`` (the run's ``checkpoints/`` folder); keep the newest ``keep``.

    ``extra_modules`` (e.g. ``{"loss": loss_fn}``) are saved as ``NAME.safetensors`` when they hold tensors.
    """
    os.makedirs(root, exist_ok=True)
    name = step_folder_name(step)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
        parts = {part: module.state_dict() for part, module in {"model": model, **(extra_modules or {})}.items()}
        _write_files(tmp, step, parts, trainer_state, state)
        return _publish(root, tmp, step, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(
    folder: str,
    step: int,
    parts: dict[str, dict[str, torch.Tensor]],
    trainer_state: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """A checkpoint's files in ``folder``: ``NAME.safetensors`` per part that holds tensors (``model`` always),
    ``trainer.pt`` and, last, ``state.json``, which lists every other file and folder there (``files``)."""
    for part, tensors in parts.items():
        if tensors or part == "model":
            write_safetensors(os.path.join(folder, weights_file(part)), tensors, step)
            write_pause()
    torch.save(trainer_state, os.path.join(folder, TRAINER_STATE))
    write_pause()
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))  # what a resume checks is there
    with open(os.path.join(folder, STATE), "w") as f:
        json.dump({"step": step, **state, "files": files}, f, indent=1)


def _publish(root: str, tmp: str, step: int, keep: int) -> str:
    """Rename the finished temporary folder into place, point ``latest`` at it, prune old checkpoints."""
    name = step_folder_name(step)
    final = os.path.join(root, name)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    if os.path.exists(final):
        _remove(final)
    os.replace(tmp, final)
    write_pause()
    atomic_write(os.path.join(root, LATEST), name + "\n")
    write_pause()
    _prune(root, keep, step)
    return final


def _split(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A train module's state dict (``model.*``, ``loss.*``) as one state dict per file."""
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "loss": {}}
    for key, value in weights.items():
        head, _, rest = key.partition(".")
        parts.setdefault(head, {})[rest] = value
    return parts


def save_train_checkpoint(
    root: str,
    step: int,
    engine: Any,
    state: dict[str, Any],
    rng_state: dict[str, torch.Tensor],
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` of a run through its engine; every process calls it (it is collective).

    The engine consolidates the weights (``full_state_dict``) and writes its own state (``save``: the optimizer,
    or DeepSpeed's partitions); rank 0 writes the safetensors files, ``trainer.pt`` and ``state.json``, then
    renames the folder into place. ``rng_state`` is this process's; all of them are kept.
    """
    tmp = os.path.join(root, f".tmp-{step_folder_name(step)}")
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    engine.barrier()
    try:
        weights = engine.full_state_dict()
        rngs = engine.gather_objects(rng_state)
        trainer = engine.save(tmp)
        engine.barrier()  # every process's part is on disk
        if engine.is_main:
            _write_files(tmp, step, _split(weights), {**trainer, "rng": rngs}, state)
            _publish(root, tmp, step, keep)
    except BaseException:
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    engine.barrier()
    return os.path.join(root, step_folder_name(step))


def read_checkpoint_state(path: str) -> dict[str, Any]:
    """A checkpoint's ``state.json`` and ``trainer.pt`` (as ``state["trainer"]``), without touching weights."""

    trainer_state = load_torch_file(os.path.join(path, TRAINER_STATE))
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    state["trainer"] = trainer_state
    return state


_REQUIRED = (MODEL_WEIGHTS, TRAINER_STATE, STATE)


def _missing(path: str) -> list[str]:
    """What a step folder lacks to be resumed from: one of the files every checkpoint has, or one that its
    ``state.json`` lists (checkpoints written before that list have only the first check)."""
    missing = [f for f in _REQUIRED if not os.path.exists(os.path.join(path, f))]
    if missing:
        return missing
    try:
        with open(os.path.join(path, STATE)) as f:
            listed = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        return ["readable state.json"]
    return [f for f in listed if not os.path.exists(os.path.join(path, f))]


def _step_folders(root: str) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d)))


def _remove(path: str) -> None:
    """Delete a step folder by renaming it to a temporary name first, so that a kill in the middle of deleting
    never leaves a folder under a checkpoint's name with some of its files gone."""
    doomed = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".tmp-{os.path.basename(path)}-old-")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(root: str, keep: int, newest: int) -> None:
    """Keep the newest ``keep`` complete checkpoints up to ``newest`` (the one just published) and remove every
    other step folder: older ones, incomplete ones, and any past ``newest``, which a run that resumed from an
    earlier checkpoint (a fallback, or a pointer never moved to a folder renamed into place) has left behind and
    retrains. Then remove the temporary folders and pointer files a killed save left (called once the new
    checkpoint is in place, when no save is under way)."""
    steps = _step_folders(root)
    complete = [d for step, d in steps if step <= newest and not _missing(os.path.join(root, d))]
    kept = set(complete[-keep:])
    for _, d in steps:
        if d not in kept:
            _remove(os.path.join(root, d))
    for d in os.listdir(root):
        path = os.path.join(root, d)
        if d.startswith(".tmp-step_") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif d.startswith(".tmp-") and os.path.isfile(path):  # a `latest` whose writer was killed before its rename
            os.remove(path)


def resume_checkpoint(root: str) -> tuple[str | None, str | None]:
    """The checkpoint a run resumes from, and one line saying what was passed over, if anything (else None).

    ``latest`` names the checkpoint when it is complete; otherwise (it names a folder that is gone or lacks a
    file) the newest complete step folder is taken, and the line says which ones were skipped and why.
    """
    if not os.path.isdir(root):
        return None, None
    skipped: list[str] = []
    named = None
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        candidate = os.path.join(root, named)
        if not _STEP_DIR.match(named):
            skipped.append(f"{pointer} holds {named!r}, not a checkpoint name")
        elif not os.path.isdir(candidate):
            skipped.append(f"{pointer} names {named}, which does not exist")
        elif missing := _missing(candidate):
            skipped.append(f"checkpoint {candidate} is incomplete (no {', '.join(missing)})")
        else:
            return candidate, None
    for _, d in reversed(_step_folders(root)):
        if d == named:
            continue
        path = os.path.join(root, d)
        missing = _missing(path)
        if not missing:
            return path, "; ".join([*skipped, f"resuming from {d}"]) if skipped else None
        skipped.append(f"checkpoint {path} is incomplete (no {', '.join(missing)})")
    return None, "; ".join([*skipped, "no complete checkpoint is left: starting from step 0"]) if skipped else None


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint folder under ``root`` (the one ``latest`` names when it is complete), or
    None; :func:`resume_checkpoint` also says what it passed over."""
    return resume_checkpoint(root)[0]


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load ``model.safetensors`` from a checkpoint folder (or a .safetensors file) into ``model``, strictly."""
    file = path if path.endswith(".safetensors") else os.path.join(path, MODEL_WEIGHTS)
    if not os.path.exists(file):
        raise ValueError(f"checkpoint {os.path.dirname(file)} has no {os.path.basename(file)}")
    weights = load_file(file)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {file} does not fit this model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]} (was it trained with another model section of the recipe?)"
        )


def load_module_weights(module: torch.nn.Module, path: str) -> None:
    """Load a checkpoint folder's ``model.safetensors`` (and ``loss.safetensors``) into a train module
    (``module.model``, ``module.loss``), strictly."""
    load_model_weights(module.model, path)
    if module.loss.state_dict():
        load_model_weights(module.loss, os.path.join(path, weights_file("loss")))


def load_checkpoint(
    path: str, model: torch.nn.Module, extra_modules: dict[str, torch.nn.Module] | None = None
) -> CheckpointInfo:
    """Load weights into ``model`` (and ``extra_modules``); return the trainer and run state to restore."""
    load_model_weights(model, path)
    for name, module in (extra_modules or {}).items():
        if module.state_dict():
            load_model_weights(module, os.path.join(path, weights_file(name)))
    state = read_checkpoint_state(path)
    return CheckpointInfo(path=path, step=int(state["step"]), state=state)
