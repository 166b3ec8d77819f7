"""The child process of a parallel sweep (``python -m sparc_kit.ablate.child RECIPE_FILE RUN_DIR``).

Its exit statuses and ``error:`` lines are checked by calling :func:`sparc_kit.ablate.child.main` here with
``train`` replaced; the sweep's side (the command, the environment, what it reads back) with ``subprocess.Popen``
replaced; and two real children: one trains a plugin loss that only ``SPARC_PLUGINS`` names and fails, one is
stopped by SIGINT.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import sparc_kit
from sparc_kit.ablate import child, plan_sweep, point_state, run_sweep
from sparc_kit.ablate import run as ablate_run
from sparc_kit.config import dump_recipe
from sparc_kit.errors import ComponentError
from sparc_kit.registry import losses
from sparc_kit.train import NonFiniteLossError, RunFolderBusyError, TrainingInterrupted, latest_checkpoint

from test_train import MICRO as TRAIN_MICRO  # noqa: E402  (the micro sparc_tiny every training test uses)

MICRO = [*TRAIN_MICRO, "train.steps=4"]
ABLATE_PACKAGE = pathlib.Path(sparc_kit.__file__).parent / "ablate"


def recipe_file(tmp_path, *extra: str) -> str:
    path = tmp_path / "point.yaml"
    path.write_text(dump_recipe(sparc_kit.load_recipe("sparc_tiny", [*MICRO, *extra])))
    return str(path)


@pytest.mark.parametrize(
    "raised, status, last_line",
    [
        (None, 0, None),
        (NonFiniteLossError(3, float("nan"), 2), 1, "error: loss is nan at step 3"),
        (RunFolderBusyError("another process is training into RUN"), 1, "error: another process is training into RUN"),
        (ComponentError("heads 3 do not divide width 32\nmore"), 2, "error: heads 3 do not divide width 32"),
        (TrainingInterrupted(2, "RUN"), 130, "interrupted after step 2; checkpoint saved in RUN; run again to resume"),
        (KeyboardInterrupt(), 130, "interrupted before the first step; nothing new was saved in {run}"),
        # unanticipated (a bug, the machine; a plain ValueError too): the traceback goes to RUN/error.log
        (OSError("disk full"), 1, "error: OSError: disk full (traceback: {run}/error.log)"),
        (ValueError("a bug"), 1, "error: ValueError: a bug (traceback: {run}/error.log)"),
    ],
)
def test_child_exit_status_and_last_line(tmp_path, monkeypatch, capsys, raised, status, last_line):
    run = str(tmp_path / "run")
    seen = []

    def fake_train(recipe, out_dir, progress=True):
        seen.append((recipe.train.steps, out_dir, progress))
        if raised is not None:
            raise raised

    monkeypatch.setattr(child, "train", fake_train)
    assert child.main([recipe_file(tmp_path), run]) == status
    assert seen == [(4, run, False)]  # the point's recipe, into its folder, without progress output
    err = capsys.readouterr().err.strip().splitlines()
    if last_line is None:
        assert err == []
    else:
        assert err == [last_line.format(run=run)] or err[-1].startswith(last_line.format(run=run)), err
    if status == 1 and "traceback" in last_line:
        log = (tmp_path / "run" / "error.log").read_text()
        assert "Traceback (most recent call last):" in log and str(raised) in log


def test_child_refuses_a_bad_recipe_or_command_line_with_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(pathlib.Path(recipe_file(tmp_path)).read_text().replace("name: sparc\n", "name: sparcc\n", 1))
    assert child.main([str(bad), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("error: ") for line in err)
    assert any("unknown loss 'sparcc'" in line for line in err), err
    assert not (tmp_path / "run").exists()

    assert child.main(["only-one-argument"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {child.USAGE}"


def test_the_ablation_package_starts_no_cli():
    """The library does not reach into the CLI package: its children run a module of the library."""
    for path in ABLATE_PACKAGE.glob("*.py"):
        assert "sparc_cli" not in path.read_text(), path
    assert ablate_run.CHILD == "sparc_kit.ablate.child" and ablate_run.CHILD == child.__name__


class FakeChild:
    """Stands in for ``subprocess.Popen``: records the command and environment, writes ``LOG`` lines into the
    child's log and exits with the status given for its run folder."""

    started: list["FakeChild"] = []
    script: dict[str, tuple[int, list[str]]] = {}

    def __init__(self, cmd, stdout=None, stderr=None, env=None):
        self.cmd, self.env, self.stderr = cmd, env, stderr
        self.status, lines = self.script[cmd[-1]]
        stdout.write("".join(f"{line}\n" for line in lines))
        stdout.flush()
        FakeChild.started.append(self)

    def wait(self, timeout=None):
        return self.status

    def poll(self):
        return self.status


