"""Zero-shot segmentation: the mIoU the evaluator computes against numbers worked out by hand on small masks
(a fake model whose patch and text embeddings are chosen, so every prediction is known), the mask's crop, the
manifest reader, the task's wiring (recipe entry, spec building, ``--task all``), and a run on CamVid when the
shared data is there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sparc_kit
from sparc_kit.data.transforms import center_crop, center_crop_mask
from sparc_kit.evaluate import EvalDataError, build_eval_specs, check_eval_data, eval_entry, run_evaluations
from sparc_kit.evaluate.data import detect_task, iter_segmentation_samples
from sparc_kit.evaluate.segmentation import segmentation_evaluate
from sparc_kit.evaluate.spec import PLANNED_TASKS, available_tasks
from sparc_kit.pretrained import load_pretrained
from sparc_kit.train import train

from test_evaluate import eval_app, micro_run  # noqa: F401  (fixtures)
from test_train import MICRO

CAMVID = Path(__file__).parents[1].parent / "shared" / "data" / "camvid"
NAMES = ["sky", "road", "car", "tree", "bus"]  # bus (4) is in no mask: it stays out of the mean

# Two 4 x 4 masks (255 = unlabelled) and, for each image, its 2 x 2 patches' embeddings over 5 dimensions; class
# c's text embedding is the c-th unit vector, so a patch's score for class c is its c-th entry. Each patch covers
# the 2 x 2 pixels under it (nearest upsampling from the patch grid to the mask).
MASKS = [
    np.array([[0, 0, 2, 2], [0, 255, 2, 1], [1, 1, 1, 1], [1, 1, 255, 1]], dtype=np.uint8),
    np.array([[0, 0, 0, 0], [0, 0, 3, 3], [1, 1, 3, 3], [1, 1, 1, 1]], dtype=np.uint8),  # no car; tree
]
PATCHES = [
    [[0.9, 0.1, 0.3, 0.0, 0], [0.1, 0.2, 0.95, 0.0, 0], [0.0, 0.8, 0.0, 0.9, 0], [0.0, 0.7, 0.6, 0.0, 0]],
    [[0.9, 0.0, 0.0, 0.1, 0], [0.8, 0.1, 0.99, 0.5, 0], [0.2, 0.9, 0.0, 0.3, 0], [0.1, 0.6, 0.0, 0.5, 0]],
]


class FakeTransform:
    """An 'image' is its index; the model looks its patches up. ``image_size`` is the mask's evaluation size."""

    image_size = 4

    def __call__(self, image: int) -> torch.Tensor:
        return torch.tensor([float(image)])


class FakeModel(torch.nn.Module):
    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor(PATCHES, dtype=torch.float32)[images[:, 0].long()]

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids[:, 0], len(NAMES)).float()


def fake_tokenizer(prompts):
    ids = torch.tensor([[NAMES.index(p)] for p in prompts])  # templates "label": the prompt is the class name
    return ids, torch.ones_like(ids, dtype=torch.bool)


def evaluate(open_vocabulary: bool, batch_size: int = 2):
    samples = [(i, m) for i, m in enumerate(MASKS)]
    return segmentation_evaluate(
        FakeModel(), fake_tokenizer, samples, NAMES, "label", ignore_index=255, open_vocabulary=open_vocabulary,
        batch_size=batch_size, transform=FakeTransform(),
    )


@pytest.mark.parametrize("batch_size", [1, 2])
def test_present_classes_miou_by_hand(batch_size):
    # Only the classes in each image's mask compete. Image 0 (sky, road, car): patches -> sky, car, road (tree's
    # 0.9 does not compete), road. Image 1 (sky, road, tree): sky, sky (car's 0.99 does not compete), road, road:
    # tree is never predicted. 30 scored pixels (2 ignored). Summed over both images:
    #   sky  TP 9, truth 9, predicted 11 -> 9 / 11
    #   road TP 13, truth 14, predicted 15 -> 13 / 16
    #   car  TP 3, truth 3, predicted 4 -> 3 / 4
    #   tree TP 0, truth 4, predicted 0 -> 0 (in the mean: it is in the ground truth)
    #   bus  in no mask: not in the mean
    metrics, per_class = evaluate(open_vocabulary=False, batch_size=batch_size)
    assert metrics["miou"] == pytest.approx((9 / 11 + 13 / 16 + 3 / 4 + 0) / 4)
    assert metrics["pixel_accuracy"] == pytest.approx(25 / 30)
    assert (metrics["n"], metrics["classes"]) == (2, 4)
    assert per_class == pytest.approx({"sky": 9 / 11, "road": 13 / 16, "car": 3 / 4, "tree": 0.0, "bus": None})


