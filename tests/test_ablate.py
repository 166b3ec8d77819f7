"""``sparc ablate``: parameter names, typed values, default grids, the product grid, skipping and resuming, the report.

Sweeps train the micro sparc_tiny of tests/test_train.py for 4 steps, in-process; one module-scoped sweep
(2 threshold values x 2 seeds) serves the report, rerun and CLI tests.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import struct
from typing import Annotated

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

import sparc_kit
from sparc_cli.ablate import ablate_command
from sparc_kit.ablate import (
    AblationError,
    default_values,
    format_plan,
    num_patches,
    plan_sweep,
    point_state,
    resolve_param,
    run_sweep,
    write_report,
)
from sparc_kit.losses import ClipLoss
from sparc_kit.registry import losses
from sparc_kit.train import read_metrics, train

from test_train import MICRO as TRAIN_MICRO  # noqa: E402  (the micro sparc_tiny every training test uses)

MICRO = [*TRAIN_MICRO, "train.steps=4"]
P_MICRO = (32 // 8) ** 2  # 16


class Counter:
    """A train function that counts calls, optionally interrupting one run at a step (Ctrl-C there)."""

    def __init__(self, interrupt_run: int | None = None, at_step: int = 2):
        self.calls: list[str] = []
        self.results = []
        self.interrupt_run, self.at_step = interrupt_run, at_step

    def __call__(self, recipe, out_dir, progress=False):
        self.calls.append(out_dir)
        callback = None
        if self.interrupt_run is not None and len(self.calls) == self.interrupt_run:

            def callback(step, values):
                if step == self.at_step:
                    raise KeyboardInterrupt

        result = train(recipe, out_dir, progress=False, callback=callback)
        self.results.append(result)
        return result


def cli_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("ablate")(ablate_command)
    app.command("noop")(lambda: None)  # a second command so typer keeps the command name
    return app


def invoke(*args: str):
    return CliRunner().invoke(cli_app(), list(args))


def mtimes(sweep) -> dict[str, float]:
    return {p.run_dir: os.stat(os.path.join(p.run_dir, "metrics.jsonl")).st_mtime_ns for p in sweep.points}


# --------------------------------------------------------------------------------------------------------------
# names, values, grids (no training)


def test_short_names_resolve_to_one_path_or_fail_listing_candidates():
    recipe = sparc_kit.load_recipe("sparc_tiny")
    assert resolve_param(recipe, "lambda_f") == "loss.lambda_f"
    assert resolve_param(recipe, "sparsity_threshold") == "loss.sparsity_threshold"
    assert resolve_param(recipe, "vision.width") == "model.vision.width"
    assert resolve_param(recipe, "model.text.width") == "model.text.width"
    assert resolve_param(recipe, "lr") == "optim.lr"

    with pytest.raises(AblationError) as info:
        resolve_param(recipe, "width")
    assert len(info.value.problems) == 1
    assert "ambiguous" in info.value.problems[0]
    assert "model.vision.width" in info.value.problems[0] and "model.text.width" in info.value.problems[0]

    with pytest.raises(AblationError) as info:
        resolve_param(recipe, "lamda_f")
    assert "unknown parameter" in info.value.problems[0]
    assert "Did you mean loss.lambda_f" in info.value.problems[0]

    with pytest.raises(AblationError) as info:
        resolve_param(recipe, "model.vision")
    assert "is a section" in info.value.problems[0] and "patch_size" in info.value.problems[0]

    clip = sparc_kit.load_recipe("clip_tiny")  # lambda_g exists only under a SPARC loss
    with pytest.raises(AblationError) as info:
        resolve_param(clip, "lambda_g")
    assert "unknown parameter" in info.value.problems[0]


def test_values_are_typed_by_the_schema(tmp_path):
    def values(item: str):
        sweep = plan_sweep("sparc_tiny", [item], overrides=MICRO, out_dir=str(tmp_path / "sw"))
        return sweep.params[0].values, sweep

    floats, sweep = values("lambda_f=1,5")
    assert floats == [1.0, 5.0] and all(type(v) is float for v in floats)
    assert [p.recipe.loss.lambda_f for p in sweep.points] == [1.0, 5.0]

    ints, _ = values("train.batch_size=8,16")
    assert ints == [8, 16] and all(type(v) is int for v in ints)

    nulls, sweep = values("sparsity_threshold=null,0.01,1/P")
    assert nulls == [None, 0.01, 1 / P_MICRO]
    assert sweep.points[0].recipe.loss.sparsity_threshold is None
    assert sweep.points[2].run_dir.endswith(os.path.join("sparsity_threshold=0.0625", "seed=0"))

    literals, _ = values("weighting=dense,softmax")
    assert literals == ["dense", "softmax"]

    bools, sweep = values("class_token=true,false")
    assert bools == [True, False] and all(type(v) is bool for v in bools)
    assert [p.recipe.model.vision.class_token for p in sweep.points] == [True, False]

    betas, _ = values("betas=[0.9,0.95],[0.9,0.99]")
    assert betas == [(0.9, 0.95), (0.9, 0.99)]

    with pytest.raises(AblationError) as info:
        values("lambda_f=1,abc")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("--vary lambda_f=abc: loss.lambda_f: got 'abc'; input should be a valid")
    with pytest.raises(AblationError) as info:
        values("weighting=sparce")
    assert len(info.value.problems) == 1 and "loss.weighting" in info.value.problems[0]
    with pytest.raises(AblationError) as info:
        values("lambda_f=1,1.0")
    assert info.value.problems == ["--vary lambda_f: value 1 is given twice"]


def test_default_grids_follow_the_patch_count():
    tiny = sparc_kit.load_recipe("sparc_tiny")  # image 64, patch 8
    P = num_patches(tiny)
    assert P == 64
    assert default_values(tiny, "loss.sparsity_threshold") == [0.0, 0.5 / 64, 1 / 64, 2 / 64, 4 / 64]
    assert default_values(tiny, "loss.sparsity_threshold") == [0.0, 0.0078125, 0.015625, 0.03125, 0.0625]

    coarse = sparc_kit.load_recipe("sparc_tiny", ["model.vision.patch_size=16"])
    assert num_patches(coarse) == 16
    assert default_values(coarse, "loss.sparsity_threshold") == [0.0, 0.5 / 16, 1 / 16, 2 / 16, 4 / 16]

    assert default_values(tiny, "loss.lambda_f") == [0.5, 1.0, 5.0, 10.0]
    assert default_values(tiny, "loss.weighting") == ["sparse", "dense", "softmax"]
    assert default_values(tiny, "optim.schedule") == ["cosine", "constant"]  # a Literal
    assert default_values(tiny, "model.text.causal") == [False, True]  # a bool
    assert default_values(tiny, "loss.average") == ["token", "caption"]
    with pytest.raises(AblationError) as info:
        default_values(tiny, "loss.lambda_g")
    assert "float parameter has no default grid; give values" in info.value.problems[0]


@pytest.mark.parametrize("loss", ["sparc", "filip", "pacl", "gloria", "mgca"])
def test_every_combined_loss_declares_the_lambda_f_grid(loss):
    """lambda_f weighs the fine-grained term in each of them; each declares the paper's grid on its signature."""
    recipe = sparc_kit.load_recipe("sparc_tiny", [f"loss={{name: {loss}, lambda_g: 0.5}}"])
    assert default_values(recipe, "loss.lambda_f") == [0.5, 1.0, 5.0, 10.0]


