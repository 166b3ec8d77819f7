"""Shared fixtures: the real data under ``../shared/data`` (skipped when absent) and small generated data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """``../shared/data`` beside the project; tests using it skip in a clone that does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only in the project's workspace)")
    return SHARED_DATA


class DataGen:
    """Tiny images, tar shards and manifests, all a pure function of their arguments."""

    @staticmethod
    def pixels(i: int, size: int = 12) -> np.ndarray:
        return np.random.default_rng(i).integers(0, 256, size=(size, size, 3), dtype=np.uint8)

    @staticmethod
    def image_bytes(i: int, size: int = 12, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        Image.fromarray(DataGen.pixels(i, size)).save(buf, format=fmt)
        return buf.getvalue()

    @staticmethod
    def write_shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
        """``samples``: ``(key, {ext: bytes})`` in order; returns the path."""
        with tarfile.open(path, "w") as tar:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return str(path)

    @staticmethod
    def caption(i: int) -> str:
        return f"sample {i} with {'red blue green'.split()[i % 3]} things"

    @staticmethod
    def shards(folder, n_shards: int = 2, per_shard: int = 10, prefix: str = "train", size: int = 12):
        """Good PNG + txt shards ``prefix-000.tar ...``; returns (brace pattern, {key: caption})."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        expected = {}
        for s in range(n_shards):
            samples = []
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"s{s:03d}_{j:05d}"
                expected[key] = DataGen.caption(i)
                samples.append((key, {"png": DataGen.image_bytes(i, size), "txt": DataGen.caption(i).encode()}))
            DataGen.write_shard(folder / f"{prefix}-{s:03d}.tar", samples)
        return str(folder / f"{prefix}-{{000..{n_shards - 1:03d}}}.tar"), expected

    @staticmethod
    def manifest(folder, n: int = 12, size: int = 12, captions_per_image: int = 1, name: str = "pairs.jsonl"):
        """PNG files under ``folder/img`` and a JSONL manifest with ``caption`` (or ``captions``)."""
        folder = Path(folder)
        (folder / "img").mkdir(parents=True, exist_ok=True)
        with open(folder / name, "w") as f:
            for i in range(n):
                (folder / "img" / f"{i:04d}.png").write_bytes(DataGen.image_bytes(i, size))
                row = {"image": f"img/{i:04d}.png"}
                if captions_per_image == 1:
                    row["caption"] = DataGen.caption(i)
                else:
                    row["captions"] = [f"{DataGen.caption(i)} #{c}" for c in range(captions_per_image)]
                f.write(json.dumps(row) + "\n")
        return str(folder / name)

    @staticmethod
    def corrupt_shards(folder) -> str:
        """``bad-000.tar``: 8 samples, 4 good (g0..g3) then a truncated JPEG (broken), an empty caption (empty),
        no .txt (notxt), a numeric JSON caption (numeric); ``bad-001.tar``: 4 samples cut off inside c2's image
        (c0, c1 good; c2 incomplete; then a read error). Returns the brace pattern."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        jpeg = DataGen.image_bytes(100, 16, fmt="JPEG")

        def good(i):
            return {"png": DataGen.image_bytes(i, 8), "txt": DataGen.caption(i).encode()}

        samples = [
            ("g0", good(0)),
            ("broken", {"jpg": jpeg[: len(jpeg) // 3], "txt": b"a broken photo"}),
            ("g1", good(1)),
            ("empty", {"png": DataGen.image_bytes(5, 8), "txt": b"   \n"}),
            ("notxt", {"png": DataGen.image_bytes(6, 8)}),
            ("g2", good(2)),
            ("numeric", {"png": DataGen.image_bytes(7, 8), "json": b'{"caption": 42}'}),
            ("g3", good(3)),
        ]
        DataGen.write_shard(folder / "bad-000.tar", samples)
        DataGen.write_shard(folder / "full.tar", [(f"c{i}", good(10 + i)) for i in range(4)])
        data = (folder / "full.tar").read_bytes()
        with tarfile.open(folder / "full.tar") as tar:
            cut = tar.getmember("c2.png").offset_data + 20
        (folder / "bad-001.tar").write_bytes(data[:cut])
        (folder / "full.tar").unlink()
        return str(folder / "bad-{000..001}.tar")


@pytest.fixture
def datagen() -> type[DataGen]:
    return DataGen
