"""``sparc data inspect|verify|convert`` and ``sparc tokenizer train`` on small generated data and the real sets.

What is checked: inspect's counts, caption-length statistics and histogram (in words, or in tokens of a given
tokenizer) and image sizes; verify exits 0 on clean data and 1 on the corrupt shards / manifest, naming every bad
key with its reason; convert writes shards of ``--shard-size`` samples (image bytes unchanged, .txt or .json
captions) that the webdataset reader reads back as the same (caption, pixels) set; tokenizer train writes a
model that loads; bad input is one ``error:`` line, exit 2, no traceback. The app is ``sparc_cli.main``'s when it
mounts the commands, else a test app with the same sub-apps.
"""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
import typer
from typer.testing import CliRunner

from sparc_cli import data as data_command
from sparc_cli import tokenizer as tokenizer_command
from sparc_kit.data import ManifestDataset, Tokenizer, WebDataset


def _app() -> typer.Typer:
    from sparc_cli.main import app as main_app

    if {g.name for g in main_app.registered_groups} >= {"data", "tokenizer"}:
        return main_app
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """sparc (test app)"""

    data_command.register(app)
    tokenizer_command.register(app)
    return app


@pytest.fixture
def cli():
    runner = CliRunner()
    app = _app()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_inspect_counts_histogram_and_image_sizes(tmp_path, datagen, cli):
    path = datagen.manifest(tmp_path / "m", n=12, size=12, captions_per_image=3)
    r = cli("data", "inspect", path, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["kind"] == "manifest" and report["samples"] == 12 and report["captions"] == 36
    assert report["captions_per_sample"]["min"] == report["captions_per_sample"]["max"] == 3
    assert report["caption_length"] == {"unit": "words", "min": 6, "median": 6, "mean": 6.0, "p95": 6, "max": 6}
    assert report["caption_length_histogram"] == [[6, 6, 36]]
    assert report["images"]["measured"] == 12 and report["images"]["width"]["max"] == 12
    assert report["images"]["formats"] == {"PNG": 12}
    text = cli("data", "inspect", path)
    assert "manifest, 12 samples" in text.stdout and "caption length (words): min 6" in text.stdout

    pattern, _ = datagen.shards(tmp_path / "s", n_shards=2, per_shard=7, size=10)
    tok = Tokenizer.train([datagen.caption(i) for i in range(30)], vocab_size=40, context_length=4)
    tok.save(str(tmp_path / "tok.model"))
    r = cli("data", "inspect", pattern, "--json", "--limit", "5", "--tokenizer", tmp_path / "tok.model",
            "--context-length", "4")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    # untruncated lengths (pieces + end token): a caption longer than the context must be visible as such
    lengths = [len(tok.sp.encode(datagen.caption(i).lower())) + 1 for i in range(14)]
    assert report["kind"] == "webdataset" and report["shards"] == 2 and report["samples"] == 14
    assert report["caption_length"]["unit"] == "tokens" and report["caption_length"]["max"] == max(lengths)
    assert report["longer_than_context"] == sum(n > 4 for n in lengths) > 0
    assert report["images"]["measured"] == 5 and report["images"]["height"]["min"] == 10


def test_verify_clean_and_corrupt_data(tmp_path, datagen, cli):
    pattern, _ = datagen.shards(tmp_path / "ok", n_shards=2, per_shard=3)
    r = cli("data", "verify", pattern)
    assert r.exit_code == 0 and "6 samples checked, 0 unreadable" in r.stdout
    bad = datagen.corrupt_shards(tmp_path / "bad")
    r = cli("data", "verify", bad)
    assert r.exit_code == 1
    lines = [line for line in r.stdout.splitlines() if line.startswith("unreadable: ")]
    named = sorted(line.split(": ")[1] for line in lines)
    assert named == sorted(
        ["bad-000.tar:broken", "bad-000.tar:empty", "bad-000.tar:notxt", "bad-000.tar:numeric", "bad-001.tar:c2",
         "bad-001.tar:__error__"]
    )
    assert "12 samples checked, 6 unreadable samples" in r.stdout
    assert any("broken" in line and "cannot decode image" in line for line in lines)
    # a manifest: bad lines and bad samples both listed
    path = datagen.manifest(tmp_path / "m", n=3, size=8)
    (tmp_path / "m" / "img" / "0001.png").unlink()
    with open(path, "a") as f:
        f.write("{oops\n")
    r = cli("data", "verify", path)
    assert r.exit_code == 1
    assert "unreadable: line 4: not valid JSON" in r.stdout
    assert "unreadable: line 2 (img/0001.png): image not found" in r.stdout
    assert "3 samples checked, 2 unreadable lines and samples" in r.stdout


def test_convert_round_trip_same_captions_and_pixels(tmp_path, datagen, cli):
    path = datagen.manifest(tmp_path / "m", n=11, size=10)
    with open(path, "a") as f:  # one image with a caption list, one missing image
        f.write(json.dumps({"image": "img/0000.png", "captions": ["first of two", "second of two"], "label": 3}) + "\n")
        f.write(json.dumps({"image": "img/missing.png", "caption": "gone"}) + "\n")
    out = tmp_path / "shards" / "train-%03d.tar"
    r = cli("data", "convert", path, out, "--shard-size", "5")
    assert r.exit_code == 0, r.output
    assert f"wrote 12 samples in 3 shard(s): {tmp_path}/shards/train-{{000..002}}.tar (1 skipped)" in r.stdout
    assert "skipped: line 13 (img/missing.png): image not found" in r.stderr
    with tarfile.open(tmp_path / "shards" / "train-002.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("00000011.json").read())
    assert names == ["00000010.png", "00000010.txt", "00000011.png", "00000011.json"]
    assert meta == {"captions": ["first of two", "second of two"], "label": 3}
    with tarfile.open(tmp_path / "shards" / "train-000.tar") as tar:  # image bytes copied unchanged
        assert tar.extractfile("00000004.png").read() == (tmp_path / "m" / "img" / "0004.png").read_bytes()

    manifest = ManifestDataset(path, image_size=10)
    shards = WebDataset(str(tmp_path / "shards" / "train-{000..002}.tar"), image_size=10)

    def pairs(samples):
        return sorted((s["caption"], s["image"].numpy().tobytes()) for s in samples if "skip" not in s)

    from_manifest = pairs([manifest[i] for i in range(11)])
    from_shards = [s for s in shards.scan() if s["key"] != "00000011"]
    assert len(from_shards) == 11 and pairs(from_shards) == from_manifest
    assert torch.equal(next(shards.scan())["image"], torch.from_numpy(datagen.pixels(0, 10)).permute(2, 0, 1))
    assert sorted(shards.captions()) == sorted(c for c in manifest.captions() if c != "gone")

    assert "one %d-style shard number" in _error_line(cli("data", "convert", path, tmp_path / "x.tar"))


def test_tokenizer_train_from_manifest_and_shards(tmp_path, datagen, cli):
    path = datagen.manifest(tmp_path / "m", n=20, size=8)
    r = cli("tokenizer", "train", "--data", path, "--vocab-size", "40", "--out", tmp_path / "a.model",
            "--model-type", "bpe", "--context-length", "8")
    assert r.exit_code == 0, r.output
    tok = Tokenizer.load(str(tmp_path / "a.model"), context_length=32)
    assert 20 < tok.vocab_size <= 40
    assert tok.decode(tok.encode(datagen.caption(4))) == datagen.caption(4)
    assert f"bpe tokenizer with {tok.vocab_size} pieces from 20 captions" in r.stdout
    pattern, _ = datagen.shards(tmp_path / "s", n_shards=2, per_shard=5)
    r = cli("tokenizer", "train", "--data", pattern, "--vocab-size", "30", "--out", tmp_path / "b.model",
            "--model-type", "word", "--limit", "7")
    assert r.exit_code == 0 and "from 7 captions" in r.stdout
    assert Tokenizer.load(str(tmp_path / "b.model")).vocab_size <= 30
    assert "--model-type must be" in _error_line(
        cli("tokenizer", "train", "--data", path, "--out", tmp_path / "c.model", "--model-type", "bogus")
    )


def test_bad_input_is_one_error_line(tmp_path, datagen, cli):
    missing = _error_line(cli("data", "inspect", tmp_path / "nope.jsonl"))
    assert missing == f"error: manifest not found: {tmp_path}/nope.jsonl"
    assert "shard not found" in _error_line(cli("data", "verify", tmp_path / "x-{000..001}.tar"))
    (tmp_path / "junk.jsonl").write_text("not json\n")
    assert "none of its 1 lines is usable" in _error_line(cli("data", "verify", tmp_path / "junk.jsonl"))
    (tmp_path / "data.parquet").write_text("x")
    assert "cannot tell the format" in _error_line(cli("tokenizer", "train", "--data", tmp_path / "data.parquet",
                                                       "--out", tmp_path / "t.model"))


@pytest.mark.smoke
def test_smoke_inspect_and_verify_real_data(shared_data, cli):
    r = cli("data", "inspect", shared_data / "coco-captions" / "pairs.jsonl", "--json", "--limit", "50")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["samples"] == 363 and report["captions"] == 1816 and report["images"]["measured"] == 50
    r = cli("data", "verify", shared_data / "cifar10" / "test-000.tar")
    assert r.exit_code == 0, r.output
    assert "10000 samples checked, 0 unreadable" in r.stdout


def test_convert_leaves_out_a_file_that_is_not_an_image(tmp_path, datagen, cli):
    path = datagen.manifest(tmp_path / "m", n=4, size=10)
    (tmp_path / "m" / "img" / "notes.png").write_bytes(b"this is not a PNG at all")
    with open(path, "a") as f:
        f.write(json.dumps({"image": "img/notes.png", "caption": "a text file in disguise"}) + "\n")
    r = cli("data", "convert", path, tmp_path / "out" / "s-%03d.tar", "--shard-size", "10")
    assert r.exit_code == 0, r.output
    assert "wrote 4 samples in 1 shard(s)" in r.stdout and "(1 skipped)" in r.stdout
    assert "img/notes.png" in r.stderr
    with tarfile.open(tmp_path / "out" / "s-000.tar") as tar:
        assert len([n for n in tar.getnames() if n.endswith(".png")]) == 4


def test_inspect_reports_captions_longer_than_the_context(tmp_path, datagen, cli):
    path = datagen.manifest(tmp_path / "m", n=6, size=10)
    with open(path, "a") as f:
        f.write(json.dumps({"image": "img/0000.png", "caption": " ".join(["red blue green things"] * 10)}) + "\n")
    tok = tmp_path / "tok.model"
    assert cli("tokenizer", "train", "--data", path, "--vocab-size", "64", "--out", tok).exit_code == 0
    r = cli("data", "inspect", path, "--tokenizer", tok, "--context-length", "12", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    loaded = Tokenizer.load(str(tok), context_length=12)
    captions = [json.loads(line).get("caption") for line in open(path)]
    assert loaded.is_truncated(captions[-1])
    assert report["longer_than_context"] == sum(loaded.is_truncated(c) for c in captions) >= 1