class GridLoss(ClipLoss):
    """CLIP's loss with knobs that declare their default grids, as a user's plugin loss would (a test loss)."""

    def __init__(
        self,
        margin: Annotated[float, Field(json_schema_extra={"ablate_grid": [0.1, 0.2, 0.4]})] = 0.1,
        patch_share: Annotated[
            float, Field(json_schema_extra={"ablate_grid": [1.0, 3.0], "ablate_grid_unit": "1/num_patches"})
        ] = 0.0,
        odd_unit: Annotated[float, Field(json_schema_extra={"ablate_grid": [1.0], "ablate_grid_unit": "per_token"})] = 0,
        plain: float = 1.0,
    ):
        super().__init__()


@pytest.fixture
def grid_loss():
    losses.register("grid_test")(GridLoss)
    yield "grid_test"
    losses._entries.pop("grid_test", None)  # there is no unregister API
    losses.version += 1


def test_a_plugin_loss_declares_the_grids_of_its_own_parameters(grid_loss, tmp_path):
    recipe = sparc_kit.load_recipe("sparc_tiny", [f"loss={{name: {grid_loss}}}"])  # P = 64
    assert default_values(recipe, "loss.margin") == [0.1, 0.2, 0.4]
    assert default_values(recipe, "loss.patch_share") == [1 / 64, 3 / 64]  # relative to the patch count
    with pytest.raises(AblationError) as info:
        default_values(recipe, "loss.odd_unit")
    assert info.value.problems == [
        "--vary loss.odd_unit: its ablate_grid_unit 'per_token' is not one of 1/num_patches; give values"
    ]
    with pytest.raises(AblationError) as info:
        default_values(recipe, "loss.plain")
    assert "float parameter has no default grid; give values" in info.value.problems[0]

    sweep = plan_sweep(
        "sparc_tiny", ["margin", "patch_share"], overrides=[*MICRO, f"loss={{name: {grid_loss}}}"],
        out_dir=str(tmp_path / "sw"),
    )  # fmt: skip
    assert [p.values for p in sweep.params] == [[0.1, 0.2, 0.4], [1 / P_MICRO, 3 / P_MICRO]]
    assert [p.recipe.loss.margin for p in sweep.points[::2]] == [0.1, 0.2, 0.4]
    assert sweep.patches == P_MICRO  # a grid in units of P: the plan and the report name P
    assert "(P = 16 patches)" in format_plan(sweep)


