"""The open_clip-shaped entry points: ``model, train_transform, eval_transform =
sparc_kit.create_model_and_transforms("runs/sparc_tiny")``, ``tokenizer = sparc_kit.get_tokenizer(...)``,
``sparc_kit.list_recipes()``.

``recipe_or_run`` may be anything that names a model:

- a run folder, a checkpoint folder, an exported folder or a ``.safetensors`` file: the trained model, read by
  :func:`~sparc_kit.pretrained.load_pretrained` (the same weights, the same tokenizer);
- a recipe file or a built-in recipe name (:func:`list_recipes`), or a recipe object from
  :func:`~sparc_kit.config.load_recipe`: the recipe's model, freshly initialised.

The transforms map a PIL image (or image bytes, a uint8 array) to the model's float input ``[3, S, S]``:
``eval_transform`` is the run's evaluation transform (:class:`~sparc_kit.data.transforms.EvalTransform`);
``train_transform`` is what the recipe's training data does to an image (its ``resize_mode`` and
``random_resized_crop``, seeded by ``data.seed``; the random crop is drawn from ``key``) followed by the
normalisation of the training batches. The tokenizer maps a text or a list of texts to token ids
``[N, context_length]`` (a LongTensor, padded with 0), as the training batches hold them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from sparc_kit.config import builtin_recipes, load_recipe
from sparc_kit.data.clip_tokenizer import OpenClipTokenizer
from sparc_kit.data.loader import Collate
from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.data.transforms import EvalTransform, ImageTransform, transform_for
from sparc_kit.engines.base import resolve_device
from sparc_kit.errors import EngineSetupError, SparcError
from sparc_kit.models import build_model
from sparc_kit.pretrained import load_pretrained

__all__ = ["create_model_and_transforms", "get_tokenizer", "list_recipes", "TrainTransform", "TextTokenizer"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ApiError(SparcError, ValueError):
    """An argument of the open_clip-shaped entry points that cannot be used (one line naming it)."""


def list_recipes() -> list[str]:
    """The built-in recipe names (``sparc recipes list``), sorted."""
    return list(builtin_recipes())


class TrainTransform:
    """The training view of an image: the datasets' :class:`~sparc_kit.data.transforms.ImageTransform` (decode,
    resize or random crop) then the batches' normalisation (:meth:`~sparc_kit.data.loader.Collate.images`).
    ``key`` seeds the random crop, as a sample's stream position does in training."""

    def __init__(self, image_transform: ImageTransform, image_size: int):
        self.image_transform = image_transform
        self.image_size = image_size
        self._batches = Collate(None, image_size)  # only its normalisation is used

    def __call__(self, image: Any, key: tuple = ()) -> torch.Tensor:
        return self._batches.images(self.image_transform(image, key=key).unsqueeze(0))[0]

    def __repr__(self) -> str:
        return f"TrainTransform({self.image_transform!r})"


class TextTokenizer:
    """Texts to token ids ``[N, context_length]`` (LongTensor; a single text gives ``N = 1``), over the run's
    tokenizer (``.tokenizer``: a :class:`~sparc_kit.data.tokenizer.Tokenizer`, or CLIP's BPE for
    ``tokenizer.kind: open_clip``; its ``tokenize`` gives the padding mask as well)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        self.vocab_size = tokenizer.vocab_size

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts if isinstance(texts, str) else list(texts))[0]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _is_trained(target: Any) -> bool:
    """Whether ``target`` names a trained model (a folder or a weights file) rather than a recipe."""
    if not isinstance(target, (str, os.PathLike)):
        return False
    path = os.path.expanduser(str(target))
    return os.path.isdir(path) or path.endswith(".safetensors")


def _recipe(target: Any) -> Any:
    if hasattr(target, "model") and hasattr(target, "model_dump"):  # a validated recipe
        return target
    if not isinstance(target, (str, os.PathLike)):
        raise ApiError(
            f"recipe_or_run: expected a run folder, a recipe file, a built-in recipe name or a recipe object, got "
            f"{type(target).__name__}"
        )
    return load_recipe(str(target))


def train_transform(recipe: Any, image_size: int) -> TrainTransform:
    """The training view of the recipe's data (its ``resize_mode``, ``random_resized_crop`` and ``seed``; a
    dataset without them, such as ``synthetic``, gets the default centre crop)."""
    data = recipe.data
    view = ImageTransform(
        image_size,
        train=True,
        resize_mode=getattr(data, "resize_mode", "center_crop"),
        random_resized_crop=getattr(data, "random_resized_crop", False),
        seed=getattr(data, "seed", 0),
    )
    return TrainTransform(view, image_size)


def create_model_and_transforms(
    recipe_or_run: Any, *, device: str | torch.device | None = None, precision: str | None = None
) -> tuple[torch.nn.Module, TrainTransform, EvalTransform]:
    """``(model, train_transform, eval_transform)`` for a run or a recipe (see the module docs); the model is in
    eval mode, on ``device`` (default ``cpu``; ``auto``: the GPU when there is one), its weights in ``precision``
    (``fp32``, the default; ``bf16``, ``fp16``)."""
    if precision is not None and precision not in PRECISIONS:
        raise ApiError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    try:
        where = resolve_device(device or "cpu", field="device")
    except EngineSetupError as exc:
        raise ApiError(str(exc)) from None
    if _is_trained(recipe_or_run):
        loaded = load_pretrained(recipe_or_run, device=where)
        model, recipe = loaded.model, loaded.recipe
        evaluation = loaded.transform
    else:
        recipe = _recipe(recipe_or_run)
        model = build_model(recipe).to(where).eval()
        evaluation = transform_for(model, recipe)
    model.to(dtype=PRECISIONS[precision or "fp32"])
    return model, train_transform(recipe, evaluation.image_size), evaluation


def get_tokenizer(run_or_recipe: Any) -> TextTokenizer:
    """The tokenizer of a run (its ``tokenizer.model``, as :func:`~sparc_kit.pretrained.load_pretrained` finds
    it), or of a recipe that names one (``tokenizer.path``); a recipe without one trains its tokenizer when a run
    starts, so then give the run."""
    if _is_trained(run_or_recipe):
        return TextTokenizer(load_pretrained(run_or_recipe).tokenizer)
    recipe = _recipe(run_or_recipe)
    t = recipe.tokenizer
    if t.kind == "open_clip":  # CLIP's BPE: nothing to train, the same for the recipe as for its runs
        return TextTokenizer(OpenClipTokenizer(context_length=t.context_length))  # type: ignore[arg-type]
    if not t.path:
        name = recipe.name or str(run_or_recipe)
        raise ApiError(
            f"{name}: the recipe names no tokenizer.path (its tokenizer is trained when a run starts): give the run "
            "folder, or set tokenizer.path"
        )
    try:
        tokenizer = Tokenizer.load(t.path, context_length=t.context_length, lowercase=t.lowercase, add_eos=t.add_eos)
    except (OSError, RuntimeError) as exc:
        raise ApiError(f"tokenizer.path: cannot load {t.path} ({str(exc).splitlines()[0]})") from None
    return TextTokenizer(tokenizer)