def test_open_vocabulary_miou_by_hand():
    # Every class competes: image 0's bottom-left patch becomes tree (0.9), image 1's top-right car (0.99).
    #   sky  TP 7, truth 9, predicted 7 -> 7 / 9
    #   road TP 9, truth 14, predicted 11 -> 9 / 16
    #   car  TP 3, truth 3, predicted 8 -> 3 / 8
    #   tree TP 0, truth 4, predicted 4 -> 0 / 8
    metrics, per_class = evaluate(open_vocabulary=True)
    assert metrics["miou"] == pytest.approx((7 / 9 + 9 / 16 + 3 / 8 + 0) / 4)
    assert metrics["pixel_accuracy"] == pytest.approx(19 / 30)
    assert metrics["classes"] == 4 and per_class["tree"] == 0.0 and per_class["bus"] is None


def test_a_mask_value_without_a_class_name_is_an_error_unless_ignored():
    mask = np.array([[0, 7], [1, 1]], dtype=np.uint8)

    class Half(FakeTransform):
        image_size = 2  # the fake model's 2 x 2 patches, one pixel each

    def run(ignore_index):
        return segmentation_evaluate(
            FakeModel(), fake_tokenizer, [(0, mask)], NAMES, "label", ignore_index=ignore_index,
            transform=Half(),
        )

    with pytest.raises(EvalDataError, match="^the mask of image 1 holds class index 7, but there are 5 class names.*ignore_index: 7$"):
        run(255)
    metrics, per_class = run(7)  # patches of image 0 among {sky, road}: sky, (ignored), road, road
    assert metrics["miou"] == 1.0 and metrics["pixel_accuracy"] == 1.0 and metrics["classes"] == 2


def test_mask_crop_matches_the_image_crop():
    # An 8 x 12 mask (value = 12 * row + column) to 4: NEAREST resize to 4 x 6 (rows 1, 3, 5, 7; columns 1, 3,
    # ..., 11), then the centre 4 columns (the crop box of center_crop: left (6 - 4) // 2 = 1).
    mask = (np.arange(8)[:, None] * 12 + np.arange(12)[None]).astype(np.uint8)
    expected = np.array([[12 * r + c for c in (3, 5, 7, 9)] for r in (1, 3, 5, 7)], dtype=np.uint8)
    assert np.array_equal(center_crop_mask(mask, 4), expected)
    assert np.array_equal(center_crop_mask(Image.fromarray(mask), 4), expected)
    # without a resize the box is the image's exactly (the image crop is not resampled either)
    small = (np.arange(5)[:, None] * 9 + np.arange(9)[None]).astype(np.uint8)
    image = center_crop(Image.fromarray(small).convert("RGB"), 5)
    assert np.array_equal(center_crop_mask(small, 5), np.asarray(image)[..., 0])
    with pytest.raises(ValueError, match="single-channel"):
        center_crop_mask(Image.new("RGB", (4, 4)), 4)