def test_patch_count_of_another_tower_is_read_from_a_meta_device_build():
    pytest.importorskip("timm")
    recipe = sparc_kit.load_recipe(
        "sparc_tiny",
        ["model.vision.name=timm", "model.vision.model_name=vit_tiny_patch16_224", "model.vision.image_size=64"],
    )
    assert num_patches(recipe) == (64 // 16) ** 2
    assert default_values(recipe, "loss.sparsity_threshold")[2] == 1 / 16


def test_product_grid_with_seeds(tmp_path):
    out = str(tmp_path / "sw")
    sweep = plan_sweep(
        "sparc_tiny", ["lambda_f=1,5", "weighting=sparse,dense,softmax"], seeds=2, overrides=MICRO, out_dir=out
    )
    assert len(sweep.points) == 2 * 3 * 2
    assert len(sweep.combos) == 6
    got = [(p.recipe.loss.lambda_f, p.recipe.loss.weighting, p.recipe.train.seed) for p in sweep.points]
    want = [(lf, w, s) for lf in (1.0, 5.0) for w in ("sparse", "dense", "softmax") for s in (0, 1)]
    assert got == want
    assert sweep.points[3].run_dir == os.path.join(out, "lambda_f=1", "weighting=dense", "seed=1")
    assert sweep.points[3].overrides == ["loss.lambda_f=1", "loss.weighting=dense", "train.seed=1"]
    assert len({p.run_dir for p in sweep.points}) == 12
    assert all(p.recipe.train.steps == 4 for p in sweep.points)
    assert not os.path.exists(out)  # planning creates nothing


def test_every_point_is_validated_before_anything_runs(tmp_path):
    with pytest.raises(AblationError) as info:
        plan_sweep(
            "sparc_tiny",
            ["patch_size=8,7,5"],
            overrides=[*MICRO],
            out_dir=str(tmp_path / "sw"),
        )
    # caught by recipe validation now (the vit's own check), before any model is built
    assert info.value.problems == [
        "--vary patch_size=7: model.vision.patch_size: 7 does not tile model.vision.image_size=32; use a divisor of "
        "32 (2, 4, 8, 16, 32, ...)",
        "--vary patch_size=5: model.vision.patch_size: 5 does not tile model.vision.image_size=32; use a divisor of "
        "32 (2, 4, 8, 16, 32, ...)",
    ]
    assert not os.path.exists(tmp_path / "sw")


# --------------------------------------------------------------------------------------------------------------
# a real sweep


def retrieval_manifest(folder) -> str:
    """A 12-image retrieval set (PNG files + JSONL manifest) from the synthetic shapes."""
    from PIL import Image

    from sparc_kit.data import SyntheticShapes

    folder.mkdir()
    data = SyntheticShapes(num_samples=12, image_size=32, seed=123)
    lines = []
    for i in range(len(data)):
        item = data[i]
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [item["caption"]]}))
    (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "val.jsonl")


