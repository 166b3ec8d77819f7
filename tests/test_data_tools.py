"""The library under ``sparc data`` and ``sparc tokenizer train``, called directly.

- :mod:`sparc_kit.data.records`: one record per sample in file order, with the reason a sample is unusable;
  :func:`verify` lists the bad lines first.
- :mod:`sparc_kit.data.stats`: summary statistics and histograms against values worked out by hand.
- :mod:`sparc_kit.data.shard_writer`: shards of N samples, renamed into place only when complete, so an error
  while writing leaves the complete shards and no temporary file; the brace names of what was written.
- :mod:`sparc_kit.data.tokenizer_training`: what SentencePiece refuses is a project error in one line.
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from sparc_kit.data.records import iter_records, open_source, verify
from sparc_kit.data.shard_writer import ShardWriter, brace_pattern, check_pattern, convert_manifest
from sparc_kit.data.stats import histogram, inspect_dataset, summary
from sparc_kit.data.tokenizer_training import train_tokenizer
from sparc_kit.errors import DataError


def _broken_manifest(tmp_path, datagen) -> str:
    """Four rows: good, missing image, empty caption, good; and a line that is not JSON."""
    path = datagen.manifest(tmp_path / "m", n=4, size=8)
    (tmp_path / "m" / "img" / "0001.png").unlink()
    rows = [json.loads(line) for line in open(path)]
    rows[2]["caption"] = "   "
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write("{oops\n")
    return path


def test_records_in_file_order_with_reasons(tmp_path, datagen):
    ds = open_source(_broken_manifest(tmp_path, datagen))
    records = list(iter_records(ds, decode=True))
    assert [r["key"] for r in records] == [f"line {i + 1} (img/{i:04d}.png)" for i in range(4)]
    assert records[1]["skip"] == f"image not found: {tmp_path}/m/img/0001.png"
    assert records[2]["skip"] == "no usable caption (empty or not a string)"
    assert records[0]["caption"] == datagen.caption(0) and records[3]["index"] == 3
    assert tuple(records[0]["image"].shape) == (3, 8, 8)  # native size
    assert [r["key"] for r in iter_records(ds, limit=2)] == [records[0]["key"], records[1]["key"]]
    assert "image" not in next(iter_records(ds))

    pattern, _ = datagen.shards(tmp_path / "s", n_shards=2, per_shard=3)
    keys = [r["key"] for r in iter_records(open_source(pattern))]
    assert keys == [f"train-{s:03d}.tar:s{s:03d}_{j:05d}" for s in range(2) for j in range(3)]


def test_verify_lists_bad_lines_then_bad_samples(tmp_path, datagen):
    path = _broken_manifest(tmp_path, datagen)
    report = verify(path)
    assert report.kind == "manifest" and report.checked == 4
    assert report.unreadable[0].startswith("line 5: not valid JSON")
    assert report.unreadable[1:] == [
        f"line 2 (img/0001.png): image not found: {tmp_path}/m/img/0001.png",
        "line 3 (img/0002.png): no usable caption (empty or not a string)",
    ]
    assert report.summary() == f"{path}: 4 samples checked, 3 unreadable lines and samples"


def test_summary_and_histogram_by_hand():
    assert summary([100, 1, 3, 2, 4]) == {"min": 1, "median": 3, "mean": 22.0, "p95": 100, "max": 100}
    assert summary([5]) == {"min": 5, "median": 5, "mean": 5.0, "p95": 5, "max": 5}
    # 20 values, 10 bins of width 2; then 7..9 in bins of width 1
    assert histogram(list(range(20))) == [(2 * b, 2 * b + 1, 2) for b in range(10)]
    assert histogram([7, 9, 9]) == [(7, 7, 1), (8, 8, 0), (9, 9, 2)]


def test_inspect_dataset_counts(tmp_path, datagen):
    report = inspect_dataset(_broken_manifest(tmp_path, datagen), limit=3)
    assert (report["samples"], report["bad_lines"], report["captions"]) == (4, 1, 3)
    assert report["images"] == {
        "measured": 3, "unreadable": 2, "width": summary([8]), "height": summary([8]), "modes": {"RGB": 1},
        "formats": {"PNG": 1},
    }


def test_shards_are_complete_or_absent(tmp_path):
    pattern = str(tmp_path / "out" / "s-%02d.tar")
    with ShardWriter(pattern, 2) as writer:
        for i in range(5):
            writer.write(f"{i:04d}", {"txt": f"caption {i}".encode()})
    assert writer.written == [pattern % i for i in range(3)]
    with tarfile.open(pattern % 2) as tar:
        assert tar.getnames() == ["0004.txt"]

    failing = str(tmp_path / "failing" / "s-%02d.tar")
    with pytest.raises(RuntimeError, match="the disk"):
        with ShardWriter(failing, 2) as writer:
            for i in range(3):
                writer.write(f"{i:04d}", {"txt": b"x"})
            raise RuntimeError("the disk went away")
    assert sorted(os.listdir(tmp_path / "failing")) == ["s-00.tar"]  # the half-written s-01 is gone, no .tmp-*
    with tarfile.open(failing % 0) as tar:
        assert tar.getnames() == ["0000.txt", "0001.txt"]


def test_shard_names():
    assert brace_pattern("a/train-%03d.tar", 3) == "a/train-{000..002}.tar"
    assert brace_pattern("train-%03d.tar", 1) == "train-000.tar"
    assert brace_pattern("train-%d.tar", 12) == "train-{0..11}.tar"
    for bad in ("train.tar", "train-%d-%d.tar"):
        with pytest.raises(DataError, match="one %d-style shard number"):
            check_pattern(bad)


def test_convert_manifest_result(tmp_path, datagen):
    path = _broken_manifest(tmp_path, datagen)
    result = convert_manifest(path, str(tmp_path / "sh" / "t-%03d.tar"), shard_size=1)
    assert result.samples == 2 and result.shards == [str(tmp_path / "sh" / f"t-{i:03d}.tar") for i in range(2)]
    assert len(result.skipped) == 3 and result.skipped[0].startswith("line 5: ")
    assert result.summary() == f"wrote 2 samples in 2 shard(s): {tmp_path}/sh/t-{{000..001}}.tar (3 skipped)"
    with pytest.raises(DataError, match="already shards"):
        convert_manifest(result.shards[0], str(tmp_path / "again-%d.tar"))


def test_tokenizer_training_refusals_are_project_errors(tmp_path, datagen):
    path = datagen.manifest(tmp_path / "m", n=6, size=8)
    with pytest.raises(DataError, match="Vocabulary size is smaller than required_chars") as info:
        train_tokenizer(path, str(tmp_path / "t.model"), vocab_size=8)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "t.model").exists()
    trained = train_tokenizer(path, str(tmp_path / "t.model"), vocab_size=40, model_type="word", limit=4)
    assert trained.captions == 4 and trained.tokenizer.vocab_size <= 40 and (tmp_path / "t.model").exists()
