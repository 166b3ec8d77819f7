"""``sparc runs``: real run folders (a finished run, a run stopped by SIGINT, a run still training in another
process) listed with the step, last loss and status each really has; evaluations ranked in their direction; an
unreadable folder passed over and counted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparc_cli.main import app
from sparc_kit.runs import list_runs

SPARC = shutil.which("sparc", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
TINY = [
    "train.batch_size=8", "data.num_samples=64", "model.embed_dim=16", "train.log_every=1",
    "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
]


def _argv(out: str, steps: int, *extra: str) -> list[str]:
    sets = [*TINY, f"train.steps={steps}", *extra]
    return [SPARC, "train", "sparc_tiny", *[a for s in sets for a in ("--set", s)], "--out", out, "--quiet"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _listed(root: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["runs", str(root), "--json", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def _by_name(listing: dict) -> dict[str, dict]:
    return {os.path.basename(r["path"]): r for r in listing["runs"]}


def _wait_for(condition, proc, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the trainer ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_finished_interrupted_and_running_runs(tmp_path):
    root = tmp_path / "runs"
    # a run still training (many steps, a metrics row each step, no checkpoint until it is stopped)
    live = subprocess.Popen(
        _argv(str(root / "live"), 1_000_000, "train.checkpoint_every=1000000"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        done = subprocess.run(_argv(str(root / "done"), 3), cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        _wait_for(lambda: (root / "live" / "metrics.jsonl").exists() and len(_rows(root / "live")) >= 2, live,
                  "two metrics rows")

        seen_before = _rows(root / "live")[-1]["step"]
        runs = _by_name(_listed(root))
        rows_after = _rows(root / "live")
        running = runs["live"]
        assert (running["status"], running["pid"], running["status_text"]) == ("running", live.pid,
                                                                                f"running (pid {live.pid})")
        assert seen_before <= running["step"] <= rows_after[-1]["step"]
        assert running["total"] == 1_000_000 and running["checkpoint_step"] == 0
        logged = {r["step"]: r["loss"] for r in rows_after}
        assert running["last_loss"] == logged[running["step"]]  # the last row when it was read

        finished = runs["done"]
        rows = _rows(root / "done")
        assert (finished["status"], finished["step"], finished["total"], finished["pid"]) == ("finished", 3, 3, None)
        assert finished["last_loss"] == rows[-1]["loss"] and rows[-1]["step"] == 3
        assert (finished["recipe"], finished["loss"]) == ("sparc_tiny", "sparc")
        on_disk = sum(p.stat().st_size for p in (root / "done").rglob("*") if p.is_file())
        assert finished["size_bytes"] == on_disk

        live.send_signal(signal.SIGINT)  # the step finishes, is checkpointed, the run exits 130
        _, err = live.communicate(timeout=120)
        assert live.returncode == 130, err
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()

    stopped = _by_name(_listed(root))["live"]
    rows = _rows(root / "live")
    saved = int((root / "live" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert (root / "live" / ".lock").read_text().strip() == str(live.pid)  # the dead process's pid stays
    assert (stopped["status"], stopped["pid"]) == ("interrupted", None)
    assert stopped["step"] == stopped["checkpoint_step"] == saved == rows[-1]["step"] > running["step"]
    assert stopped["last_loss"] == rows[-1]["loss"]

    table = CliRunner().invoke(app, ["runs", str(root)])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["run", "recipe", "loss", "step", "last", "loss", "best", "eval", "status", "size"]
    cells = {line.split()[0]: line.split() for line in lines[1:]}
    assert cells["done"][1:5] == ["sparc_tiny", "sparc", "3/3", f"{_rows(root / 'done')[-1]['loss']:.4f}"]
    assert cells["done"][6] == "finished" and cells["live"][6] == "interrupted"
    assert cells["live"][3] == f"{saved}/1000000"


def _fake_run(folder: Path, rows: list[dict], recipe_extra: dict | None = None) -> Path:
    """A run folder written by hand: the built-in recipe's values and the given metrics rows."""
    folder.mkdir(parents=True)
    recipe = {"name": "hand", "loss": {"name": "clip"}, "train": {"steps": 10}, **(recipe_extra or {})}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_best_evaluation_over_rows_and_files(tmp_path):
    rows = [
        {"step": 2, "loss": 3.0, "eval/zs/top1": 0.10, "eval/zs/top5": 0.9, "eval/zs/n": 50},
        {"step": 4, "loss": 2.5, "eval/zs/top1": 0.40, "eval/zs/top5": 0.95, "eval/zs/n": 50},
        {"step": 6, "loss": 2.0, "eval/zs/top1": 0.30, "eval/zs/top5": 0.97, "eval/zs/n": 50},
        {"step": 7, "loss": 1.9},
    ]
    run = _fake_run(tmp_path / "a", rows, {"eval": [{"task": "zeroshot", "name": "zs", "data": "x.tar"}]})
    summary = list_runs(str(tmp_path)).runs[0]
    assert (summary.best_metric, summary.best_value, summary.best_step, summary.best_mode) == (
        "eval/zs/top1", 0.40, 4, "max")
    assert (summary.step, summary.last_loss, summary.total, summary.status) == (7, 1.9, 10, "interrupted")

    # a later `sparc eval` result counts as one more measurement (it has no training step of its own here)
    (run / "eval").mkdir()
    (run / "eval" / "zs.json").write_text(json.dumps({"task": "zeroshot", "metrics": {"top1": 0.55, "n": 50}}))
    summary = list_runs(str(tmp_path)).runs[0]
    assert (summary.best_metric, summary.best_value, summary.best_step) == ("eval/zs/top1", 0.55, None)


