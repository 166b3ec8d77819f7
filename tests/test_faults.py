"""Faults a training run must survive, and the numbers a run is built on.

- SIGKILL inside a checkpoint write, a metrics write and a step (``tests/stress/sigkill.py``, the installed
  ``sparc`` console script): the run finishes bit-identical to an uninterrupted one, every step logged once.
- Half-written run folders built by hand and resumed in-process: a leftover temporary checkpoint folder, a step
  folder missing a file, a ``latest`` pointer to nothing, a metrics line cut short, a checkpoint renamed into
  place whose pointer was never written.
- Exit codes of the console script: 0, 2 (bad recipe field), 130 (Ctrl-C), 1 (an unexpected error, with its
  traceback in the run folder); a second trainer on a busy run folder.
- The learning-rate schedule and gradient clipping against values worked out by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparc_kit
from sparc_kit.engines import LocalEngine, OptimizerSpec, param_groups
from sparc_kit.train import latest_checkpoint, load_checkpoint, lr_factor, read_metrics, train
from sparc_kit.checkpoint import ResumeWarning
from test_train import MICRO, Interrupt, assert_same_weights, micro_recipe, weights

_spec = importlib.util.spec_from_file_location("sigkill", Path(__file__).resolve().parent / "stress" / "sigkill.py")
harness = sys.modules["sigkill"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

STEPS = 12  # of the console-script runs (log_every 1, checkpoint_every 2)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cli_reference(work) -> Path:
    """The uninterrupted console-script run every other console-script run is compared with."""
    return harness.reference_run(work, STEPS)


def _wait_until(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) first: {proc.stderr.read()[-2000:]}"
        time.sleep(0.01)
    raise AssertionError("timed out")


def _logged(run: Path) -> int:
    return harness.Snapshot.of(run).logged


def _assert_like_reference(run: Path, reference: Path) -> None:
    """Bit-identical final weights; steps 1..STEPS logged once each, as valid JSON, with the same losses."""
    digest = harness.weights_digest
    assert digest(harness.final_model_file(run)) == digest(harness.final_model_file(reference))
    rows, expected = harness.strict_metrics(run), harness.strict_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL


def test_sigkill_inside_writes_and_steps_resumes_bit_identical(work, cli_reference):
    """Three kills aimed at a checkpoint write, a metrics write and a step (the write pause holds each write
    open 0.1 s, so the aimed kills land inside it); each start after a kill repairs what it left."""
    report = harness.run_harness(
        work, kills=3, steps=STEPS, targets=["checkpoint write", "metrics write", "step"], write_delay=0.1
    )
    print(report.table())
    assert report.problems == []
    assert len(report.kills) == 3 and report.finished_early == 0 and report.starts == 4
    assert report.resumes == 3  # every start after the first resumed from a checkpoint
    landed = report.landed()
    assert landed["checkpoint write"] >= 1 and landed["metrics write"] >= 1, report.table()
    assert report.identical, report.table()
    assert report.metrics_ok, report.table()
    assert report.leftovers == []


# ---------------------------------------------------------------------------------------------------------------
# the console script's exit codes, and two trainers on one folder


def test_a_second_trainer_is_refused_while_the_first_finishes_undisturbed(work, cli_reference):
    """The second starts once the first has logged a step. Should the first come near its end before the second
    is through (a loaded machine makes starting slow), the first is paused there (SIGSTOP) until the second has
    been refused, then continued: the refusal always comes while the first is mid-run."""
    out = work / "busy"
    first = subprocess.Popen(harness.train_command(out, STEPS), env=harness.child_env(write_delay=0.1),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_until(lambda: _logged(out) >= 1, first)
        second = subprocess.Popen(harness.train_command(out, STEPS), env=harness.child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        paused = False
        while second.poll() is None:
            if not paused and _logged(out) >= STEPS - 2:
                os.kill(first.pid, signal.SIGSTOP)
                paused = True
            time.sleep(0.01)
        second_out, second_err = second.communicate()
        first_still_training = first.poll() is None and _logged(out) < STEPS
        if paused:
            os.kill(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first_still_training  # the second start really overlapped the first
    assert second.returncode == 1
    assert second_out == ""
    assert second_err.splitlines() == [
        f"error: run folder {out} is in use by another training process (pid {first.pid}); wait for it, or use "
        "another --out"
    ]
    assert first.returncode == 0, first_err
    _assert_like_reference(out, cli_reference)


def test_ctrl_c_exits_130_with_a_loadable_checkpoint_of_the_last_completed_step(work):
    out = work / "ctrl-c"
    proc = subprocess.Popen(harness.train_command(out, STEPS), env=harness.child_env(write_delay=0.1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_until(lambda: _logged(out) >= 3, proc)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = harness.strict_metrics(out)[-1]["step"]  # the step that was running when Ctrl-C came, completed
    assert 3 <= last < STEPS
    assert stderr.strip().splitlines() == [
        f"interrupted after step {last}; checkpoint saved in {out}; run again to resume"
    ]
    ckpt = latest_checkpoint(str(out / "checkpoints"))
    assert os.path.basename(ckpt) == f"step_{last:08d}"
    model = sparc_kit.build_model(sparc_kit.load_recipe(str(out / "recipe.yaml")))
    info = load_checkpoint(ckpt, model)
    assert info.step == last and info.state["samples_seen"] == last * 8
    assert "optimizer" in info.state["trainer"] and "rng" in info.state["trainer"]


def test_a_bad_recipe_field_exits_2_with_one_line_and_creates_nothing(work):
    out = work / "bad-input"
    proc = subprocess.run(harness.train_command(out, STEPS, "train.warmup=3"), env=harness.child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sparc_tiny: train.warmup: unknown key (value 3)")
    assert not out.exists()


def test_an_unexpected_error_exits_1_naming_the_traceback_file_in_the_run_folder(work):
    """A run folder whose ``checkpoints`` is a file: training starts, and the first checkpoint fails with an
    OSError nobody anticipated. One line, exit 1, the whole traceback in RUN/error.log."""
    out = work / "internal"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder\n")
    proc = subprocess.run(harness.train_command(out, STEPS), env=harness.child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    log = out / "error.log"
    assert proc.stderr.splitlines() == [
        f"error: FileExistsError: [Errno 17] File exists: '{out / 'checkpoints'}' (traceback: {log})"
    ]
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and "in save_train_checkpoint" in text
    assert text.rstrip().endswith(f"FileExistsError: [Errno 17] File exists: '{out / 'checkpoints'}'")
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]  # it failed at the first checkpoint, step 2


# ---------------------------------------------------------------------------------------------------------------
# half-written run folders, built by hand (in-process runs of the micro recipe: 12 steps, log_every 2,
# checkpoint_every 4, keep 2), each resumed to the end and compared with the uninterrupted run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The micro run of 12 steps, keeping every checkpoint (4, 8, 12): what the half-written folders come from."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    return out, train(micro_recipe("train.steps=12", "train.keep_checkpoints=3"), out, progress=False)


@pytest.fixture(scope="module")
def crashed(uninterrupted, tmp_path_factory):
    """The run folders a crash after step 10 (checkpoints 4 and 8, rows 2..10) and after step 6 (checkpoint 4,
    rows 2, 4, 6) leave, made from the uninterrupted run by taking away what the later steps wrote."""
    folders = {}
    for at, kept in ((10, ["step_00000004", "step_00000008"]), (6, ["step_00000004"])):
        out = str(tmp_path_factory.mktemp(f"crashed-{at}") / "run")
        shutil.copytree(uninterrupted[0], out)
        root = os.path.join(out, "checkpoints")
        for d in set(os.listdir(root)) - {"latest", *kept}:
            shutil.rmtree(os.path.join(root, d))
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(kept[-1] + "\n")
        rows = [r for r in read_metrics(out) if r["step"] <= at]
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        folders[at] = out
    return folders


def _copy(crashed, at: int, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(crashed[at], out)
    return out


def _assert_finished_like(out: str, reference: str) -> None:
    assert_same_weights(weights(reference), weights(out))
    rows = harness.strict_metrics(Path(out))
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(reference)]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000008", "step_00000012"]


def test_a_leftover_temporary_checkpoint_folder_is_ignored_and_removed(uninterrupted, crashed, tmp_path):
    """Killed inside the save of step 8: its temporary folder holds every file, state.json included, but was never
    renamed into place, so it is not a checkpoint; the resume starts from step 4 and the next save removes it, and
    the temporary file of a ``latest`` pointer that was never renamed."""
    ref_dir, _ = uninterrupted
    out = _copy(crashed, 6, tmp_path)
    root = os.path.join(out, "checkpoints")
    partial = os.path.join(root, ".tmp-step_00000008")
    shutil.copytree(os.path.join(root, "step_00000004"), partial)
    state = json.load(open(os.path.join(partial, "state.json")))
    json.dump({**state, "step": 8, "samples_seen": 64}, open(os.path.join(partial, "state.json"), "w"))
    os.makedirs(os.path.join(root, ".tmp-step_00000008-k2x9"))  # save_checkpoint's mkdtemp names
    with open(os.path.join(root, ".tmp-w7ur1d"), "w") as f:  # a new `latest` killed before its rename
        f.write("step_00000008\n")
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 4
    _assert_finished_like(out, ref_dir)


@pytest.mark.parametrize("missing", ["trainer.pt", "model.safetensors"])
def test_a_step_folder_missing_a_file_falls_back_to_the_previous_checkpoint(uninterrupted, crashed, tmp_path, missing):
    ref_dir, _ = uninterrupted
    out = _copy(crashed, 10, tmp_path)
    root = os.path.join(out, "checkpoints")
    os.remove(os.path.join(root, "step_00000008", missing))
    expected = f"checkpoint {root}/step_00000008 is incomplete (no {missing}); resuming from step_00000004"
    with pytest.warns(ResumeWarning) as caught:
        resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert [str(w.message) for w in caught if w.category is ResumeWarning] == [expected]
    assert resumed.resumed_from == 4
    _assert_finished_like(out, ref_dir)


def test_the_fallback_is_one_warning_line_from_the_command(uninterrupted, crashed, tmp_path):
    ref_dir, _ = uninterrupted
    out = _copy(crashed, 10, tmp_path)
    root = os.path.join(out, "checkpoints")
    os.remove(os.path.join(root, "step_00000008", "trainer.pt"))
    from sparc_cli.main import app

    sets = [a for s in [*MICRO, "train.steps=12"] for a in ("--set", s)]
    result = CliRunner().invoke(app, ["train", "sparc_tiny", *sets, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: checkpoint {root}/step_00000008 is incomplete (no trainer.pt); resuming from step_00000004"
    ]
    _assert_finished_like(out, ref_dir)


def test_a_latest_pointer_to_a_missing_folder_falls_back_to_the_newest_complete_one(uninterrupted, crashed, tmp_path):
    ref_dir, _ = uninterrupted
    out = _copy(crashed, 10, tmp_path)
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000012\n")
    with pytest.warns(ResumeWarning) as caught:
        resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert [str(w.message) for w in caught if w.category is ResumeWarning] == [
        f"{root}/latest names step_00000012, which does not exist; resuming from step_00000008"
    ]
    assert resumed.resumed_from == 8
    _assert_finished_like(out, ref_dir)


def test_a_metrics_line_cut_short_is_dropped_and_no_step_is_logged_twice(uninterrupted, crashed, tmp_path):
    """Killed while writing the row of step 8, after the row of step 6 (logged after checkpoint 4): the resume
    drops the cut line and the row of step 6, and logs 6, 8, 10, 12 again, once each."""
    ref_dir, _ = uninterrupted
    out = _copy(crashed, 6, tmp_path)
    assert [r["step"] for r in harness.strict_metrics(Path(out))] == [2, 4, 6]
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 8, "loss": 2.51, "global_lo')
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 4
    _assert_finished_like(out, ref_dir)


@pytest.mark.parametrize("state", ["incomplete", "unpublished"])
def test_with_one_checkpoint_kept_a_save_never_removes_itself(uninterrupted, crashed, tmp_path, state):
    """keep_checkpoints=1, a newer step folder than the one resumed from: ``incomplete`` (step 8 without
    trainer.pt) or ``unpublished`` (step 8 renamed into place, killed before ``latest`` named it). The resume
    starts from step 4 and saves step 6; that save must stay the checkpoint a crash at step 7 resumes from, and
    the finished run has every row once."""
    ref_dir, _ = uninterrupted
    out = _copy(crashed, 10, tmp_path)
    root = os.path.join(out, "checkpoints")
    if state == "incomplete":
        os.remove(os.path.join(root, "step_00000008", "trainer.pt"))
    else:
        with open(os.path.join(root, "latest"), "w") as f:
            f.write("step_00000004\n")
    recipe = micro_recipe("train.steps=12", "train.keep_checkpoints=1", "train.checkpoint_every=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="boom"):
            train(recipe, out, progress=False, callback=Interrupt(7, RuntimeError("boom")))
    assert sum(w.category is ResumeWarning for w in caught) == (1 if state == "incomplete" else 0)
    assert latest_checkpoint(root) == os.path.join(root, "step_00000006")
    assert sorted(os.listdir(root)) == ["latest", "step_00000006"]
    resumed = train(recipe, out, progress=False)
    assert resumed.resumed_from == 6
    assert_same_weights(weights(ref_dir), weights(out))
    rows = harness.strict_metrics(Path(out))
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(ref_dir)]


# ---------------------------------------------------------------------------------------------------------------
# the learning-rate schedule and gradient clipping, against numbers worked out by hand


def test_warmup_then_cosine_to_min_lr_ratio_by_hand():
    """lr 1e-3, 4 warm-up steps, 12 steps, min_lr_ratio 0.1. ``lr_factor(s)`` is the factor of the update after s
    completed steps: (s + 1) / 4 while s < 4; then 0.1 + 0.9 * (1 + cos(pi * (s - 4) / 8)) / 2."""
    peak = 1e-3
    expected = {
        0: 0.25e-3,  # 1/4
        1: 0.5e-3,  # 2/4
        3: 1e-3,  # warmup - 1: 4/4
        4: 1e-3,  # warmup: cosine at 0
        6: 0.868198051533946e-3,  # 0.1 + 0.9 * (1 + 0.707106781186548) / 2
        8: 0.55e-3,  # mid decay: 0.1 + 0.9 * (1 + 0) / 2
        11: 0.134254210369921e-3,  # last update: 0.1 + 0.9 * (1 - 0.923879532511287) / 2
        12: 0.1e-3,  # the end: min_lr_ratio
    }
    for step, lr in expected.items():
        assert peak * lr_factor(step, 12, 4, "cosine", 0.1) == pytest.approx(lr, rel=1e-12, abs=0), step
    assert [lr_factor(s, 12, 4, "constant", 0.1) for s in (0, 3, 4, 11)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(0, 12, 0, "cosine", 0.0) == 1.0  # no warm-up: the first update at the peak


def test_the_loop_logs_the_scheduled_learning_rate(uninterrupted):
    """The micro run (lr 1e-3, 2 warm-up steps, 12 steps, min_lr_ratio 0) logs every 2 steps the lr of the row's
    own update, i.e. lr_factor(step - 1): 1 at step 1 (2/2), then (1 + cos(pi * (s - 2) / 10)) / 2."""
    _, result = uninterrupted
    expected = [
        1e-3,  # row 2: update after 1 step, still warm-up: 2/2
        0.975528258147577e-3,  # row 4: (1 + cos(0.1 pi)) / 2, cos(0.1 pi) = 0.951056516295154
        0.793892626146237e-3,  # row 6: (1 + cos(0.3 pi)) / 2, cos(0.3 pi) = 0.587785252292473
        0.5e-3,  # row 8: (1 + cos(0.5 pi)) / 2
        0.206107373853763e-3,  # row 10: (1 - 0.587785252292473) / 2
        0.024471741852423e-3,  # row 12: (1 - 0.951056516295154) / 2
    ]
    assert [r["lr"] for r in result.metrics] == pytest.approx(expected, rel=1e-12, abs=0)


class _TwoParameters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        self.b = torch.nn.Parameter(torch.tensor([[1.0]]))


def _step_with(grads: tuple[list[float], list[list[float]]], grad_clip, impl: str = "auto"):
    """One LocalEngine step of AdamW (lr 0.1, eps 1, no weight decay) on known gradients; returns the logged norm,
    the gradients the optimizer applies (the fused AdamW is handed the clipping as its ``grad_scale``, which it
    divides every gradient by), and the parameters after the update."""
    module = _TwoParameters()
    engine = LocalEngine(device="cpu")
    engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=0.1, betas=(0.9, 0.98), eps=1.0, impl=impl))
    module.a.grad, module.b.grad = torch.tensor(grads[0]), torch.tensor(grads[1])
    handed = []

    def applied(opt, args, kwargs):
        scale = getattr(opt, "grad_scale", None)
        s = 1.0 if scale is None else float(scale)
        handed.append(([g / s for g in module.a.grad.tolist()], [[g / s for g in module.b.grad.tolist()[0]]]))

    engine.optimizer.register_step_pre_hook(applied)
    norm = engine.step(grad_clip)
    return norm, handed[0], (module.a.detach().tolist(), module.b.detach().tolist())


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_global_norm_clipping_by_hand(impl):
    """Gradients (3, 4) and (12): global norm sqrt(9 + 16 + 144) = 13. With grad_clip 1 every gradient is scaled by
    min(1, 1 / (13 + 1e-6)) (torch's clip_grad_norm_ rule) to (3/13, 4/13) and (12/13); the logged norm is the one
    before clipping. AdamW's first update is lr * g / (|g| + eps) = 0.1 * g / (g + 1) for g > 0: 0.1 * 3/16,
    0.1 * 4/17, 0.1 * 12/25."""
    norm, handed, after = _step_with(([3.0, 4.0], [[12.0]]), grad_clip=1.0, impl=impl)
    assert norm == 13.0
    assert handed[0] == pytest.approx([3 / 13, 4 / 13], rel=1e-6)
    assert handed[1][0] == pytest.approx([12 / 13], rel=1e-6)
    assert after[0] == pytest.approx([1 - 0.01875, 1 - 0.4 / 17], rel=1e-6)
    assert after[1][0] == pytest.approx([1 - 0.048], rel=1e-6)


@pytest.mark.parametrize("impl", ["fused", "for_loop"])
def test_a_norm_under_the_clip_and_no_clip_leave_gradients_alone(impl):
    norm, handed, _ = _step_with(([0.3, 0.4], [[0.0]]), grad_clip=1.0, impl=impl)  # norm 0.5 < 1: factor 1
    assert norm == pytest.approx(0.5, rel=1e-7)
    assert handed == ([pytest.approx(0.3), pytest.approx(0.4)], [[0.0]])
    norm, handed, after = _step_with(([3.0, 4.0], [[12.0]]), grad_clip=None, impl=impl)
    assert norm == 13.0 and handed == ([3.0, 4.0], [[12.0]])
    assert after[0] == pytest.approx([1 - 0.1 * 3 / 4, 1 - 0.1 * 4 / 5], rel=1e-6)  # lr * g / (g + 1)
    assert math.isclose(after[1][0][0], 1 - 0.1 * 12 / 13, rel_tol=1e-6)
