"""Data-loading throughput: samples/s of the training pipeline against data-loader workers, shards against a
manifest of the same images.

    python benchmarks/data_loading.py [--images 2000] [--size 64] [--batches 30] [--workers 0,1,2]

It writes the same JPEG images once as a JSONL manifest of files and once as webdataset shards (with
``sparc data convert``'s writer), then times the real training loader (``make_train_loader`` + ``Collate``:
decoding, resizing, normalising, tokenising) for each format and worker count, in this one process. The baseline
row is the manifest with no workers; every other row is a ratio against it. If ``../shared/data/cifar10`` is
present, the real CIFAR-10 training shards are timed too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from sparc_kit.data import Collate, SyntheticShapes, Tokenizer, make_train_loader
from sparc_kit.data.manifest import ManifestDataset
from sparc_kit.data.webdataset import WebDataset, write_sample

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def write_corpus(folder: Path, n: int, size: int, per_shard: int = 500) -> tuple[str, str, list[str]]:
    """JPEG files + manifest, and the same bytes as shards; returns (manifest, shard pattern, captions)."""
    import tarfile

    shapes = SyntheticShapes(num_samples=n, image_size=size, seed=7)
    (folder / "img").mkdir(parents=True)
    captions, rows, shards = [], [], []
    tar = None
    for i in range(n):
        item = shapes[i]
        buf = io.BytesIO()
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        (folder / "img" / f"{i:06d}.jpg").write_bytes(data)
        rows.append({"image": f"img/{i:06d}.jpg", "caption": item["caption"]})
        captions.append(item["caption"])
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            shards.append(folder / f"train-{len(shards):03d}.tar")
            tar = tarfile.open(shards[-1], "w")
        write_sample(tar, f"{i:06d}", {"jpg": data, "txt": item["caption"].encode()})
    tar.close()
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pattern = str(folder / f"train-{{000..{len(shards) - 1:03d}}}.tar")
    return str(manifest), pattern, captions


def time_loader(dataset, tokenizer, image_size: int, batch_size: int, batches: int, workers: int) -> float:
    loader = make_train_loader(dataset, Collate(tokenizer, image_size), batch_size, seed=0, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up and the first shard open are not throughput
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        batch = next(it)
        seen += batch["images"].shape[0] + int(batch["skipped"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="stored image side (px)")
    parser.add_argument("--image-size", type=int, default=64, help="model input side (px)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        manifest, pattern, captions = write_corpus(Path(tmp), args.images, args.size)
        tokenizer = Tokenizer.train(captions, vocab_size=256, model_type="bpe", context_length=16)
        rows = []
        for name, build in (
            ("manifest (JPEG files)", lambda: ManifestDataset(manifest, image_size=args.image_size)),
            ("webdataset shards", lambda: WebDataset(pattern, image_size=args.image_size, shuffle_buffer=500)),
        ):
            for w in workers:
                rate = time_loader(build(), tokenizer, args.image_size, args.batch_size, args.batches, w)
                rows.append((name, w, rate))
        if (CIFAR / "train-000.tar").exists():
            cifar_tok = Tokenizer.train(
                [f"a photo of a {c}." for c in (CIFAR / "classnames.txt").read_text().split()],
                vocab_size=256, model_type="bpe", context_length=16,
            )
            for w in workers:
                ds = WebDataset(str(CIFAR / "train-{000..001}.tar"), image_size=32, shuffle_buffer=1000)
                rows.append(("CIFAR-10 shards, 32 px", w, time_loader(ds, cifar_tok, 32, args.batch_size, args.batches, w)))

    base = rows[0][2]
    print(f"\n{args.images} images stored at {args.size} px, model input {args.image_size} px, batch {args.batch_size}, "
          f"{args.batches} batches timed after the first; {os.cpu_count()} CPU cores\n")
    print("| data | workers | samples/s | vs manifest, 0 workers |")
    print("|---|---:|---:|---:|")
    for name, w, rate in rows:
        print(f"| {name} | {w} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
