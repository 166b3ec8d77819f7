"""train.loggers: metrics.jsonl (always), TensorBoard (read back with tensorboard's own reader: every metric of
metrics.jsonl at the same steps with the same values, the probe's heat maps as images, resume without duplicate
steps) and wandb (a fake module that records what the logger sends; no network)."""

from __future__ import annotations

import io
import math
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

import sparc_kit
from sparc_kit.errors import RecipeError
from sparc_kit.train import read_metrics, train

from test_train import Interrupt, _synthetic_retrieval_manifest, micro_recipe  # noqa: E402

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(run_dir: str):
    acc = event_accumulator.EventAccumulator(
        os.path.join(run_dir, "tensorboard"), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    return acc


def numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def assert_events_match_metrics(run_dir: str) -> None:
    """Every number of every metrics.jsonl row is a scalar of the same tag at the same step with the same value
    (float32), each step once, and no scalar is anything else."""
    acc, rows = read_events(run_dir), read_metrics(run_dir)
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in numbers(row).items():
            expected.setdefault(key, {})[row["step"]] = value
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(by_step), tag  # the same steps, each once, in order
        for e in events:
            want = np.float32(by_step[e.step])
            assert e.value == pytest.approx(float(want), rel=1e-6, abs=1e-30), (tag, e.step)


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    manifest = _synthetic_retrieval_manifest(root / "val")
    recipe = sparc_kit.load_recipe({
        **micro_recipe("train.steps=6", "train.loggers=[tensorboard]").model_dump(mode="json"),
        "eval": [{"task": "retrieval", "data": manifest, "every": 3}],
    })
    out = str(root / "run")
    train(recipe, out, progress=False)
    return out


def test_tensorboard_holds_every_metric_of_metrics_jsonl_at_the_same_steps(tensorboard_run):
    rows = read_metrics(tensorboard_run)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log_every 2, evaluations at 3 and 6
    assert {"loss", "lr", "grad_norm", "eval/retrieval/i2t_R@1"} <= set(numbers(rows[-1]))
    assert_events_match_metrics(tensorboard_run)
    lr = {e.step: e.value for e in read_events(tensorboard_run).Scalars("lr")}
    assert lr[6] == pytest.approx(float(np.float32(rows[-1]["lr"])))


def test_tensorboard_shows_the_probe_heat_maps_at_the_evaluation_steps(tensorboard_run):
    """The first training sample's caption, one weights and one similarity image per token, at steps 3 and 6;
    the images are the drawn overlays (224 x 224, many colours), and they change as the model trains."""
    acc = read_events(tensorboard_run)
    tags = acc.Tags()["images"]
    weights = sorted(t for t in tags if t.startswith("heatmaps/weights/"))
    similarity = sorted(t for t in tags if t.startswith("heatmaps/similarity/"))
    caption = sparc_kit.build_dataset(micro_recipe())[0]["caption"]
    assert len(weights) == len(similarity) >= len(caption.split())
    assert set(tags) == set(weights) | set(similarity)
    for tag in tags:
        assert [e.step for e in acc.Images(tag)] == [3, 6]
    first, last = (np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
                   for e in acc.Images(similarity[0]))
    assert first.shape == (224, 224, 3)
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 20
    assert not np.array_equal(first, last)


def test_a_resumed_run_shows_each_step_once_with_the_values_of_metrics_jsonl(tmp_path):
    """A run stopped by a failure after step 6 (checkpoint at 4; rows of 2, 4, 6 logged) resumes from step 4: the
    row of step 6 is trained and logged again, and TensorBoard shows it once (purge_step), as metrics.jsonl does."""
    out = str(tmp_path / "run")
    recipe = micro_recipe("train.steps=8", "train.loggers=[tensorboard]")
    with pytest.raises(RuntimeError):
        train(recipe, out, progress=False, callback=Interrupt(6, RuntimeError("crash")))
    assert [r["step"] for r in read_metrics(out)] == [2, 4, 6]
    assert [e.step for e in read_events(out).Scalars("loss")] == [2, 4, 6]
    resumed = train(recipe, out, progress=False)
    assert resumed.resumed_from == 4
    assert [r["step"] for r in read_metrics(out)] == [2, 4, 6, 8]
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 2  # a new event file per start
    assert_events_match_metrics(out)


def test_unknown_logger_is_one_recipe_line_naming_the_field():
    with pytest.raises(RecipeError) as info:
        micro_recipe("train.loggers=[tensorbord]")
    assert info.value.problems == [
        "train.loggers: got ['tensorbord']; unknown logger 'tensorbord'. Did you mean 'tensorboard'? "
        "Known: jsonl, tensorboard, wandb"
    ]


def test_jsonl_is_always_on_and_listed_once():
    assert micro_recipe().train.loggers == ["jsonl"]
    assert micro_recipe("train.loggers=[tensorboard, jsonl, tensorboard]").train.loggers == ["jsonl", "tensorboard"]
    assert micro_recipe("train.loggers=[]").train.loggers == ["jsonl"]


def test_wandb_not_installed_is_refused_before_the_run_folder_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec says missing
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else _find(name, *a))
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        train(micro_recipe("train.steps=2", "train.loggers=[wandb]"), str(out), progress=False)
    assert info.value.problems == [
        "train.loggers: 'wandb' is listed but the wandb package is not installed; pip install 'sparc-kit[wandb]', "
        "or take it out of train.loggers"
    ]
    assert not out.exists()


_find = __import__("importlib.util").util.find_spec