def test_unreadable_folder_is_passed_over_and_counted(tmp_path):
    _fake_run(tmp_path / "good", [{"step": 1, "loss": 2.0}])
    bad = _fake_run(tmp_path / "bad", [{"step": 1, "loss": 2.0}])
    (bad / "recipe.yaml").write_text("name: [unclosed\n")
    nested = _fake_run(tmp_path / "group" / "inner", [{"step": 5, "loss": 1.0}])
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "recipe.yaml").write_text("name: x\n")  # a recipe alone is not a run

    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["good", os.path.join("group", "inner")]
    note = result.stderr.splitlines()
    assert note[0] == "note: 1 folder(s) passed over, unreadable:"
    assert note[1].startswith(f"  {bad}: ") and len(note) == 2
    listing = _listed(tmp_path)
    assert len(listing["skipped"]) == 1 and [r["step"] for r in listing["runs"]] == [1, 5]
    assert nested.exists()


def test_missing_folder_is_bad_input(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'nope'}: no such folder (give the folder that holds run folders, e.g. runs)"
    ]


def test_default_folder_is_runs_when_there_is_one(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs" / "r1", [{"step": 2, "loss": 1.5}])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["runs", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["root"] == "runs" and [r["path"] for r in listing["runs"]] == [os.path.join("runs", "r1")]


def test_a_run_that_ended_on_an_unexpected_error_is_failed_until_a_resume_goes_past_it(tmp_path, monkeypatch):
    """A real in-process run whose loss raises at its fourth step: exit 1 and RUN/error.log, listed ``failed``
    with the steps it logged; a resume that trains on is no longer ``failed`` (its metrics are newer)."""
    from sparc_kit.losses import SparcLoss

    real_forward, calls = SparcLoss.forward, []

    def breaks_at_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("a bug in a loss")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(SparcLoss, "forward", breaks_at_step_4)
    run = tmp_path / "runs" / "broken"
    args = _argv(str(run), 6, "train.checkpoint_every=2")[1:]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, (result.output, result.exception)
    assert (run / "error.log").exists()
    broken = _by_name(_listed(tmp_path / "runs"))["broken"]
    rows = _rows(run)
    assert (broken["status"], broken["step"], broken["checkpoint_step"]) == ("failed", 3, 2)
    assert broken["last_loss"] == rows[-1]["loss"] and rows[-1]["step"] == 3

    monkeypatch.setattr(SparcLoss, "forward", real_forward)
    os.utime(run / "error.log", (time.time() - 60, time.time() - 60))  # the failure, a minute before the resume
    resumed = CliRunner().invoke(app, args)  # resumes from step 2 (automatic), to the end
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    assert _by_name(_listed(tmp_path / "runs"))["broken"]["status"] == "finished"