def test_a_parallel_sweep_starts_library_children_and_reads_their_status(tmp_path, monkeypatch):
    sweep = plan_sweep("sparc_tiny", ["lambda_f=1,5,10"], overrides=MICRO, out_dir=str(tmp_path / "sw"))
    monkeypatch.setenv("SPARC_PLUGINS", "my_losses.py")  # after planning: only the children would load it
    done, failed, stopped = (p.run_dir for p in sweep.points)
    FakeChild.started = []
    FakeChild.script = {
        done: (0, []),
        failed: (1, ["warning: something", "error: loss is nan at step 3", "a last line that is no error"]),
        stopped: (130, ["interrupted after step 2; checkpoint saved"]),
    }
    monkeypatch.setattr(ablate_run.subprocess, "Popen", FakeChild)
    outcome = run_sweep(sweep, jobs=2, log=None)

    started = {c.cmd[-1]: c for c in FakeChild.started}  # two at a time: in either order
    assert sorted(started) == sorted(p.run_dir for p in sweep.points)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for point in sweep.points:
        c = started[point.run_dir]
        assert c.cmd == [
            sys.executable, "-m", "sparc_kit.ablate.child", os.path.join(point.run_dir, ".ablate_recipe.yaml"),
            point.run_dir,
        ]  # fmt: skip
        assert c.env["SPARC_PLUGINS"] == "my_losses.py"  # the children load the sweep's plugins
        assert c.env["OMP_NUM_THREADS"] == threads and c.env["MKL_NUM_THREADS"] == threads
        assert c.stderr is subprocess.STDOUT
        with open(c.cmd[3]) as f:
            assert f.read() == dump_recipe(point.recipe)  # the point's recipe, written for the child
    assert outcome.trained == [sweep.points[0]]
    log = os.path.join(failed, "train.log")
    assert outcome.failed == {failed: f"exit status 1: error: loss is nan at step 3 (see {log})"}
    assert outcome.interrupted


NAN_LOSS = '''\
from sparc_kit.losses import ClipLoss
from sparc_kit.registry import losses


@losses.register("nan_at_step_clip")
class NanAtStepClip(ClipLoss):
    """CLIP's loss, NaN from the ``at``-th call on (a test plugin)."""

    def __init__(self, at: int = 2):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, image_embeds, text_embeds, logit_scale, **_):
        out = super().forward(image_embeds, text_embeds, logit_scale)
        self.calls += 1
        return {**out, "loss": out["loss"] * float("nan")} if self.calls >= self.at else out
'''


@pytest.mark.slow
def test_a_real_child_loads_the_plugins_and_its_error_line_is_read_back(tmp_path, monkeypatch):
    plugin = tmp_path / "nan_loss.py"
    plugin.write_text(NAN_LOSS)
    monkeypatch.setenv("SPARC_PLUGINS", str(plugin))  # as `sparc --plugin nan_loss.py ablate ...` leaves it
    try:
        sweep = plan_sweep(
            "sparc_tiny", ["loss.at=2"], overrides=[*MICRO, "loss={name: nan_at_step_clip}"],
            out_dir=str(tmp_path / "sw"),
        )  # fmt: skip
        outcome = run_sweep(sweep, jobs=2, log=None)
    finally:  # there is no unregister API
        losses._entries.pop("nan_at_step_clip", None)
        losses.version += 1
    run_dir = sweep.points[0].run_dir
    assert not outcome.trained and not outcome.interrupted
    assert outcome.failed[run_dir].startswith("exit status 1: error: loss is nan at step 2"), outcome.failed
    assert outcome.failed[run_dir].endswith(f"(see {os.path.join(run_dir, 'train.log')})")


@pytest.mark.slow
def test_a_real_child_stopped_by_sigint_saves_its_step_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    recipe = recipe_file(tmp_path, "train.steps=100000", "train.log_every=1", "train.checkpoint_every=100000")
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparc_kit.ablate.child", recipe, str(run_dir)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 240
            while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "train.log").read_text()
    assert status == 130, text
    assert "checkpoint saved in" in text.strip().splitlines()[-1], text
    checkpoint = latest_checkpoint(str(run_dir / "checkpoints"))
    assert checkpoint is not None
    point = type("P", (), {"run_dir": str(run_dir), "recipe": sparc_kit.load_recipe(recipe)})()
    assert point_state(point) == "partial"  # a rerun of the sweep resumes it
