"""A URL whose filesystem package is missing: one line naming the field and what to install, exit 2.

What is checked, and why
------------------------
fsspec imports a scheme's package (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``) only when a filesystem is
first opened, and raises an ``ImportError`` there: inside a data-loader worker, or while reading a recipe.

- Every scheme in fsspec's registry whose class lives in another package: with that package made unimportable
  (``sys.modules[package] = None``, fsspec's cache of loaded classes emptied for the scheme),
  ``check_url("<scheme>://bucket/x", "data.urls")`` raises ``FilesystemUnavailableError`` with exactly
  ``data.urls: <scheme>:// needs the <package> package (<fsspec's own message>)``, or, for the packages with an
  extra, ``pip install "sparc-kit[s3]"`` / ``[gcs]``; a scheme fsspec implements itself but whose dependency is
  missing (``http://`` without aiohttp) and an unknown scheme are one line too; local paths always pass.
- The real ``sparc`` console script with a ``s3fs`` that cannot be imported (a package of that name on
  ``PYTHONPATH`` that raises ``ImportError``, as an uninstalled one does): ``sparc train`` on webdataset shards at
  ``s3://`` exits 2 with exactly the one expected line and no traceback, before the run folder holds anything but
  its lock. In-process (CliRunner, ``s3fs`` and ``gcsfs`` hidden in ``sys.modules``): ``sparc train`` on a
  manifest whose images are at ``s3://``, with ``tokenizer.path`` at ``gs://``, a recipe at ``gs://``,
  ``sparc data inspect`` and ``sparc data convert``, each exactly one line and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from fsspec.registry import known_implementations

from sparc_kit.data.filesystems import FilesystemUnavailableError, check_url

EXTRA_LINE = 'data.urls: {p}:// needs the {pkg} package: pip install "sparc-kit[{extra}]"'
EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}
THIRD_PARTY = sorted(
    (p, e["class"].split(".")[0]) for p, e in known_implementations.items() if not e["class"].startswith("fsspec.")
)


def _hide(monkeypatch, protocol: str, *modules: str) -> None:
    registry = sys.modules["fsspec.registry"]  # the module (`fsspec.registry` is also the name of a mapping)
    monkeypatch.delitem(registry._registry, protocol, raising=False)  # the classes fsspec already loaded
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


@pytest.mark.parametrize("protocol,package", THIRD_PARTY)
def test_every_third_party_scheme_without_its_package_is_one_line(monkeypatch, protocol, package):
    _hide(monkeypatch, protocol, package)
    with pytest.raises(FilesystemUnavailableError) as info:
        check_url(f"{protocol}://bucket/x.tar", "data.urls")
    if package in EXTRAS:
        expected = EXTRA_LINE.format(p=protocol, pkg=package, extra=EXTRAS[package])
    else:
        expected = f"data.urls: {protocol}:// needs the {package} package ({known_implementations[protocol]['err']})"
    assert str(info.value) == expected


def test_the_extras_cover_s3_and_gcs():
    assert {p for p, pkg in THIRD_PARTY if pkg in EXTRAS} >= {"s3", "s3a", "gs", "gcs"}
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [d.split(">")[0] for d in extras["s3"]] == ["s3fs"] and [d.split(">")[0] for d in extras["gcs"]] == ["gcsfs"]


def test_fsspec_scheme_with_a_missing_dependency_unknown_scheme_and_local_paths(monkeypatch):
    _hide(monkeypatch, "https", "aiohttp", "fsspec.implementations.http")
    with pytest.raises(FilesystemUnavailableError) as info:
        check_url("https://example.org/x.tar", "data.urls")
    assert str(info.value) == (
        'data.urls: https:// needs a package that is not installed (HTTPFileSystem requires "requests" and '
        '"aiohttp" to be installed)'
    )
    with pytest.raises(FilesystemUnavailableError) as info:
        check_url("nosuch://bucket/x.tar", "tokenizer.path")
    assert str(info.value) == (
        "tokenizer.path: unknown URL scheme nosuch://; fsspec knows s3://, gs://, az://, hf://, https://, memory:// "
        "and more (fsspec.available_protocols())"
    )
    for local in ("shards/x.tar", "/abs/x.tar", "file:///abs/x.tar", "memory://x/y.tar"):
        check_url(local, "data.urls")  # nothing to install


# --------------------------------------------------------------------------------------- the console script
@pytest.fixture(scope="module")
def hidden(tmp_path_factory):
    """A folder for PYTHONPATH in which ``s3fs`` and ``gcsfs`` cannot be imported."""
    root = tmp_path_factory.mktemp("hidden")
    for name in ("s3fs", "gcsfs"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f'raise ImportError("No module named {name!r} (hidden by the test)")\n')
    return root


TINY = ["model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.width=16",
        "model.vision.depth=1", "model.vision.heads=2", "model.text.width=16", "model.text.depth=1",
        "model.text.heads=2", "train.batch_size=4", "train.steps=2"]


def _sparc(hidden, cwd, *args: str, sets: list[str] = ()) -> subprocess.CompletedProcess:
    exe = shutil.which("sparc") or pytest.skip("the sparc console script is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    cmd = [exe, *args]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _one_line_exit_2(proc, line: str) -> None:
    assert "Traceback" not in proc.stderr and "ImportError" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {line}"]
    assert proc.returncode == 2


def test_console_script_without_s3fs(hidden, tmp_path):
    """The real console script, as a shell runs it: webdataset shards at s3:// without s3fs."""
    proc = _sparc(hidden, tmp_path, "train", "sparc_tiny", "--out", "run", "--quiet",
                  sets=[*TINY, "data.name=webdataset", "data.urls=s3://bucket/train-{000..003}.tar"])
    _one_line_exit_2(proc, EXTRA_LINE.format(p="s3", pkg="s3fs", extra="s3"))
    assert os.listdir(tmp_path / "run") == [".lock"]  # refused when the dataset is built: nothing written yet


