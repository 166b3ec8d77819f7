"""Data faults in one training run: the run completes and ``metrics.jsonl`` counts exactly what was unreadable.

What is checked, and why
------------------------
One ``sparc train`` run (the real console script; tiny model, 10 steps of 40) reads, in one stream
(``data.urls`` joins a local pattern and an S3 URL with ``::``):

- ten local webdataset shards of 20 samples in which 10% of the images are corrupt (a PNG cut in half), five
  captions are empty (whitespace only) and five are not UTF-8; the last shard is truncated inside a member (the
  image of its 16th sample), as a copy interrupted mid-file leaves it;
- one shard on a local moto S3 server (127.0.0.1) that disappears mid-run: the server deletes the object while it
  answers the first GET for it (epoch 0 reads it whole), so epoch 1 really finds it missing.

The expected count is worked out here from how the shards were built, not from the reader: each built sample is
bad or not by construction; in the truncated shard the samples whose every member lies before the cut are read,
the sample the cut falls in is bad, and the break itself is one more bad position; the missing shard is one bad
position. 400 samples are exactly epoch 0 + epoch 1, whatever the shard order, and no batch can be all bad (bad
samples are never more than three in a row), so ``skipped_samples`` after step 50 must equal that count.

Empty captions are bad samples (skipped and counted, as in docs/data.md), like captions that are not UTF-8.

A second run (in-process, typer's CliRunner) reads a manifest whose rows name missing files (and one undecodable image): 3 epochs, so the count
is 3 x the bad rows. A third run, on shards in which every other sample is bad in every batch, stops at the first
judged batch with the one line that gives the count (``100 of 200 samples read by step 5 were unreadable``),
exit status 1, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from sparc_kit.data import Tokenizer

BATCH = 40
TINY = [
    "model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.width=16",
    "model.vision.depth=1", "model.vision.heads=2", "model.text.width=16", "model.text.depth=1",
    "model.text.heads=2", f"train.batch_size={BATCH}", "optim.warmup_steps=1", "train.log_every=5",
    "train.checkpoint_every=1000",
]


def _sparc(cwd: Path, *args: str, sets=(), env=None) -> subprocess.CompletedProcess:
    exe = shutil.which("sparc") or pytest.skip("the sparc console script is not installed")
    cmd = [exe, *args]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # a tiny model: one thread is faster on a busy CPU
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def _tokenizer(folder: Path, datagen) -> str:
    """A tokenizer trained ahead, so the run reads its data once, in training order (no caption pre-pass)."""
    path = folder / "tok.model"
    Tokenizer.train([datagen.caption(i) for i in range(60)], vocab_size=64, context_length=16,
                    model_type="word").save(str(path))
    return str(path)


def _cut(shard: Path, member: str, into: int) -> None:
    """Truncate a tar inside ``member``'s data, ``into`` bytes after its start."""
    with tarfile.open(shard) as tar:
        cut = tar.getmember(member).offset_data + into
    shard.write_bytes(shard.read_bytes()[:cut])


