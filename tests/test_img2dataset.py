"""Shards exactly as img2dataset writes them (``--output_format webdataset``) read as they are: ``00000.tar`` with
``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per sample, ``00000.parquet`` and ``00000_stats.json`` beside each tar.
The folder, a glob and a brace pattern name the same shards; the stray files are not read; a sample that failed to
download (no image) and a corrupt JPEG are skipped and counted; the captions are the .txt files' (the JSON's
``caption`` where a sample has no .txt)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from sparc_cli.main import app
from sparc_kit import build_dataset, load_recipe
from sparc_kit.data import expand_urls
from sparc_kit.data.webdataset import ShardError, WebDataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-captions"
PER_SHARD = 6
MICRO = [
    "model.embed_dim=16", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "tokenizer.vocab_size=128",
]


def _photos(n: int) -> list[tuple[bytes, str]]:
    """``n`` (JPEG bytes, caption): COCO photos with their first caption when ../shared/data has them, else JPEGs
    drawn here."""
    if (SHARED / "pairs.jsonl").is_file():
        rows = [json.loads(line) for line in (SHARED / "pairs.jsonl").read_text().splitlines()[:n]]
        return [((SHARED / r["image"]).read_bytes(), r["captions"][0].strip()) for r in rows]
    out = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG")
        out.append((buf.getvalue(), f"A drawn photo number {i} of noise."))
    return out


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_output(folder: Path, shards: int = 2) -> dict:
    """An img2dataset output folder: per shard ``NNNNN.tar`` (members ``KEY.jpg``, ``KEY.txt``, ``KEY.json``,
    keys ``NNNNNIIII``), ``NNNNN.parquet`` and ``NNNNN_stats.json``. Shard 0 holds a sample whose download
    failed (its JSON alone, status ``failed_to_download``) and a truncated JPEG; shard 1 a sample without .txt
    (the caption only in its JSON). Returns {"captions": {key: caption of a good sample}, "bad": {key: why}}."""
    folder.mkdir(parents=True)
    photos = iter(_photos(shards * PER_SHARD))
    captions, bad = {}, {}
    for s in range(shards):
        stats = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:04d}"
                image, caption = next(photos)
                stats["count"] += 1
                width, height = Image.open(io.BytesIO(image)).size
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
                        "width": width, "height": height, "original_width": width, "original_height": height,
                        "exif": None, "sha256": hashlib.sha256(image).hexdigest(), "caption": caption}
                if s == 0 and i == 2:  # no image: what a failed download leaves
                    meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found", width=None,
                                height=None, sha256=None)
                    _member(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
                    stats["failed_to_download"] += 1
                    bad[key] = "no image (.jpg/.jpeg/.png/.webp); has .json (status failed_to_download: HTTP Error 404"
                    continue
                stats["successes"] += 1
                if s == 0 and i == 4:  # a JPEG cut short
                    image = image[: len(image) // 3]
                    bad[key] = "cannot decode image"
                _member(tar, f"{key}.jpg", image)
                if s == 1 and i == 3:  # no .txt: the JSON's caption is the sample's
                    meta["caption"] = caption = f"{caption} (from the json)"
                else:
                    _member(tar, f"{key}.txt", caption.encode())
                _member(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
                if key not in bad:
                    captions[key] = " ".join(caption.split())
        (folder / f"{s:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")  # the name is what matters here
    return {"captions": captions, "bad": bad}


@pytest.fixture
def img2dataset(tmp_path):
    folder = tmp_path / "laion_subset"
    return folder, write_img2dataset_output(folder)


def test_the_folder_a_glob_and_a_brace_pattern_name_the_tars(img2dataset):
    folder, _ = img2dataset
    tars = [str(folder / "00000.tar"), str(folder / "00001.tar")]
    assert expand_urls(str(folder / "{00000..00001}.tar")) == tars
    assert expand_urls(str(folder)) == tars  # the parquet and _stats.json files are not shards
    assert expand_urls(str(folder) + "/") == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    assert expand_urls(str(folder / "*.tar")) == tars
    with pytest.raises(ShardError, match="no shards in"):
        WebDataset(str(folder / "*.tgz"))


@pytest.mark.parametrize("pattern", ["{folder}", "{folder}/*.tar", "{folder}/{{00000..00001}}.tar"])
def test_every_sample_is_read_once_with_its_caption(img2dataset, pattern):
    folder, expected = img2dataset
    recipe = load_recipe("sparc_tiny", [*MICRO, f"data={{name: webdataset, urls: '{pattern.format(folder=folder)}'}}"])
    items = list(build_dataset(recipe).scan())
    assert len(items) == 2 * PER_SHARD  # the failed download is a sample too: counted, skipped
    good = {s["key"]: s["caption"] for s in items if "skip" not in s}
    assert good == expected["captions"]
    skipped = {s["key"]: s["skip"] for s in items if "skip" in s}
    assert sorted(skipped) == sorted(expected["bad"])
    for key, why in expected["bad"].items():
        assert why in skipped[key], skipped[key]
    assert all(s["image"].shape == (3, 64, 64) for s in items if "skip" not in s)


@pytest.mark.slow
def test_sparc_train_on_the_folder_skips_and_counts_the_bad_samples(img2dataset, tmp_path):
    folder, expected = img2dataset
    n = 2 * PER_SHARD
    recipe = tmp_path / "laion.yaml"
    recipe.write_text(yaml.safe_dump({
        "extends": "sparc_tiny",
        "data": {"name": "webdataset", "urls": str(folder), "shuffle_buffer": 0},
        "train": {"steps": 2, "batch_size": n, "log_every": 1, "checkpoint_every": 2},
    }))
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(app, [*args, *[a for s in MICRO for a in ("--set", s)]])
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad = len(expected["bad"])
    assert [r["skipped_samples"] for r in rows] == [bad, 2 * bad]  # one epoch per step: both bad ones, each time
    assert [r["samples_seen"] for r in rows] == [n, 2 * n]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["counts"]["skipped"] == 2 * bad and state["counts"]["read"] == 2 * (n - bad)


def test_sparc_data_verify_names_the_bad_samples(img2dataset):
    folder, expected = img2dataset
    result = CliRunner().invoke(app, ["data", "verify", str(folder)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[-1] == f"{folder}: {2 * PER_SHARD} samples checked, {len(expected['bad'])} unreadable samples"
    named = {line.split(":")[2]: line for line in lines if line.startswith("unreadable: ")}
    assert sorted(named) == sorted(expected["bad"])
    for key, why in expected["bad"].items():
        assert why in named[key]
