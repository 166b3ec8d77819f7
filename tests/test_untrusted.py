"""Untrusted files: a torch file whose pickle would run code is refused, in one line, and never run.

What is checked, and why
------------------------
A ``.pt`` file is a pickle, and unpickling can call any function the file names. A run folder, a checkpoint or a
downloaded timm weights file may come from anyone, so each test plants a file whose pickle would create a marker
file (``open(marker, "w")``, or ``os.system("touch marker")``), first proves that it really does so when
loaded the unsafe way (``torch.load(weights_only=False)``, on a twin file with another marker), then checks that
every way sparc-kit reads it refuses it with one line naming the file and saying it is not a weights-only file,
and that the marker was not created:

- ``sparc_kit.pretrained.load_torch_file`` (the one function the package loads torch files with);
- the timm vision encoder's ``weights`` (local path and an fsspec URL), and ``sparc train`` with such a recipe
  (typer's CliRunner): exit 2, one ``error:`` line;
- resuming: ``sparc train`` (the real console script) on a run folder whose checkpoint's ``trainer.pt`` was
  replaced: a non-zero exit, one ``error:`` line, no traceback, no marker;
- ``load_pretrained`` on that run folder reads only ``model.safetensors`` (no pickle), so it loads, and the
  marker is still absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparc_kit
from sparc_cli.main import app
from sparc_kit.pretrained import WeightsFileError, load_pretrained, load_torch_file

TINY = [  # the smallest sparc_tiny that trains two steps in about a second
    "model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.width=16",
    "model.vision.depth=1", "model.vision.heads=2", "model.text.width=16", "model.text.depth=1",
    "model.text.heads=2", "data.num_samples=32", "train.batch_size=4", "train.steps=2", "train.log_every=1",
    "train.checkpoint_every=2", "optim.warmup_steps=1",
]


class OpensMarker:
    """Unpickling this calls ``open(path, "w")`` (pickled as ``io.open``), a global the weights-only unpickler
    does not allow."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    """Unpickling this runs ``touch path`` through ``os.system``: a module the weights-only unpickler blocks."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


SYSTEM = f"{os.system.__module__}.system"  # posix.system
PAYLOADS = {"io.open": OpensMarker, SYSTEM: RunsShell}


def plant(folder: Path, kind: str, name: str = "evil.pt", wrap=lambda x: {"state_dict": {"w": x}}) -> tuple[Path, Path]:
    """A torch file whose pickle creates ``folder/MARKER-<name>``; first proven to do so on a twin file."""
    payload = PAYLOADS[kind]
    twin, twin_marker = folder / f"twin-{name}", folder / f"MARKER-twin-{name}"
    torch.save(wrap(payload(str(twin_marker))), twin)
    torch.load(twin, weights_only=False)  # the unsafe way: the payload really runs
    assert twin_marker.exists(), "the planted pickle does not do what the test relies on"
    path, marker = folder / name, folder / f"MARKER-{name}"
    torch.save(wrap(payload(str(marker))), path)
    return path, marker


def refusal(name: str, kind: str) -> str:
    return (
        f"{name}: not a weights-only file (it would call {kind}); refused without running anything: only tensors, "
        "numbers, strings and containers are loaded (torch.load weights_only=True)"
    )


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_load_torch_file_refuses_a_pickle_that_runs_code(tmp_path, kind):
    path, marker = plant(tmp_path, kind)
    with pytest.raises(WeightsFileError) as info:
        load_torch_file(str(path))
    assert str(info.value) == refusal(str(path), kind)
    assert not marker.exists()
    # a plain state dict still loads, and a file that is not a torch file is one line too
    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    assert torch.equal(load_torch_file(str(tmp_path / "good.pt"))["w"], torch.ones(2))
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(WeightsFileError) as info:
        load_torch_file(str(tmp_path / "junk.pt"))
    assert str(info.value) == (
        f"{tmp_path / 'junk.pt'}: not a readable torch file (PytorchStreamReader failed reading zip archive: not a "
        "ZIP archive)"
    )


def _no_torch_load_without_weights_only():
    """Every torch.load in the package goes through load_torch_file (the one place that sets weights_only)."""
    root = Path(sparc_kit.__file__).parent
    calls = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "torch.load(" in line and "weights_only=True" not in line
    ]
    return calls


def test_every_torch_load_in_the_package_is_weights_only():
    assert _no_torch_load_without_weights_only() == []