@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory):
    """2 threshold values x 2 seeds, trained with a retrieval evaluation at the last step (logged by the loop as
    eval/val/...); afterwards each run gets an eval/retrieval.json as `sparc eval` writes it."""
    root = tmp_path_factory.mktemp("ablate")
    manifest = retrieval_manifest(root / "val")
    overrides = [*MICRO, f"eval=[{{task: retrieval, data: '{manifest}', name: val}}]"]
    out = str(root / "sw")
    sweep = plan_sweep("sparc_tiny", ["sparsity_threshold=0,1/P"], seeds=2, overrides=overrides, out_dir=out)
    counter = Counter()
    outcome = run_sweep(sweep, train_fn=counter, log=None)
    for i, point in enumerate(sweep.points):
        os.makedirs(os.path.join(point.run_dir, "eval"), exist_ok=True)
        with open(os.path.join(point.run_dir, "eval", "retrieval.json"), "w") as f:
            json.dump(
                {
                    "name": "retrieval",
                    "task": "retrieval",
                    "data": "shards/val",
                    "step": 4,
                    "n": 64,
                    "metrics": {"i2t_R@1": 0.25 * i, "t2i_R@1": 1.0 - 0.1 * i, "images": 64, "texts": 64},
                    "settings": {"max_samples": None, "batch_size": 64},
                    "seconds": 0.5,
                },
                f,
            )
    return sweep, counter, outcome


def test_sweep_trains_every_point_into_its_run_folder(done_sweep):
    sweep, counter, outcome = done_sweep
    assert counter.calls == [p.run_dir for p in sweep.points]
    assert len(outcome.trained) == 4 and not outcome.failed and not outcome.interrupted
    for point in sweep.points:
        assert point_state(point) == "done"
        assert read_metrics(point.run_dir)[-1]["step"] == 4
        assert os.path.exists(os.path.join(point.run_dir, "recipe.yaml"))
    assert sweep.points[2].run_dir.endswith(os.path.join("sparsity_threshold=0.0625", "seed=0"))
    saved = sparc_kit.load_recipe(os.path.join(sweep.points[2].run_dir, "recipe.yaml"))
    assert saved.loss.sparsity_threshold == 1 / P_MICRO and saved.train.seed == 0
    assert json.load(open(os.path.join(sweep.out_dir, "sweep.json")))["seeds"] == [0, 1]


def test_rerun_skips_finished_points(done_sweep):
    sweep, _, _ = done_sweep
    before = mtimes(sweep)
    again = plan_sweep(
        "sparc_tiny", ["sparsity_threshold=0,1/P"], seeds=2, overrides=sweep.overrides, out_dir=sweep.out_dir
    )
    counter = Counter()
    outcome = run_sweep(again, train_fn=counter, log=None)
    assert counter.calls == []
    assert len(outcome.skipped) == 4 and outcome.trained == []
    assert mtimes(again) == before