class FakeWandb(types.ModuleType):
    """What the logger calls, recorded: init's arguments, each log(values, step), finish."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = types.SimpleNamespace(name="wandb")
        self.inits, self.logged, self.finished = [], [], 0
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        self.Run = Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()

    class Image:
        def __init__(self, pixels):
            self.pixels = pixels


def test_wandb_gets_the_metrics_of_metrics_jsonl_and_the_heat_maps(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: fake.__spec__ if name == "wandb" else _find(name, *a))
    out = str(tmp_path / "run")
    train(micro_recipe("train.steps=4", "train.loggers=[wandb]"), out, progress=False)
    scalars = {step: values for step, values in fake.logged if not any(k.startswith("heatmaps/") for k in values)}
    images = [(step, values) for step, values in fake.logged if all(k.startswith("heatmaps/") for k in values)]
    rows = read_metrics(out)
    assert sorted(scalars) == [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert scalars[row["step"]] == {k: float(v) for k, v in numbers(row).items() if math.isfinite(v)}
    assert [step for step, _ in images] == [4]  # no eval: entry, so at the checkpoint steps (every 4, the last)
    assert all(isinstance(v, fake.Image) and v.pixels.dtype == np.uint8 for v in images[0][1].values())
    assert fake.finished == 1
    (init,) = fake.inits
    assert init["resume"] == "allow" and init["dir"] == out and init["config"]["train"]["loggers"] == ["jsonl", "wandb"]
    run_id = init["id"]
    train(micro_recipe("train.steps=6", "train.loggers=[wandb]"), out, progress=False)  # resumes: the same wandb run
    assert fake.inits[1]["id"] == run_id


def test_a_probe_image_that_cannot_be_read_names_the_field(tmp_path):
    out = tmp_path / "run"
    recipe = micro_recipe("train.steps=2", "train.loggers=[tensorboard]",
                          f"train.probe={{image: {tmp_path / 'missing.png'}, text: a red circle}}")
    with pytest.raises(RecipeError) as info:
        train(recipe, str(out), progress=False)
    (line,) = info.value.problems
    assert line.startswith("train.probe.image: ") and "missing.png: cannot read the image" in line
    assert not (out / "recipe.yaml").exists()


def test_a_probe_of_ones_own_image_and_caption(tmp_path):
    """train.probe's image and text are what the heat maps show: one pair of images per token of the text (here
one; sparc_tiny's captions leave the end token out)."""
    image = tmp_path / "probe.png"
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3))).save(image)
    out = str(tmp_path / "run")
    recipe = micro_recipe("train.steps=2", "train.loggers=[tensorboard]", f"train.probe={{image: {image}, text: red}}")
    train(recipe, out, progress=False)
    acc = read_events(out)
    assert sorted(acc.Tags()["images"]) == ["heatmaps/similarity/00_red", "heatmaps/weights/00_red"]
    shown = np.asarray(Image.open(io.BytesIO(acc.Images("heatmaps/weights/00_red")[-1].encoded_image_string)))
    assert shown.shape[:2] == (224, 224)


def test_the_loggers_change_nothing_the_run_trains(tmp_path):
    """Heat maps drawn at the checkpoint steps (eval mode, no gradient, the training RNG untouched) leave the
    weights and the logged losses of a run exactly those of a run with metrics.jsonl alone."""
    from test_train import assert_same_weights, weights

    plain, logged = str(tmp_path / "plain"), str(tmp_path / "logged")
    train(micro_recipe("train.steps=8"), plain, progress=False)
    train(micro_recipe("train.steps=8", "train.loggers=[tensorboard]"), logged, progress=False)
    assert [e.step for e in read_events(logged).Images(read_events(logged).Tags()["images"][0])] == [4, 8]
    assert_same_weights(weights(plain), weights(logged))
    assert [r["loss"] for r in read_metrics(plain)] == [r["loss"] for r in read_metrics(logged)]


@pytest.mark.slow
def test_only_rank_zero_writes_the_event_file_of_a_two_process_run(tmp_path):
    from test_distributed import CLI_MICRO, sparc

    out = tmp_path / "run"
    result = sparc("train", "sparc_tiny", *CLI_MICRO, "--set", "train.steps=4", "--set", "engine.name=ddp",
                   "--set", "train.loggers=[tensorboard]", "--nproc", "2", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(out / "tensorboard")) == 1
    assert_events_match_metrics(str(out))
    acc = read_events(str(out))
    assert [e.step for e in acc.Images(acc.Tags()["images"][0])] == [4]


def test_a_streaming_dataset_gives_its_first_sample_as_the_probe(tmp_path, datagen):
    """webdataset (an IterableDataset): the probe is the stream's first readable sample, read once in-process
    before training; the run then trains and logs as usual."""
    from sparc_kit.loggers import read_probe

    pattern, _ = datagen.shards(tmp_path / "s", n_shards=2, per_shard=6, size=32)
    recipe = micro_recipe("data.name=webdataset", f"data.urls={pattern}", "data.shuffle_buffer=0",
                          "train.steps=2", "train.loggers=[tensorboard]", "tokenizer.vocab_size=64")
    dataset = sparc_kit.build_dataset(recipe)
    probe = read_probe(recipe, dataset)
    first = next(iter(dataset))
    assert probe.text == first["caption"] and bool((probe.image == first["image"]).all())
    out = str(tmp_path / "run")
    train(recipe, out, progress=False)
    assert_events_match_metrics(out)
    assert read_events(out).Tags()["images"]
