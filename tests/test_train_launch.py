"""What ``sparc train`` does around training, as library calls (:mod:`sparc_kit.train.launch`).

- :func:`check_nproc`: a process count the recipe cannot run is a project error naming ``--nproc``, before any
  process starts.
- :func:`relay_failure`: one process alone prints its lines; one of several started by ``sparc train --nproc``
  leaves its first line in a record and prints nothing; under another launcher it prints it with its rank,
  unless it repeats rank 0's error.
- :func:`write_traceback`: appended to RUN/error.log (error.rankN.log for the other processes), else a temporary
  file.
"""

from __future__ import annotations

import json
import os

import pytest

import sparc_kit
from sparc_kit.errors import SparcError
from sparc_kit.train.launch import (
    ERROR_DIR_ENV,
    LaunchError,
    PeerFailure,
    check_nproc,
    default_run_dir,
    relay_failure,
    train_argv,
    write_traceback,
)


def test_check_nproc_names_the_option():
    local = sparc_kit.load_recipe("sparc_tiny")
    check_nproc(1, local)
    with pytest.raises(LaunchError, match=r"^--nproc: must be at least 1, got 0$"):
        check_nproc(0, local)
    with pytest.raises(LaunchError, match="--nproc 2: engine.name is 'local', which runs one process"):
        check_nproc(2, local)
    ddp = sparc_kit.load_recipe("sparc_tiny", ["engine.name=ddp", "train.batch_size=10"])
    check_nproc(2, ddp)
    with pytest.raises(LaunchError, match="^--nproc 3: ") as info:
        check_nproc(3, ddp)
    assert isinstance(info.value, SparcError) and "\n" not in str(info.value)


def test_the_launched_command_and_the_default_run_folder():
    assert train_argv("r.yaml", ["a=1", "b=2"], "runs/x", quiet=True) == [
        "train", "r.yaml", "--out", "runs/x", "--set", "a=1", "--set", "b=2", "--quiet"
    ]
    tiny = sparc_kit.load_recipe("sparc_tiny")
    assert default_run_dir("elsewhere/other.yaml", tiny) == os.path.join("runs", tiny.name)
    assert default_run_dir("recipes/mine.yaml", tiny.model_copy(update={"name": None})) == os.path.join("runs", "mine")


def test_relay_failure_alone_with_the_launcher_and_under_another(tmp_path, monkeypatch):
    error = ValueError("boom")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(ERROR_DIR_ENV, raising=False)
    assert relay_failure(error, ["a", "b"], 2) == ["a", "b"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert relay_failure(error, ["a", "b"], 2) == ["[rank 1] a"]  # torchrun, srun: no launcher to tell
    error.from_main = True
    assert relay_failure(error, ["a"], 2) == []  # rank 0 says it

    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    assert relay_failure(PeerFailure("stopped: another process of this run failed (x)"), ["stopped: ..."], 1) == []
    record = json.loads((tmp_path / "rank_1.json").read_text())
    assert (record["rank"], record["code"], record["line"], record["peer"]) == (1, 1, "stopped: ...", True)


def test_write_traceback_in_the_run_folder_per_rank(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        raise OSError("the disk is full")
    except OSError as exc:
        first = write_traceback(exc, str(tmp_path / "run"))
        second = write_traceback(exc, str(tmp_path / "run"))
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        other = write_traceback(exc, str(tmp_path / "run"))
        loose = write_traceback(exc)
    assert first == second == str(tmp_path / "run" / "error.log")
    assert other == str(tmp_path / "run" / "error.rank1.log")
    text = (tmp_path / "run" / "error.log").read_text()
    assert text.count("Traceback (most recent call last):") == 2 and text.count("OSError: the disk is full") == 2
    assert " rank 1: sparc " in open(other).read().splitlines()[0]
    assert "OSError: the disk is full" in open(loose).read()
    os.remove(loose)