def build_faulty_shards(folder: Path, datagen) -> tuple[str, int]:
    """Ten local shards train-000..009 (20 samples each, faults by position); returns the pattern and the bad
    positions of one epoch of them."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = 0
    for s in range(10):
        samples, flags = [], []
        for j in range(20):
            i = s * 20 + j
            png, caption, is_bad = datagen.image_bytes(i, 16), datagen.caption(i).encode(), True
            if j in (5, 13):  # 2 of 20: 10% corrupt images
                png = png[: len(png) // 2]
            elif j == 9 and s < 5:
                caption = b"  \n "  # empty
            elif j == 17 and s >= 5:
                caption = b"caf\xe9 au lait \xff"  # latin-1, not UTF-8
            else:
                is_bad = False
            samples.append((f"s{s:03d}_{j:02d}", {"png": png, "txt": caption}))
            flags.append(is_bad)
        datagen.write_shard(folder / f"train-{s:03d}.tar", samples)
        if s == 9:  # truncated inside the 16th sample's image: samples 0..14 read, 15 broken, then the break
            _cut(folder / f"train-{s:03d}.tar", "s009_15.png", 10)
            bad += sum(flags[:15]) + 1 + 1
        else:
            bad += sum(flags)
    return str(folder / "train-{000..009}.tar"), bad


# ---------------------------------------------------------------------------------------------- S3 (moto)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VanishingS3:
    """A moto S3 server on 127.0.0.1 that deletes ``bucket/key`` (through the S3 API) while answering the first
    GET of it: that read gets the whole object, every later one finds it missing."""

    def __init__(self, bucket: str, key: str):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server
        import boto3
        import threading

        self.bucket, self.key, self.gets = bucket, key, 0
        self.endpoint = f"http://127.0.0.1:{_free_port()}"
        app = DomainDispatcherApplication(create_backend_app)

        def vanishing(environ, start_response):
            target = environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO") == f"/{bucket}/{key}"
            if not target or self.gets:
                return app(environ, start_response)
            self.gets += 1
            captured = {}
            body = b"".join(app(environ, lambda status, headers, exc=None: captured.update(s=status, h=headers)))
            self.client.delete_object(Bucket=bucket, Key=key)  # gone before the reader has its bytes
            start_response(captured["s"], captured["h"])
            return [body]

        port = int(self.endpoint.rsplit(":", 1)[1])
        self.server = make_server("127.0.0.1", port, vanishing, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        self.client.create_bucket(Bucket=bucket)

    def exists(self) -> bool:
        return "Contents" in self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key)

    def storage_options(self) -> str:
        return ("{key: testing, secret: testing, client_kwargs: {endpoint_url: '%s', region_name: us-east-1}}"
                % self.endpoint)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


@pytest.fixture
def vanishing_s3(monkeypatch):
    pytest.importorskip("s3fs", reason="s3fs is in the test extras: pip install -e .[test]")
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="moto[server] is in the test extras")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY",
                "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = VanishingS3("bucket", "wds/remote-000.tar")
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------- runs
def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_run_over_corrupt_truncated_and_vanishing_shards_counts_every_bad_sample(tmp_path, datagen,
                                                                                     vanishing_s3):
    pattern, bad_local = build_faulty_shards(tmp_path / "shards", datagen)
    remote = tmp_path / "remote-000.tar"
    datagen.write_shard(remote, [(f"r{j}", {"png": datagen.image_bytes(500 + j, 16),
                                            "txt": datagen.caption(j).encode()}) for j in range(5)])
    vanishing_s3.client.upload_file(str(remote), "bucket", "wds/remote-000.tar")
    epoch0 = 9 * 20 + (15 + 1 + 1) + 5  # positions: 9 whole shards, the truncated one, the S3 one
    epoch1 = epoch0 - 5 + 1  # the S3 shard is one bad position ("shard not found")
    expected_skips = bad_local + (bad_local + 1)
    assert (epoch0 + epoch1) % BATCH == 0
    steps = (epoch0 + epoch1) // BATCH

    proc = _sparc(tmp_path, "train", "sparc_tiny", "--out", "run", "--quiet", sets=[
        *TINY, "data.name=webdataset", f"data.urls={pattern}::s3://bucket/wds/remote-000.tar",
        "data.shuffle_buffer=0", f"data.storage_options={vanishing_s3.storage_options()}",
        f"tokenizer.path={_tokenizer(tmp_path, datagen)}", f"train.steps={steps}", "train.max_skip_fraction=0.3",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert vanishing_s3.gets == 1 and not vanishing_s3.exists()  # read once, then really missing
    last = _rows(tmp_path / "run")[-1]
    assert last["step"] == steps and last["samples_seen"] == epoch0 + epoch1
    assert last["skipped_samples"] == expected_skips
    assert last["truncated_captions"] == 0


def test_manifest_rows_naming_missing_files_are_counted_exactly(tmp_path, datagen):
    n = 40
    path = Path(datagen.manifest(tmp_path / "m", n=n, size=16))
    missing = [3, 10, 17, 22]
    for i in missing:
        (tmp_path / "m" / "img" / f"{i:04d}.png").unlink()
    (tmp_path / "m" / "img" / "0007.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")  # undecodable
    bad_rows = len(missing) + 1
    epochs = 3
    from typer.testing import CliRunner

    from sparc_cli.main import app

    args = ["train", "sparc_tiny", "--out", str(tmp_path / "run"), "--quiet"]
    for item in [*TINY, "data.name=manifest", f"data.path={path}", f"tokenizer.path={_tokenizer(tmp_path, datagen)}",
                 f"train.steps={epochs * n // BATCH}", "train.max_skip_fraction=0.5"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)  # in-process: the exit codes are the other runs' business
    assert result.exit_code == 0, (result.output, result.exception)
    last = _rows(tmp_path / "run")[-1]
    assert last["samples_seen"] == epochs * n
    assert last["skipped_samples"] == epochs * bad_rows


def test_past_max_skip_fraction_the_run_stops_with_the_count(tmp_path, datagen):
    folder = tmp_path / "half"
    folder.mkdir()
    for s in range(2):  # every shard a multiple of the batch, bad and good alternating: half of every batch bad
        samples = []
        for j in range(3 * BATCH):
            png = datagen.image_bytes(s * 3 * BATCH + j, 16)
            samples.append((f"h{s}_{j:02d}", {"png": png if j % 2 else png[:20], "txt": datagen.caption(j).encode()}))
        datagen.write_shard(folder / f"half-{s}.tar", samples)
    proc = _sparc(tmp_path, "train", "sparc_tiny", "--out", "run", "--quiet", sets=[
        *TINY, "data.name=webdataset", f"data.urls={folder}/half-{{0..1}}.tar", "data.shuffle_buffer=0",
        f"tokenizer.path={_tokenizer(tmp_path, datagen)}", "train.steps=40", "train.max_skip_fraction=0.1",
    ])
    # judged once 200 samples were read: after 5 batches of 40, half of them bad
    assert proc.stderr.splitlines() == [
        "error: 100 of 200 samples read by step 5 were unreadable (50.0% > train.max_skip_fraction=0.1); check "
        "the data with `sparc data verify`, or raise train.max_skip_fraction"
    ]
    assert proc.returncode == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_data_without_one_readable_sample_stops_even_when_every_skip_is_allowed(tmp_path, datagen, workers):
    """With train.max_skip_fraction=1 the skip limit never stops a run, and shards without a readable sample
    used to be read forever (and SIGTERM, honoured at the end of a step, never arrived). A reader's whole epoch
    without one readable sample now stops it with one line, also from a data-loader worker (whose error used to
    reach the command as ``Caught ShardError in DataLoader worker process 0.``)."""
    from typer.testing import CliRunner

    from sparc_cli.main import app

    for s in range(2):
        datagen.write_shard(tmp_path / f"bad-{s}.tar",
                            [(f"b{s}_{j}", {"png": b"not a png", "txt": b"a caption"}) for j in range(8)])
    pattern = f"{tmp_path}/bad-{{0..1}}.tar"
    args = ["train", "sparc_tiny", "--out", str(tmp_path / "run"), "--quiet"]
    for item in [*TINY, "data.name=webdataset", f"data.urls={pattern}", f"tokenizer.path={_tokenizer(tmp_path, datagen)}",
                 "train.steps=3", "train.max_skip_fraction=1.0", f"train.num_workers={workers}"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    slots = max(workers, 1)
    assert result.stderr.splitlines() == [
        f"error: no readable sample in a whole epoch of reader 0 of {slots} (2 shards from {pattern}); check them "
        "with `sparc data verify`"
    ]
    assert result.exit_code == 2


@pytest.mark.timeout(120)
def test_a_manifest_without_one_readable_image_stops_even_when_every_skip_is_allowed(tmp_path, datagen):
    """The map-style twin of the test above: every image of the manifest is missing and max_skip_fraction is 1,
    so only the whole-pass rule can stop it (it used to loop in the training loop's batch fetch forever)."""
    from typer.testing import CliRunner

    from sparc_cli.main import app

    n = 24
    path = Path(datagen.manifest(tmp_path / "m", n=n, size=16))
    for i in range(n):
        (tmp_path / "m" / "img" / f"{i:04d}.png").unlink()
    args = ["train", "sparc_tiny", "--out", str(tmp_path / "run"), "--quiet"]
    for item in [*TINY, "data.name=manifest", f"data.path={path}", f"tokenizer.path={_tokenizer(tmp_path, datagen)}",
                 "train.steps=3", "train.max_skip_fraction=1.0"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    passed = -(-n // BATCH) * BATCH  # whole batches until a pass over the n rows is complete
    assert result.stderr.splitlines() == [
        f"error: no usable batch in {passed} samples read by step 1, a whole pass over the {n} samples of the data "
        f"({passed} unreadable so far); check the data with `sparc data verify`"
    ]
    assert result.exit_code == 1
