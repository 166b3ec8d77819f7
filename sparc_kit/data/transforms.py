"""Turning stored image bytes into the ``uint8 [3, H, W]`` tensors the datasets return.

:class:`ImageTransform` decodes (bytes, a file object, a PIL image or an array), converts any mode to RGB
(grayscale, palette, CMYK, 16-bit, and transparent images composited on white), then either resizes the
shorter side and centre-crops (the default, and the paper's setup: no augmentation), squashes to a square, or
pads to a square. ``random_resized_crop=True`` with ``train=True`` adds Inception-style cropping, seeded per
sample from ``(seed, *key)`` so that the same position of the sample stream gets the same crop in every run,
process and data-loader worker.

Unreadable input raises :class:`BadImageError` (a ``ValueError``) with a one-line reason; the datasets turn it
into a skipped sample.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sparc_kit.errors import SparcError

__all__ = [
    "ImageTransform",
    "BadImageError",
    "decode_image",
    "to_rgb",
    "stable_seed",
    "EvalTransform",
    "center_crop_mask",
    "transform_for",
    "model_image_size",
    "StoredImages",
    "IMAGE_MEAN",
    "IMAGE_STD",
]

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["center_crop", "squash", "pad"]


class BadImageError(SparcError, ValueError):
    """The bytes are not an image PIL can decode (truncated, empty, unknown format)."""


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints and strings, identical on every machine and Python version."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: transparency is composited on white, 16/32-bit and float images are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if image.mode == "F" and top <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: Any, draft_size: int | None = None) -> Image.Image:
    """An RGB PIL image from bytes, a binary file object, a PIL image or an ``[H, W(, C)]`` uint8 array.

    ``draft_size`` lets the JPEG decoder scale by a power of two while keeping both sides >= that size (much
    faster for photos far larger than the model's input).
    """
    if isinstance(data, Image.Image):
        return to_rgb(data)
    if isinstance(data, np.ndarray):
        return to_rgb(Image.fromarray(data))
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise BadImageError("empty image file")
        data = io.BytesIO(bytes(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / ICC chatter from PIL on odd files
            image = Image.open(data)
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as exc:  # PIL raises many types: UnidentifiedImageError, OSError (truncated), SyntaxError
        raise BadImageError(f"cannot decode image: {_one_line(exc)}") from None
    return to_rgb(image)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def center_crop(image: Image.Image, s: int) -> Image.Image:
    """Resize the shorter side to ``s`` (bicubic), then crop the centre ``s`` x ``s``: the evaluation view, and the
    training view when no augmentation is asked for."""
    return _resize_crop(image, s, Image.BICUBIC)


def _resize_crop(image: Image.Image, s: int, resample: int) -> Image.Image:
    w, h = image.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), resample)
    left, top = (nw - s) // 2, (nh - s) // 2
    return image.crop((left, top, left + s, top + s))


def center_crop_mask(mask: Any, s: int) -> np.ndarray:
    """A label mask (a single-channel PIL image or a 2-D integer array of class indices) cut to the pixels
    :class:`EvalTransform` keeps of the image it belongs to: the shorter side resized to ``s`` and the centre
    ``s`` x ``s`` cropped, with the same sizes and box as :func:`center_crop`, but NEAREST resampling, so every
    pixel keeps a class index of the original mask. Returns uint8 [s, s]."""
    if getattr(mask, "mode", None) not in ("L", "P"):  # an array, or a 16/32-bit PIL image
        if getattr(mask, "mode", "I") not in ("I", "I;16"):
            raise ValueError(f"expected a single-channel mask of class indices, got a {mask.mode} image")
        array = np.asarray(mask)
        if array.ndim != 2 or (array.size and not 0 <= int(array.min()) <= int(array.max()) <= 255):
            raise ValueError(f"expected a 2-D mask of class indices 0..255, got shape {array.shape}")
        mask = Image.fromarray(array.astype(np.uint8), mode="L")
    return np.asarray(_resize_crop(mask, int(s), Image.NEAREST), dtype=np.uint8)


class ImageTransform:
    """Decode to RGB and bring to ``image_size`` x ``image_size``; returns ``uint8 [3, H, W]``.

    - ``resize_mode="center_crop"`` (default): resize the shorter side to ``image_size`` (bicubic), centre crop.
    - ``"squash"``: resize both sides to ``image_size``, ignoring the aspect ratio.
    - ``"pad"``: resize the longer side to ``image_size`` and pad the rest with ``fill``.
    - ``train=True`` and ``random_resized_crop=True``: crop a random region of ``scale`` of the area and
      ``ratio`` aspect, then resize (torchvision's RandomResizedCrop), seeded from ``(seed, *key)``.
    - ``image_size=None`` keeps the native size (for inspection; batches need one size).
    """

    def __init__(
        self,
        image_size: int | None,
        train: bool = False,
        resize_mode: ResizeMode = "center_crop",
        random_resized_crop: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
        fill: tuple[int, int, int] = (0, 0, 0),
    ):
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if resize_mode not in ("center_crop", "squash", "pad"):
            raise ValueError(f"resize_mode must be center_crop, squash or pad, got {resize_mode!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        self.image_size = image_size
        self.train = train
        self.resize_mode = resize_mode
        self.random_resized_crop = random_resized_crop
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.seed = seed
        self.fill = tuple(fill)

    @property
    def augments(self) -> bool:
        return bool(self.train and self.random_resized_crop and self.image_size)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, train={self.train}, resize_mode={self.resize_mode!r}, "
            f"random_resized_crop={self.random_resized_crop})"
        )

    def __call__(self, data: Any, key: tuple = ()) -> torch.Tensor:
        s = self.image_size
        draft = None
        if s is not None and not self.augments and self.resize_mode == "center_crop":
            draft = s
        image = decode_image(data, draft_size=draft)
        if s is not None:
            if self.augments:
                image = self._random_resized_crop(image, key)
            elif self.resize_mode == "center_crop":
                image = self._center_crop(image, s)
            elif self.resize_mode == "squash":
                image = image.resize((s, s), Image.BICUBIC)
            else:
                image = self._pad(image, s)
        arr = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    @staticmethod
    def _center_crop(image: Image.Image, s: int) -> Image.Image:
        return center_crop(image, s)

    def _pad(self, image: Image.Image, s: int) -> Image.Image:
        w, h = image.size
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        canvas = Image.new("RGB", (s, s), self.fill)
        canvas.paste(image, ((s - nw) // 2, (s - nh) // 2))
        return canvas

    def _random_resized_crop(self, image: Image.Image, key: tuple) -> Image.Image:
        import math

        rng = random.Random(stable_seed("rrc", self.seed, *key))
        w, h = image.size
        area = w * h
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        box = None
        for _ in range(10):
            target = area * (self.scale[0] + rng.random() * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + rng.random() * (log_hi - log_lo))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(rng.random() * (w - cw + 1))
                top = int(rng.random() * (h - ch + 1))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:  # fall back to the largest centred crop within the ratio range
            in_ratio = w / h
            if in_ratio < self.ratio[0]:
                cw, ch = w, round(w / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                cw, ch = round(h * self.ratio[1]), h
            else:
                cw, ch = w, h
            left, top = (w - cw) // 2, (h - ch) // 2
            box = (left, top, left + cw, top + ch)
        s = self.image_size
        return image.resize((s, s), Image.BICUBIC, box=box)


class EvalTransform:
    """A PIL image or an image tensor to the model's input: resize the shorter side to ``image_size`` (bicubic),
    center crop to ``image_size`` x ``image_size``, scale to [0, 1], normalise with CLIP's mean/std.

    Accepts a PIL image (any mode; converted to RGB), a uint8 tensor [3, H, W] (0..255) or a float tensor
    [3, H, W] in [0, 1], or a batch [B, 3, H, W] of either; returns float32 [3, S, S] (or [B, 3, S, S]).

    It matches the training pipeline: a PIL image is resized and cropped as the datasets' default
    ``center_crop`` does (PIL bicubic, same rounding; :func:`center_crop`), then normalised as
    :class:`~sparc_kit.data.loader.Collate` does. An image already S x S is not resampled, so the result equals
    ``Collate.images`` exactly. Tensors are resized with torch's antialiased bicubic.
    """

    def __init__(self, image_size: int, mean=IMAGE_MEAN, std=IMAGE_STD):
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
            image = self._pil_to_tensor(self._pil_resize_crop(image.convert("RGB")))
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"expected an image tensor [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}")
        batched = image.ndim == 4
        x = image if batched else image.unsqueeze(0)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = self._tensor_resize_crop(x)
        x = (x - self.mean) / self.std
        return x if batched else x[0]

    def _pil_resize_crop(self, image):
        return center_crop(image, self.image_size)  # the same view the training data gets

    @staticmethod
    def _pil_to_tensor(image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def _tensor_resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        h, w = x.shape[-2:]
        if (h, w) == (size, size):
            return x
        if min(h, w) != size:
            scale = size / min(h, w)
            new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots
            h, w = new_h, new_w
        top, left = (h - size) // 2, (w - size) // 2
        return x[..., top : top + size, left : left + size]

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"


def model_image_size(model: torch.nn.Module, recipe: Any = None) -> int:
    """The square input size of a dual encoder's vision tower (its ``image_size``, else the recipe's)."""
    model = getattr(model, "module", model)  # DDP / engine wrappers
    size = getattr(getattr(model, "vision", None), "image_size", None)
    if size is None and recipe is not None:
        size = getattr(recipe.model.vision, "image_size", None)
    if size is None:
        raise ValueError("cannot tell the model's image size: its vision tower has no image_size")
    return int(size)


def transform_for(model: torch.nn.Module, recipe: Any = None) -> EvalTransform:
    """The evaluation transform for ``model``."""
    return EvalTransform(model_image_size(model, recipe))


class StoredImages:
    """What the datasets that read stored images keep alike (``manifest``, ``webdataset``): the image size and
    seed, the caption cut, the filesystem options and the training-view :class:`ImageTransform`."""

    def _keep_image_settings(
        self,
        image_size: int | None,
        seed: int,
        max_caption_chars: int,
        resize_mode: ResizeMode,
        random_resized_crop: bool,
        storage_options: dict[str, Any] | None,
    ) -> None:
        if max_caption_chars <= 0:
            raise ValueError(f"max_caption_chars must be positive, got {max_caption_chars}")
        self.image_size = image_size
        self.seed = seed
        self.max_caption_chars = max_caption_chars
        self.storage_options = dict(storage_options or {})
        self.transform = ImageTransform(
            image_size, train=True, resize_mode=resize_mode, random_resized_crop=random_resized_crop, seed=seed
        )
