"""Checkpoints: weights as safetensors, trainer state beside them, written atomically.

Layout of ``RUN/checkpoints/step_00000200/``:

- ``model.safetensors``: the model weights (no pickle a user must trust);
- ``loss.safetensors``: the loss's own parameters, for losses that have some (SigLIP's bias, MGCA's
  cross-attention);
- ``trainer.pt``: optimizer state and RNG state, tensors and plain containers only, read back with
  ``torch.load(weights_only=True)``;
- ``state.json``: step, samples seen (the data position), the time trained, the bad-sample and truncation
  counts, and the data-loader worker count (a streaming dataset's order depends on it).

A checkpoint is written into a hidden temporary folder and renamed into place, then ``checkpoints/latest`` is
replaced (temporary file, then rename): a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "CheckpointInfo", "load_model_weights"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointInfo:
    path: str
    step: int
    state: dict[str, Any]


def _atomic_write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
        for name, module in {"model": model, **(extra_modules or {})}.items():
            weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            if weights or name == "model":
                save_file(weights, os.path.join(tmp, f"{name}.safetensors"), metadata={"format": "pt", "step": str(step)})
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state}, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(os.path.join(root, "latest"), name + "\n")
    _prune(root, keep)
    return final


def _complete(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "trainer.pt", "state.json"))


def _prune(root: str, keep: int) -> None:
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d)))
    for _, d in steps[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            candidate = os.path.join(root, f.read().strip())
        if _complete(candidate):
            return candidate
    steps = sorted(((int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))), reverse=True)
    for _, d in steps:
        if _complete(os.path.join(root, d)):
            return os.path.join(root, d)
    return None


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load ``model.safetensors`` from a checkpoint folder (or a .safetensors file) into ``model``, strictly."""
    file = path if path.endswith(".safetensors") else os.path.join(path, "model.safetensors")
    if not os.path.exists(file):
        raise ValueError(f"checkpoint {os.path.dirname(file)} has no {os.path.basename(file)}")
    weights = load_file(file)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {file} does not fit this model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]} (was it trained with another model section of the recipe?)"
        )


def load_checkpoint(
    path: str, model: torch.nn.Module, extra_modules: dict[str, torch.nn.Module] | None = None
) -> CheckpointInfo:
    """Load weights into ``model`` (and ``extra_modules``); return the trainer and run state to restore."""
    load_model_weights(model, path)
    for name, module in (extra_modules or {}).items():
        if module.state_dict():
            load_model_weights(module, os.path.join(path, f"{name}.safetensors"))
    trainer_state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    state["trainer"] = trainer_state
    return CheckpointInfo(path=path, step=int(state["step"]), state=state)