def test_report_numbers_equal_the_runs_metrics(done_sweep):
    sweep, _, _ = done_sweep
    report = write_report(sweep)
    last = {p.run_dir: read_metrics(p.run_dir)[-1] for p in sweep.points}
    speed = {p.run_dir: statistics.fmean(r["samples_per_s"] for r in read_metrics(p.run_dir)) for p in sweep.points}
    assert report.names[0] == "final_loss"
    for name in ("fine_loss", "global_loss", "shortcut_gap", "i2t_acc", "eval/val/i2t_R@1", "eval/val/t2i_R@5"):
        assert name in report.names
    assert {"eval/retrieval/i2t_R@1", "samples_per_s"} <= set(report.names)
    for name in ("eval/retrieval/images", "eval/retrieval/n", "eval/val/images", "grad_norm", "lr", "step"):
        assert name not in report.names

    with open(report.files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["sparsity_threshold"] for r in table] == ["0", "0.0625"]
    for k, row in enumerate(table):
        dirs = [p.run_dir for p in sweep.points if p.combo == sweep.combos[k]]
        assert row["runs"] == "2" and row["seeds"] == "2"
        for name, values in (
            ("final_loss", [last[d]["loss"] for d in dirs]),
            ("fine_loss", [last[d]["fine_loss"] for d in dirs]),
            ("shortcut_gap", [last[d]["shortcut_gap"] for d in dirs]),
            ("eval/val/i2t_R@1", [last[d]["eval/val/i2t_R@1"] for d in dirs]),
            ("samples_per_s", [speed[d] for d in dirs]),
            ("eval/retrieval/i2t_R@1", [0.25 * (2 * k), 0.25 * (2 * k + 1)]),
        ):
            assert float(row[f"{name}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12)
            assert float(row[f"{name}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)

    with open(report.files["runs_csv"]) as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4
    for run in runs:
        assert float(run["final_loss"]) == last[run["run_dir"]]["loss"]
        assert float(run["i2t_acc"]) == last[run["run_dir"]]["i2t_acc"]

    # the best point: by default an evaluation (the sweep varies a loss setting, so final_loss is not comparable),
    # R@1 first and maximised; a loss named with --metric is minimised
    r1 = [statistics.fmean(last[p.run_dir]["eval/val/i2t_R@1"] for p in sweep.points if p.combo == c)
          for c in sweep.combos]
    assert report.metric == "eval/val/i2t_R@1" and report.mode == "max" and "evaluation" in report.why
    assert report.best["labels"]["sparsity_threshold"] == ["0", "0.0625"][r1.index(max(r1))]
    means = [statistics.fmean(last[p.run_dir]["loss"] for p in sweep.points if p.combo == c) for c in sweep.combos]
    by_loss = write_report(sweep, metric="final_loss", plot=False)
    assert by_loss.mode == "min" and by_loss.best["labels"]["sparsity_threshold"] == ["0", "0.0625"][means.index(min(means))]
    by_r1 = write_report(sweep, metric="retrieval/i2t_R@1", plot=False)  # the end of eval/retrieval/i2t_R@1
    assert by_r1.metric == "eval/retrieval/i2t_R@1" and by_r1.mode == "max"
    assert by_r1.best["labels"]["sparsity_threshold"] == "0.0625"
    assert by_r1.best["eval/retrieval/i2t_R@1"][0] == pytest.approx((0.5 + 0.75) / 2)
    by_t2i = write_report(sweep, metric="eval/retrieval/t2i_R@1", mode="min", plot=False)
    assert by_t2i.best["labels"]["sparsity_threshold"] == "0.0625"  # 1.0 - 0.1 * i falls with i
    assert write_report(sweep, metric="t2i_acc", plot=False).metric == "t2i_acc"
    ambiguous = write_report(sweep, metric="i2t_R@1", plot=False)
    assert ambiguous.problems == ["--metric i2t_R@1: ambiguous, it matches eval/val/i2t_R@1, eval/retrieval/i2t_R@1"]
    bad = write_report(sweep, metric="nope", plot=False)
    assert bad.problems and bad.problems[0].startswith("--metric nope: not among the results' metrics: final_loss")


def test_report_files_are_written(done_sweep):
    sweep, _, _ = done_sweep
    report = write_report(sweep)
    md = open(os.path.join(sweep.out_dir, "results.md")).read()
    assert md == report.markdown
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| sparsity_threshold | runs | final_loss |")
    assert len(lines) == 1 + 2  # header + one row per grid point
    assert " ± " in lines[1] and "2/2" in lines[1]
    assert "Best by eval/val/i2t_R@1 (max; an evaluation, the same measurement at every point): **sparsity_threshold=" in md
    assert "P = 16 patches" in md

    png = os.path.join(sweep.out_dir, "results.png")
    assert report.files["plot"] == png
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600
    assert len(data) > 20_000

    import numpy as np
    from PIL import Image

    assert report.files["curves"] == os.path.join(sweep.out_dir, "curves.png")  # every run's loss, as sparc plot
    curves = np.asarray(Image.open(report.files["curves"]).convert("RGB")).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28)):  # 4 runs
        assert (np.abs(curves - np.array(colour)).max(axis=-1) <= 12).sum() > 100, colour
    assert "![each run's loss against the step](curves.png)" in md


def test_interrupted_sweep_continues_where_it_stopped(tmp_path):
    out = str(tmp_path / "sw")
    args = dict(overrides=MICRO, out_dir=out)
    sweep = plan_sweep("sparc_tiny", ["sparsity_threshold=0,1/P,2/P"], **args)
    first = Counter(interrupt_run=2, at_step=2)  # Ctrl-C at step 2 of the second point
    outcome = run_sweep(sweep, train_fn=first, log=None)
    assert outcome.interrupted
    assert [point_state(p) for p in sweep.points] == ["done", "partial", "new"]
    assert first.calls == [p.run_dir for p in sweep.points[:2]]
    first_metrics = os.path.join(sweep.points[0].run_dir, "metrics.jsonl")
    done_mtime = os.stat(first_metrics).st_mtime_ns

    again = plan_sweep("sparc_tiny", ["sparsity_threshold=0,1/P,2/P"], **args)
    second = Counter()
    outcome = run_sweep(again, train_fn=second, log=None)
    assert not outcome.interrupted
    assert second.calls == [p.run_dir for p in again.points[1:]]  # the finished first point is not retrained
    assert second.results[0].resumed_from == 2 and second.results[1].resumed_from is None
    assert [point_state(p) for p in again.points] == ["done", "done", "done"]
    assert os.stat(first_metrics).st_mtime_ns == done_mtime
    assert [r["step"] for r in read_metrics(again.points[1].run_dir)] == [2, 4]


def test_a_failing_point_is_recorded_and_the_others_run(tmp_path):
    from sparc_kit.train import NonFiniteLossError

    sweep = plan_sweep("sparc_tiny", ["lambda_f=1,5"], overrides=MICRO, out_dir=str(tmp_path / "sw"))
    calls = []

    def fake(recipe, out_dir, progress=False):
        calls.append(recipe.loss.lambda_f)
        if recipe.loss.lambda_f == 1.0:
            raise NonFiniteLossError(3, float("nan"), 2)
        raise KeyboardInterrupt  # stands in for Ctrl-C between points

    outcome = run_sweep(sweep, train_fn=fake, log=None)
    assert calls == [1.0, 5.0]
    assert list(outcome.failed) == [sweep.points[0].run_dir]
    assert outcome.failed[sweep.points[0].run_dir].startswith("loss is nan at step 3")
    assert outcome.interrupted


def test_a_folder_holding_another_recipe_is_refused(done_sweep):
    sweep, _, _ = done_sweep
    with pytest.raises(AblationError) as info:
        plan_sweep(
            "sparc_tiny",
            ["sparsity_threshold=0,1/P"],
            seeds=2,
            overrides=[*sweep.overrides, "loss.lambda_g=0.7"],
            out_dir=sweep.out_dir,
        )
    assert len(info.value.problems) == 4
    assert "holds a run of another recipe (loss.lambda_g: 0.5 there, 0.7 here)" in info.value.problems[0]


# --------------------------------------------------------------------------------------------------------------
# the command


def test_dry_run_prints_the_grid_without_creating_run_folders(tmp_path):
    out = tmp_path / "sw"
    result = invoke("ablate", "--vary", "sparsity_threshold", "--seeds", "2", "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "recipe sparc_tiny: 5 grid points x 2 seed(s) = 10 runs of 600 steps" in text
    assert "loss.sparsity_threshold: 0, 0.0078125, 0.015625, 0.03125, 0.0625" in text
    assert "(P = 64 patches)" in text
    for value in ("0", "0.0078125", "0.015625", "0.03125", "0.0625"):
        for seed in (0, 1):
            assert os.path.join(str(out), f"sparsity_threshold={value}", f"seed={seed}") in text
    assert text.count(" new ") == 10
    assert not out.exists()


@pytest.mark.parametrize(
    "vary, message",
    [
        ("width", "error: --vary width: ambiguous, it matches model.vision.width, model.text.width"),
        ("lamda_f", "error: --vary lamda_f: unknown parameter of recipe sparc_tiny. Did you mean loss.lambda_f"),
        ("lambda_f=abc", "error: --vary lambda_f=abc: loss.lambda_f: got 'abc'"),
        ("lambda_g", "error: --vary loss.lambda_g: a float parameter has no default grid"),
        ("lambda_f=", "error: --vary lambda_f=: empty value"),
        ("train.seed=0,1", "error: --vary train.seed=0,1: use --seeds N"),
    ],
)
def test_bad_vary_exits_2_with_one_line(tmp_path, vary, message):
    result = invoke("ablate", "--vary", vary, "--out", str(tmp_path / "sw"), "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "sw").exists()


def test_command_on_a_finished_sweep_prints_the_report(done_sweep):
    sweep, _, _ = done_sweep
    sets = [x for o in sweep.overrides for x in ("--set", o)]
    result = invoke(
        "ablate", "sparc_tiny", "--vary", "sparsity_threshold=0,1/P", "--seeds", "2", *sets,
        "--out", sweep.out_dir, "--metric", "fine_loss", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 of 4 runs already finished; 0 to train" in result.stdout
    assert "| sparsity_threshold | runs | final_loss |" in result.stdout
    assert "Best by fine_loss (min; chosen with --metric): **sparsity_threshold=" in result.stdout
    assert "results.png" in result.stdout


@pytest.mark.slow
def test_jobs_run_points_as_parallel_train_processes(tmp_path):
    out = str(tmp_path / "sw")
    sweep = plan_sweep("sparc_tiny", ["weighting=sparse,dense"], overrides=MICRO, out_dir=out)
    outcome = run_sweep(sweep, jobs=2, log=None)
    assert not outcome.failed and len(outcome.trained) == 2
    for point in sweep.points:
        assert point_state(point) == "done"
        assert sparc_kit.load_recipe(os.path.join(point.run_dir, "recipe.yaml")).loss.weighting == point.labels[
            "weighting"
        ]



@pytest.mark.parametrize("names, varied, expected", [
    # an evaluation always wins, top-1 / R@1 first
    (["final_loss", "global_loss", "eval/val/t2i_R@5", "eval/zs/top1"], ["loss.lambda_f"], "eval/zs/top1"),
    (["final_loss", "eval/val/t2i_R@5"], ["loss.lambda_f"], "eval/val/t2i_R@5"),
    # lambda_f scales the total: the global term alone is compared
    (["final_loss", "global_loss", "fine_loss"], ["loss.lambda_f"], "global_loss"),
    (["final_loss", "global_loss"], ["loss.sparsity_threshold", "optim.lr"], "global_loss"),
    # nothing in the loss varies: the training loss itself is comparable
    (["final_loss"], ["optim.lr"], "final_loss"),
    # the global term itself, or the batch (log B), changes: nothing logged is comparable
    (["final_loss", "global_loss"], ["loss.global_loss"], None),
    (["final_loss", "global_loss"], ["train.batch_size"], None),
    (["final_loss"], ["loss.lambda_f"], None),
])
def test_the_default_ranking_metric_is_comparable_across_points(names, varied, expected):
    from sparc_kit.ablate import default_metric

    metric, why = default_metric(names, varied)
    assert metric == expected
    if expected is None:
        assert "--metric" in why and "eval" in why


def test_a_lambda_f_sweep_is_ranked_by_the_global_term_not_the_total(tmp_path):
    """final_loss = 0.5 * global + lambda_f * fine grows with lambda_f: ranking by it favours the smallest
    lambda_f whatever was learned. The report ranks by global_loss, says so, and the plot rings that point."""
    sweep = plan_sweep("sparc_tiny", ["lambda_f=1,10"], seeds=1, overrides=MICRO, out_dir=str(tmp_path / "sw"))
    run_sweep(sweep, train_fn=Counter(), log=None)
    last = {p.values["lambda_f"]: read_metrics(p.run_dir)[-1] for p in sweep.points}
    report = write_report(sweep)
    assert report.metric == "global_loss" and report.mode == "min"
    expected = min(last, key=lambda v: last[v]["global_loss"])
    assert float(report.best["values"]["lambda_f"]) == expected
    assert "global contrastive term" in report.markdown
    with open(report.files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_an_evaluators_declared_direction_decides_how_its_metric_ranks(tmp_path):
    """The direction of an evaluation's metric comes from its evaluator (``higher_is_better`` on the options
    model), not from the metric's name: an error rate named like an accuracy ranks low-is-best, and counts are
    never ranked. Entry names map to tasks through the recipe's eval: entries and RUN/eval/NAME.json."""
    import json
    from types import SimpleNamespace

    from sparc_kit.ablate.report import default_metric, default_mode, eval_tasks
    from sparc_kit.evaluate.spec import TASK_ARGS, EvalConfig, eval_entry
    from sparc_kit.registry import evaluators

    class ErrorOptions(EvalConfig):
        higher_is_better = False

    @evaluators.register("top1_error_rate", config=ErrorOptions, supplied=TASK_ARGS, override=True)
    def top1_error_rate(model, tokenizer, spec, transform=None):
        return {"top1_err": 0.5}, {}

    try:
        assert default_mode("eval/err/top1_err") == "max"  # what the name alone suggests: wrong here
        assert default_mode("eval/err/top1_err", {"err": "top1_error_rate"}) == "min"
        assert default_mode("eval/zs/top1", {"zs": "zeroshot"}) == "max"
        names = ["final_loss", "eval/err/top1_err"]
        assert default_metric(names, ["loss.lambda_f"], {"err": "top1_error_rate"})[0] is None  # not maximised
        run = tmp_path / "run"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "held_out.json").write_text(json.dumps({"task": "top1_error_rate", "metrics": {}}))
        recipe = SimpleNamespace(eval=[eval_entry({"task": "zeroshot", "data": "x.tar", "name": "zs"})])
        sweep = SimpleNamespace(recipe=recipe, points=[SimpleNamespace(recipe=None, run_dir=str(run))])
        assert eval_tasks(sweep) == {"zs": "zeroshot", "held_out": "top1_error_rate"}
    finally:
        evaluators._entries.pop("top1_error_rate", None)
        evaluators.version += 1
