"""Load a trained model for use: ``model, tokenizer, transform = sparc_kit.load_pretrained("runs/sparc_tiny")``.

What ``run_or_checkpoint`` may be (local paths):

- a run folder (holds ``recipe.yaml``): its newest complete checkpoint under ``checkpoints/`` is loaded;
- a run's ``checkpoints/`` folder: the same, with the run folder one level up;
- a checkpoint folder ``RUN/checkpoints/step_N`` (holds ``model.safetensors``): that step; ``recipe.yaml`` and
  ``tokenizer.model`` are taken from the checkpoint folder itself when present (a self-contained export), else
  from the run folder two levels up;
- a ``.safetensors`` file: those weights; ``recipe.yaml`` and ``tokenizer.model`` are looked up beside the file,
  then two levels up (so ``RUN/checkpoints/step_N/model.safetensors`` works, and so does a folder that an export
  filled with ``model.safetensors`` + ``recipe.yaml`` + ``tokenizer.model``).

Anything else raises :class:`PretrainedError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from safetensors import safe_open

from sparc_kit.checkpoint import (
    CHECKPOINTS,
    MODEL_WEIGHTS,
    RECIPE,
    STATE,
    TOKENIZER,
    latest_checkpoint,
    load_model_weights,
    step_of_folder,
)
from sparc_kit.config import load_recipe
from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.data.transforms import EvalTransform, model_image_size, transform_for  # re-exported: their earlier home
from sparc_kit.engines.base import resolve_device
from sparc_kit.errors import RecipeError, SparcError
from sparc_kit.io import WeightsFileError, load_torch_file  # re-exported: their earlier home
from sparc_kit.models import build_model

__all__ = [
    "load_pretrained",
    "find_weights",
    "Pretrained",
    "PretrainedError",
    "EvalTransform",
    "transform_for",
    "model_image_size",
    "load_torch_file",
    "WeightsFileError",
]

class PretrainedError(SparcError, ValueError):
    """A path that does not hold a loadable model (no checkpoint, no recipe, no tokenizer)."""


@dataclass
class Pretrained:
    """A loaded model with what it needs; unpacks as ``model, tokenizer, transform``."""

    model: torch.nn.Module
    tokenizer: Any
    transform: EvalTransform
    recipe: Any
    step: int | None
    checkpoint: str  # the weights file that was loaded
    run_dir: str  # where recipe.yaml was found; evaluations write RUN/eval/*.json here

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.transform))


def _resolve(target: str) -> tuple[str, str]:
    """(weights file, folder holding recipe.yaml) for a run folder, checkpoint folder or .safetensors file."""
    path = os.path.abspath(os.path.expanduser(str(target)))
    if not os.path.exists(path):
        raise PretrainedError(f"{target}: no such run folder, checkpoint folder or .safetensors file")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise PretrainedError(f"{target}: expected a run folder, a checkpoint folder or a .safetensors file")
        return path, _recipe_home(os.path.dirname(path), target)
    if os.path.basename(path) == CHECKPOINTS and os.path.exists(os.path.join(os.path.dirname(path), RECIPE)):
        path = os.path.dirname(path)
    if os.path.exists(os.path.join(path, MODEL_WEIGHTS)):  # a checkpoint folder
        return os.path.join(path, MODEL_WEIGHTS), _recipe_home(path, target)
    if os.path.exists(os.path.join(path, RECIPE)):  # a run folder
        ckpt = latest_checkpoint(os.path.join(path, CHECKPOINTS))
        if ckpt is None:
            raise PretrainedError(
                f"{target}: run folder has no complete checkpoint under checkpoints/ (train it first)"
            )
        return os.path.join(ckpt, MODEL_WEIGHTS), path
    raise PretrainedError(
        f"{target}: not a run folder (no recipe.yaml) nor a checkpoint folder (no model.safetensors)"
    )


def find_weights(run_or_checkpoint: str | os.PathLike) -> str:
    """The weights file :func:`load_pretrained` would load from a run folder, checkpoint folder or .safetensors
    file (``model.init_from`` with format ``sparc`` reads it)."""
    return _resolve(str(run_or_checkpoint))[0]


def _recipe_home(folder: str, target: str) -> str:
    for candidate in (folder, os.path.dirname(os.path.dirname(folder))):
        if os.path.exists(os.path.join(candidate, RECIPE)):
            return candidate
    raise PretrainedError(f"{target}: no recipe.yaml beside the weights nor in the run folder two levels up")


def _step_of(weights: str) -> int | None:
    folder = os.path.dirname(weights)
    state = os.path.join(folder, STATE)
    if os.path.exists(state):
        try:
            with open(state) as f:
                return int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    step = step_of_folder(os.path.basename(folder))
    if step is not None:
        return step
    try:
        with safe_open(weights, "pt") as f:
            step = (f.metadata() or {}).get("step")
        return int(step) if step is not None else None
    except Exception:
        return None


def load_pretrained(run_or_checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """Build the recipe's model, load the checkpoint's weights (strictly), and put the model in eval mode.

    Returns a :class:`Pretrained` (``model, tokenizer, transform = load_pretrained(path)`` also works). The
    tokenizer is the run's ``tokenizer.model`` (else the recipe's ``tokenizer.path``) with the recipe's context
    length and casing; ``transform`` maps a PIL image or uint8 tensor to the model's normalised input.
    """
    try:
        device = resolve_device(device, field="device")
    except ValueError as exc:
        raise PretrainedError(str(exc)) from None
    weights, home = _resolve(str(run_or_checkpoint))
    recipe_path = os.path.join(home, RECIPE)
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as exc:
        raise PretrainedError(f"{recipe_path}: not a valid recipe: {exc.problems[0]}") from None
    t = recipe.tokenizer
    tokenizer_path = next(
        (p for p in (os.path.join(os.path.dirname(weights), TOKENIZER), os.path.join(home, TOKENIZER))
         if os.path.exists(p)),
        t.path,
    )
    if not tokenizer_path:
        raise PretrainedError(f"{home}: no tokenizer.model and the recipe names no tokenizer.path")
    try:
        tokenizer = Tokenizer.load(
            tokenizer_path, context_length=t.context_length, lowercase=t.lowercase, add_eos=t.add_eos
        )
    except (OSError, RuntimeError) as exc:
        raise PretrainedError(f"{tokenizer_path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    model = build_model(recipe)
    try:
        load_model_weights(model, weights)
    except ValueError as exc:  # weights of another model section
        raise PretrainedError(str(exc).splitlines()[0]) from None
    model.to(device).eval()
    return Pretrained(
        model=model,
        tokenizer=tokenizer,
        transform=transform_for(model, recipe),
        recipe=recipe,
        step=_step_of(weights),
        checkpoint=weights,
        run_dir=home,
    )
