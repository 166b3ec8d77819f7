"""A built-in synthetic image-text dataset: coloured shapes at known places, captions that name them.

Every sample is a pure function of ``(seed, index)``, so the data needs no download, is identical on every
machine and in every data-loader worker, and a resumed run can regenerate exactly the samples it has not seen.
The ground-truth masks (which pixels belong to which named shape) come with each sample, so token-to-patch
alignment can be checked against the truth.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from sparc_kit.registry import datasets

__all__ = ["SyntheticShapes", "COLOURS", "SHAPES", "SIZES"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (0.14, 0.20), "large": (0.24, 0.30)}  # half-extent as a fraction of the image side
RELATIONS = ("above", "below", "to the left of", "to the right of")
PLACES = {
    "in the top left": (0.25, 0.25),
    "in the top right": (0.75, 0.25),
    "in the bottom left": (0.25, 0.75),
    "in the bottom right": (0.75, 0.75),
    "in the centre": (0.5, 0.5),
}


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up
        inside_y = (dy >= -r) & (dy <= r)
        return inside_y & (np.abs(dx) <= (dy + r) * 0.5)
    if shape == "cross":
        arm = r * 0.33
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(shape)


@datasets.register("synthetic")
class SyntheticShapes(Dataset):
    """Procedural shapes: one or two coloured shapes per image and a caption naming colour, size and place.

    ``image_size`` defaults to the vision tower's. Item ``i`` is ``{"image": uint8 [3, H, W], "caption": str,
    "mask": uint8 [H, W]}``; the mask holds the shape class (1 + index in ``SHAPES``) of each pixel, 0 for
    background, and ``classnames`` lists them. Captions look like "a large red circle above a small blue
    square" or "a green cross in the top left".
    """

    classnames = ("background",) + SHAPES

    def __init__(
        self,
        num_samples: int = 10_000,
        image_size: int | None = None,
        max_shapes: int = 2,
        seed: int = 0,
        noise: float = 8.0,
    ):
        if image_size is None:
            raise ValueError("SyntheticShapes needs an image_size (the recipe fills in the vision tower's)")
        if max_shapes not in (1, 2):
            raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.max_shapes = max_shapes
        self.seed = seed
        self.noise = noise

    def __len__(self) -> int:
        return self.num_samples

    def _layout(self, rng: np.random.Generator) -> tuple[list[dict], str]:
        s = self.image_size
        colours = list(COLOURS)
        n = 1 if self.max_shapes == 1 else int(rng.integers(1, 3))
        items = []
        for _ in range(n):
            size_word = str(rng.choice(list(SIZES)))
            lo, hi = SIZES[size_word]
            items.append(
                {
                    "shape": str(rng.choice(SHAPES)),
                    "colour": str(rng.choice(colours)),
                    "size": size_word,
                    "r": float(rng.uniform(lo, hi)) * s,
                }
            )
        if n == 1:
            place = str(rng.choice(list(PLACES)))
            fx, fy = PLACES[place]
            jitter = rng.uniform(-0.06, 0.06, size=2) * s
            items[0]["cx"], items[0]["cy"] = fx * s + jitter[0], fy * s + jitter[1]
            a = items[0]
            return items, f"a {a['size']} {a['colour']} {a['shape']} {place}"
        relation = str(rng.choice(RELATIONS))
        near, far = rng.uniform(0.22, 0.30) * s, rng.uniform(0.70, 0.78) * s
        across = rng.uniform(0.3, 0.7, size=2) * s
        if relation == "above":
            pos = [(across[0], near), (across[1], far)]
        elif relation == "below":
            pos = [(across[0], far), (across[1], near)]
        elif relation == "to the left of":
            pos = [(near, across[0]), (far, across[1])]
        else:
            pos = [(far, across[0]), (near, across[1])]
        for item, (cx, cy) in zip(items, pos):
            item["cx"], item["cy"] = cx, cy
        a, b = items
        caption = f"a {a['size']} {a['colour']} {a['shape']} {relation} a {b['size']} {b['colour']} {b['shape']}"
        return items, caption

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def caption(self, index: int) -> str:
        return self._layout(self._rng(index))[1]

    def captions(self, limit: int | None = None) -> Iterator[str]:
        """Captions only (no rendering), for training a tokenizer."""
        for i in range(min(limit or self.num_samples, self.num_samples)):
            yield self.caption(i)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = self._rng(index)
        items, caption = self._layout(rng)
        s = self.image_size
        background = rng.uniform(60, 120) + rng.uniform(-15, 15, size=3)
        image = np.empty((s, s, 3), dtype=np.float32)
        image[:] = background
        mask = np.zeros((s, s), dtype=np.uint8)
        for item in items:
            m = _shape_mask(item["shape"], item["cx"], item["cy"], item["r"], s)
            colour = np.asarray(COLOURS[item["colour"]], dtype=np.float32) + rng.uniform(-12, 12, size=3)
            image[m] = colour
            mask[m] = 1 + SHAPES.index(item["shape"])
        if self.noise > 0:
            image += rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        image = np.clip(image, 0, 255).astype(np.uint8)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "caption": caption,
            "mask": torch.from_numpy(mask),
        }
