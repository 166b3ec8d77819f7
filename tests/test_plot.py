"""sparc plot: two real runs drawn into one PNG that is read back (not blank, both runs' colours present), the
smoothing's numbers, and one-line errors for a missing run folder or a metric no run logged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sparc_cli.main import app
from sparc_kit.train import train
from sparc_kit.train.curves import CurvesError, ema, plot_curves, read_curves, run_labels

from test_train import micro_recipe  # noqa: E402

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours: run 1 and run 2


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    runs = []
    for name, lr in (("small_lr", "1e-4"), ("large_lr", "3e-3")):
        out = str(root / name)
        train(micro_recipe("train.steps=8", "train.log_every=1", f"optim.lr={lr}"), out, progress=False)
        runs.append(out)
    return runs


def pixels_near(image: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(image.astype(int) - np.array(colour)).max(axis=-1) <= tol).sum())


def test_sparc_plot_two_runs_writes_a_png_with_both_runs_lines(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", *two_runs, "--metric", "loss", "--metric", "lr", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}"
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (420, 1300, 3)  # two subplots side by side: 13 x 4.2 inches at 100 dpi
    non_white = (image.min(axis=-1) < 250).mean()
    assert 0.02 < non_white < 0.6
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    assert pixels_near(image, C0) > 300 and pixels_near(image, C1) > 300  # each run's line, in both subplots
    left, right = image[:, :650], image[:, 650:]
    for half in (left, right):
        assert pixels_near(half, C0) > 100 and pixels_near(half, C1) > 100


def test_the_curves_are_the_logged_values(two_runs):
    curves = read_curves(two_runs[0])
    steps, losses = curves["loss"]
    assert steps == list(range(1, 9)) and all(np.isfinite(losses))
    assert curves["lr"][1][-1] < max(curves["lr"][1])  # the cosine schedule, as logged
    assert run_labels(two_runs) == ["small_lr", "large_lr"]
    assert run_labels(["a/run", "b/run"]) == ["a/run", "b/run"]


def test_smoothing_is_a_debiased_exponential_moving_average():
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert ema([4.0] * 5, 0.9) == pytest.approx([4.0] * 5)  # debiased: a constant stays itself from the start
    with pytest.raises(CurvesError, match=r"--smooth 1.0: the smoothing weight is a number from 0"):
        ema([1.0], 1.0)


def test_a_smoothed_plot_differs_from_the_raw_one(two_runs, tmp_path):
    raw = plot_curves(two_runs, str(tmp_path / "raw.png"))
    smoothed = plot_curves(two_runs, str(tmp_path / "smooth.png"), smooth=0.8)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (raw, smoothed))
    assert a.shape == b.shape and (a != b).any(axis=-1).sum() > 200


def test_unknown_metric_lists_the_metrics_available(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["plot", two_runs[0], "--metric", "eval/zeroshot/top1", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --metric eval/zeroshot/top1: no run logs it; the runs' metrics: ")
    assert "loss" in line and "lr" in line and "grad_norm" in line
    assert not (tmp_path / "x.png").exists()


def test_missing_run_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nowhere'}: no such run folder"
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output