# ------------------------------------------------------------------------------------------------------ timm
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_timm_weights_file_that_runs_code_is_refused(tmp_path, kind):
    from sparc_kit.models.timm_encoder import TimmVisionEncoder

    path, marker = plant(tmp_path, kind)
    with pytest.raises(WeightsFileError) as info:
        TimmVisionEncoder("test_vit", image_size=32, weights=str(path))
    assert str(info.value) == refusal(str(path), kind)
    assert not marker.exists()
    # the same file through an fsspec URL (read into memory first, then unpickled)
    import fsspec

    url = f"memory://untrusted/{tmp_path.name}/{kind}.pt"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    with pytest.raises(WeightsFileError) as info:
        TimmVisionEncoder("test_vit", image_size=32, weights=url)
    assert str(info.value) == refusal(url, kind)
    assert not marker.exists()


def test_sparc_train_with_untrusted_timm_weights_exits_2_in_one_line(tmp_path, monkeypatch):
    path, marker = plant(tmp_path, SYSTEM)
    monkeypatch.chdir(tmp_path)
    args = ["train", "sparc_tiny", "--out", str(tmp_path / "run"), "--quiet"]
    for item in [*TINY, "model.vision.name=timm", "model.vision.model_name=test_vit", "model.vision.image_size=32",
                 f"model.vision.weights={path}"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.splitlines() == [f"error: {refusal(str(path), SYSTEM)}"]
    assert "Traceback" not in result.output
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A finished two-step run whose checkpoint's trainer.pt was replaced by a pickle that runs code, with
    train.steps raised so that ``sparc train`` resumes it."""
    from sparc_kit.train import latest_checkpoint, train

    root = tmp_path_factory.mktemp("planted")
    run = root / "run"
    train(sparc_kit.load_recipe("sparc_tiny", TINY), str(run), progress=False)
    ckpt = Path(latest_checkpoint(str(run / "checkpoints")))
    trainer, marker = plant(root, "io.open", name="trainer.pt", wrap=lambda x: {"rng": x, "optimizer": {}})
    shutil.copy(trainer, ckpt / "trainer.pt")
    return run, ckpt, marker


@pytest.fixture(scope="module")
def resumed(planted_run) -> subprocess.CompletedProcess:
    """``sparc train`` (the console script) asked to continue the planted run to step 4."""
    run, _, _ = planted_run
    exe = shutil.which("sparc") or pytest.skip("the sparc console script is not installed")
    cmd = [exe, "train", "sparc_tiny", "--out", str(run), "--quiet"]
    for item in [*TINY, "train.steps=4"]:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=run.parent)


def test_resume_from_a_planted_trainer_pt_stops_in_one_line_without_running_it(planted_run, resumed):
    run, ckpt, marker = planted_run
    proc = resumed
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not marker.exists()


def test_resume_from_a_planted_trainer_pt_names_the_file(planted_run, resumed):
    run, ckpt, marker = planted_run
    proc = resumed
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {refusal(str(ckpt / 'trainer.pt'), 'io.open')}"]
    assert not marker.exists()


def test_load_pretrained_reads_no_pickle(planted_run):
    run, ckpt, marker = planted_run
    pretrained = load_pretrained(str(run))
    assert pretrained.step == 2 and pretrained.checkpoint == str(ckpt / "model.safetensors")
    assert not marker.exists()


@pytest.mark.timeout(300)
def test_resume_of_a_deepspeed_checkpoint_reads_its_files_weights_only(tmp_path):
    """DeepSpeed reads its own files with ``torch.load(weights_only=False)``; through the engine they are read
    weights-only: an untouched checkpoint resumes (DeepSpeed's plain-data classes are allowed), and a planted
    optimizer-state file is refused in one line naming it, before its pickle runs."""
    pytest.importorskip("deepspeed")
    from sparc_kit.train import latest_checkpoint, train

    sets = [*TINY, "engine.name=deepspeed", "engine.zero_stage=2"]
    clean = tmp_path / "clean"
    train(sparc_kit.load_recipe("sparc_tiny", sets), str(clean), progress=False)
    result = train(sparc_kit.load_recipe("sparc_tiny", [*sets, "train.steps=4"]), str(clean), progress=False)
    assert result.resumed_from == 2 and result.steps == 4

    run = tmp_path / "run"
    train(sparc_kit.load_recipe("sparc_tiny", sets), str(run), progress=False)
    ckpt = Path(latest_checkpoint(str(run / "checkpoints")))
    (target,) = list((ckpt / "deepspeed").rglob("*optim_states.pt"))
    evil, marker = plant(tmp_path, SYSTEM, name=target.name, wrap=lambda x: {"optimizer_state_dict": x})
    shutil.copy(evil, target)
    runner = CliRunner()
    cmd = ["train", "sparc_tiny", "--out", str(run), "--quiet"]
    for item in [*sets, "train.steps=4"]:
        cmd += ["--set", item]
    out = runner.invoke(app, cmd)
    assert out.exit_code == 2, out.output
    assert out.output.splitlines() == [f"error: {refusal(str(target), SYSTEM)}"]
    assert not marker.exists()