def write_set(folder: Path, masks=MASKS, size=(8, 8)) -> str:
    """A segmentation manifest of grey images and their masks (resized NEAREST to ``size``)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, mask in enumerate(masks):
        Image.new("RGB", size, (40 * i, 90, 160)).save(folder / "img" / f"{i}.png")
        Image.fromarray(mask).resize(size, Image.NEAREST).save(folder / "img" / f"{i}_mask.png")
        rows.append({"image": f"img/{i}.png", "mask": f"img/{i}_mask.png"})
    (folder / "seg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    return str(folder / "seg.jsonl")


def test_reader_task_detection_and_data_checks(tmp_path):
    path = write_set(tmp_path)
    samples = list(iter_segmentation_samples(path))
    assert len(samples) == 2 and samples[0][0].size == (8, 8)
    assert samples[1][1].dtype == np.uint8 and np.array_equal(samples[1][1][::2, ::2], MASKS[1])
    assert len(list(iter_segmentation_samples(path, max_samples=1))) == 1
    assert detect_task(path) == "segmentation"
    assert [s.task for s in build_eval_specs("all", [path])] == ["segmentation"]
    check_eval_data([{"task": "segmentation", "data": path}])  # classnames.txt beside it
    with pytest.raises(EvalDataError, match="class-name file not found"):
        check_eval_data([{"task": "segmentation", "data": path, "classnames": str(tmp_path / "none.txt")}])
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "0_mask.png")
    with pytest.raises(EvalDataError, match="single-channel"):
        list(iter_segmentation_samples(path))
    Image.new("L", (4, 8)).save(tmp_path / "img" / "0_mask.png")
    with pytest.raises(EvalDataError, match="mask is 4x8, its image 8x8"):
        list(iter_segmentation_samples(path))


def test_segmentation_is_an_available_task_with_its_options():
    assert "segmentation" in available_tasks() and PLANNED_TASKS == ()
    entry = eval_entry({"task": "segmentation", "data": "v.jsonl", "ignore_index": 11, "open_vocabulary": True})
    assert (entry.ignore_index, entry.open_vocabulary, entry.templates) == (11, True, "clip")
    assert eval_entry({"task": "segmentation", "data": "v.jsonl"}).ignore_index == 255
    with pytest.raises(ValueError, match="ignore_index"):
        eval_entry({"task": "segmentation", "data": "v.jsonl", "ignore_index": 256})
    with pytest.raises(ValueError, match="one manifest"):
        eval_entry({"task": "segmentation", "data": ["a.jsonl", "b.jsonl"]})
    with pytest.raises(ValueError, match="ignore_index"):  # not an option of zeroshot
        eval_entry({"task": "zeroshot", "data": "v.tar", "ignore_index": 11})


def test_eval_command_runs_segmentation(eval_app, micro_run, tmp_path):  # noqa: F811
    path = write_set(tmp_path, size=(48, 40))  # the eval view: resized to 38 x 32, centre 32 x 32
    result = eval_app(micro_run, "--task", "segmentation", "--data", path, "--templates", "label")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "miou" in result.stdout and "pixel_accuracy" in result.stdout
    saved = json.loads(Path(micro_run, "eval", "segmentation.json").read_text())
    assert saved["n"] == 2 and saved["metrics"]["classes"] == 4 and 0 <= saved["metrics"]["miou"] <= 1
    assert saved["settings"]["per_class_iou"]["bus"] is None and saved["settings"]["templates"] == ["{}"]


@pytest.fixture(scope="module")
def camvid_run(tmp_path_factory) -> str:
    if not (CAMVID / "val.jsonl").exists():
        pytest.skip(f"no CamVid evaluation set at {CAMVID} (the shared data folder is absent)")
    folder = tmp_path_factory.mktemp("camvid")
    recipe = sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2", "data.num_samples=16"])
    raw = yaml.safe_load(sparc_kit.dump_recipe(recipe))
    raw["eval"] = [
        {"task": "segmentation", "data": str(CAMVID / "val.jsonl"), "ignore_index": 11, "max_samples": 6}
    ]
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    out = str(folder / "run")
    train(sparc_kit.load_recipe(str(folder / "recipe.yaml")), out, progress=False)  # evaluates at the last step
    return out


def test_camvid_through_the_recipe_and_run_evaluations(camvid_run):
    rows = [json.loads(line) for line in Path(camvid_run, "metrics.jsonl").read_text().splitlines()]
    during = [r for r in rows if "eval/segmentation/miou" in r]
    assert during and 0 <= during[-1]["eval/segmentation/miou"] <= 1
    pretrained = load_pretrained(camvid_run)
    for open_vocabulary in (False, True):
        spec = {"task": "segmentation", "data": str(CAMVID / "val.jsonl"), "ignore_index": 11, "max_samples": 8,
                "open_vocabulary": open_vocabulary}
        (result,) = run_evaluations(pretrained, [spec], write=False)
        metrics, per_class = result.metrics, result.settings["per_class_iou"]
        assert result.n == 8 and 1 <= metrics["classes"] <= 11 and len(per_class) == 11
        assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pixel_accuracy"] <= 1
        scored = [v for v in per_class.values() if v is not None]
        assert len(scored) == metrics["classes"] and metrics["miou"] == pytest.approx(sum(scored) / len(scored))
    with pytest.raises(EvalDataError, match="val.jsonl: the mask of image 1 holds class index 11.*ignore_index: 11"):
        run_evaluations(pretrained, [{"task": "segmentation", "data": str(CAMVID / "val.jsonl"), "max_samples": 2}])


def test_camvid_through_the_eval_command(eval_app, camvid_run):  # noqa: F811
    result = eval_app(camvid_run, "--task", "segmentation", "--max-samples", "4")  # the recipe's eval: entry
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads(Path(camvid_run, "eval", "segmentation.json").read_text())
    assert saved["n"] == 4 and saved["settings"]["ignore_index"] == 11 and 0 <= saved["metrics"]["miou"] <= 1


def test_camvid_from_the_command_line_with_its_ignore_value(eval_app, camvid_run):  # noqa: F811
    """``--ignore-index 11`` makes CamVid's unlabelled pixels unscored from the command line alone (without it the
    value 11 has no class name and is refused in one line)."""
    data = str(CAMVID / "val.jsonl")
    result = eval_app(camvid_run, "--task", "segmentation", "--data", data, "--max-samples", "3", "--ignore-index", "11")
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads(Path(camvid_run, "eval", "segmentation.json").read_text())
    assert saved["n"] == 3 and saved["settings"]["ignore_index"] == 11 and 1 <= saved["metrics"]["classes"] <= 11
    refused = eval_app(camvid_run, "--task", "segmentation", "--data", data, "--max-samples", "3")
    assert refused.exit_code == 2 and "set ignore_index: 11" in refused.output