@pytest.fixture
def no_s3fs_nor_gcsfs(monkeypatch):
    for protocol, package in (("s3", "s3fs"), ("s3a", "s3fs"), ("gs", "gcsfs"), ("gcs", "gcsfs")):
        _hide(monkeypatch, protocol, package)


def test_every_command_without_s3fs_or_gcsfs(no_s3fs_nor_gcsfs, tmp_path, monkeypatch, datagen):
    """The same through typer's CliRunner (in-process, the packages hidden in sys.modules): a manifest whose
    images are on S3, a tokenizer and a recipe on Google Storage, `sparc data inspect` and `convert`."""
    from typer.testing import CliRunner

    from sparc_cli.main import app

    monkeypatch.chdir(tmp_path)

    def run(*args: str, sets=()):
        for item in sets:
            args += ("--set", item)
        result = CliRunner().invoke(app, list(args))
        assert "Traceback" not in result.output and "ImportError" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return result.exit_code, result.stderr.splitlines()

    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"image": f"s3://bucket/img/{i}.png", "caption": f"c {i}"}) + "\n" for i in range(4))
    )
    assert run("train", "sparc_tiny", "--out", "run2", "--quiet",
               sets=[*TINY, "data.name=manifest", "data.path=pairs.jsonl"]) == (2, [
        'error: data.path (the images pairs.jsonl lists): s3:// needs the s3fs package: pip install "sparc-kit[s3]"'
    ])
    assert run("train", "sparc_tiny", "--out", "run3", "--quiet",
               sets=[*TINY, "data.num_samples=16", "tokenizer.path=gs://bucket/tok.model"]) == (2, [
        'error: tokenizer.path: gs:// needs the gcsfs package: pip install "sparc-kit[gcs]"'
    ])
    assert run("recipes", "validate", "gs://bucket/recipe.yaml") == (2, [
        'error: gs://bucket/recipe.yaml: recipe: gs:// needs the gcsfs package: pip install "sparc-kit[gcs]"'
    ])
    assert run("data", "inspect", "s3://bucket/train-{000..001}.tar") == (2, [
        'error: data.urls: s3:// needs the s3fs package: pip install "sparc-kit[s3]"'
    ])
    datagen.manifest(tmp_path / "m", n=2)
    assert run("data", "convert", str(tmp_path / "m" / "pairs.jsonl"), "s3://bucket/o-%03d.tar") == (2, [
        'error: OUT_PATTERN: s3:// needs the s3fs package: pip install "sparc-kit[s3]"'
    ])
