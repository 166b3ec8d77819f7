"""``model.init_from``: start a run from existing weights (an open_clip CLIP checkpoint, a timm ViT, another
sparc-kit run).

The loop reads the file when a run starts (:func:`read_init_weights`, before the run folder is written, so a
missing or unreadable file changes nothing there) and loads it into the freshly built model before the engine
wraps it (:func:`apply_init_weights`), on every process; a resumed run loads its own checkpoint instead and never
opens the file. The names are mapped by :mod:`sparc_kit.models.convert`. Problems are
:class:`~sparc_kit.errors.RecipeError` lines naming ``model.init_from``; every tensor that was not loaded is
reported on a line of its own. ``load_init_weights(model, recipe)`` does both steps, for scripts and tests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparc_kit.errors import RecipeError, require_recipe
from sparc_kit.io import WeightsFileError
from sparc_kit.models.convert import Fitted, fit_weights, open_clip_names, sparc_names, timm_names
from sparc_kit.models.timm_encoder import load_state_dict_file
from sparc_kit.pretrained import PretrainedError, find_weights

__all__ = ["InitWeights", "read_init_weights", "apply_init_weights", "load_init_weights", "WEIGHT_SUFFIXES"]

log = logging.getLogger("sparc_kit.init_from")

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: what a folder given to the open_clip or timm format is searched for (open_clip's and Hugging Face's names)
FOLDER_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
#: a name each format's state dict always has, to tell a file of one format from another's
SIGNATURES = {
    "open_clip": ("visual.conv1.weight", "visual.trunk.patch_embed.proj.weight", "token_embedding.weight"),
    "timm": ("patch_embed.proj.weight",),
    "sparc": ("vision_adapter.weight",),
}
#: the model's tensors each format fills (the rest, e.g. h_v or an attention pooler, keep their initialisation)
COVERS = {
    "open_clip": ("vision.", "text.", "vision_adapter.", "text_adapter.", "log_logit_scale"),
    "timm": ("vision.",),
    "sparc": ("",),
}
PATH = "model.init_from.path"


@dataclass
class InitWeights:
    """A read ``model.init_from`` file: the section, the file and its state dict."""

    section: Any
    file: str
    state: dict[str, torch.Tensor]


def _file(section: Any) -> str:
    path = os.path.expanduser(section.path)
    if "://" not in path and not os.path.exists(path):
        raise RecipeError([f"{PATH}: {section.path}: no such file or folder"])
    if section.format == "sparc":
        if os.path.isfile(path) and path.endswith(".safetensors"):
            return path
        try:
            return find_weights(path)
        except PretrainedError as exc:
            raise RecipeError([f"{PATH}: {exc}"]) from None
    if os.path.isdir(path):
        for name in FOLDER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise RecipeError([f"{PATH}: folder {section.path} holds none of {', '.join(FOLDER_FILES)}; give the file"])
    if not path.endswith(WEIGHT_SUFFIXES):
        raise RecipeError([
            f"{PATH}: {section.path}: expected a {', '.join(WEIGHT_SUFFIXES)} file (or, with format sparc, a run "
            "or checkpoint folder)"
        ])
    return path


def _guess(state: dict[str, torch.Tensor]) -> str | None:
    return next((fmt for fmt, names in SIGNATURES.items() if any(n in state for n in names)), None)


def read_init_weights(recipe: Any) -> InitWeights | None:
    """Read the recipe's ``model.init_from`` file (None when the recipe has none); refuse a missing file, one that
    is not a weights-only state dict, and one of another format than ``model.init_from.format``."""
    require_recipe(recipe, "read_init_weights")
    section = recipe.model.init_from
    if section is None:
        return None
    file = _file(section)
    try:
        state = load_state_dict_file(file)
    except WeightsFileError as exc:
        raise RecipeError([f"{PATH}: {exc}"]) from None
    except (OSError, ValueError) as exc:
        raise RecipeError([f"{PATH}: {file}: cannot read it as weights ({str(exc).splitlines()[0]})"]) from None
    found = _guess(state)
    if found != section.format:
        what = f"looks like a {found} state dict" if found else "has none of the names a state dict of it has"
        hint = f"; set model.init_from.format={found}" if found else ""
        raise RecipeError([
            f"model.init_from.format: {section.format}, but {file} {what} "
            f"(e.g. {', '.join(list(state)[:3]) or 'no tensors'}){hint}"
        ])
    if section.format == "open_clip" and any(k.startswith("visual.trunk.") for k in state):
        raise RecipeError([
            f"{PATH}: {file} is an open_clip model with a timm image tower (visual.trunk.*); only open_clip's own "
            "ViT (visual.conv1, visual.transformer) is mapped"
        ])
    return InitWeights(section=section, file=file, state=state)


def _describe(fitted: Fitted, source: InitWeights, strict: bool) -> list[str]:
    shapes = source.state
    lines = [
        f"init_from: {name} {list(shapes[name].shape) if name in shapes else ''} of {source.file} maps to nothing "
        "in the model: not loaded"
        for name in fitted.unmapped
    ]
    lines += [f"init_from: {name}: {source.file} holds no value for it: kept at initialisation" for name in fitted.unset]
    lines += [f"init_from: {name} resampled: {note}" for name, note in fitted.resampled.items()]
    if fitted.clamped:
        lines.append(f"init_from: {fitted.clamped}")
    kept = f"; {len(fitted.kept)} outside the {source.section.format} weights kept at initialisation" if fitted.kept else ""
    lines.append(
        f"init_from: loaded {len(fitted.loaded)} tensors from {source.file} ({source.section.format}, strict="
        f"{str(strict).lower()}){kept}"
    )
    return lines


def apply_init_weights(
    model: torch.nn.Module, recipe: Any, source: InitWeights, echo: Callable[[str], None] | None = None
) -> Fitted:
    """Load a read ``model.init_from`` file into ``model`` (built from ``recipe``); each line of the report goes
    to ``echo`` (default: this module's logger)."""
    section = source.section
    vision = recipe.model.vision.name
    if section.format == "open_clip" and vision != "vit":
        raise RecipeError([f"model.init_from.format: open_clip weights load into model.vision.name=vit, not {vision!r}"])
    if section.format == "open_clip":
        mapped, unmapped = open_clip_names(source.state)
    elif section.format == "timm":
        mapped, unmapped = timm_names(source.state, into_timm=vision == "timm")
    else:
        mapped, unmapped = sparc_names(source.state)
    bounds = model.parameter_bounds() if hasattr(model, "parameter_bounds") else None
    fitted = fit_weights(
        model, mapped, unmapped, COVERS[section.format], section.strict, source.file, bounds=bounds
    )
    for line in _describe(fitted, source, section.strict):
        (echo or log.warning)(line)
    return fitted


def load_init_weights(model: torch.nn.Module, recipe: Any, echo: Callable[[str], None] | None = None) -> Fitted | None:
    """Read the recipe's ``model.init_from`` and load it into ``model`` (None when the recipe has none)."""
    source = read_init_weights(recipe)
    return None if source is None else apply_init_weights(model, recipe, source, echo)
