"""A user's own components: ``sparc --plugin FILE.py|MODULE``, ``SPARC_PLUGINS`` and the ``sparc_kit.plugins``
entry-point group; Python warnings as one ``warning:`` line.

Through the installed ``sparc`` console script in a temporary folder, as a user runs it: a loss defined in a
file of that folder trains (in the processes ``--nproc 2`` starts, which only learn of the plugin through
``SPARC_PLUGINS``), is listed by ``sparc components``, and without the plugin the recipe error names the loss and
``--plugin``. Plugins that cannot be imported are one line each (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparc_kit.config import RecipeError, load_recipe
from sparc_kit.plugins import PluginError, load_plugin

SPARC = shutil.which("sparc", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

OFFSET_LOSS = '''\
import warnings

import torch
from sparc_kit.losses import ClipLoss
from sparc_kit.registry import losses

warnings.warn("offset_loss is a test plugin:\\n  its loss is CLIP's plus a constant")


@losses.register("offset_clip")
class OffsetClipLoss(ClipLoss):
    """CLIP's loss plus a constant (a test plugin)."""

    def __init__(self, offset: float = 100.0):
        super().__init__()
        self.offset = offset

    def forward(self, image_embeds, text_embeds, logit_scale, **_):
        out = super().forward(image_embeds, text_embeds, logit_scale)
        return {**out, "loss": out["loss"] + self.offset, "offset": torch.tensor(self.offset)}
'''

PLUGIN_WARNING = "warning: offset_loss is a test plugin: its loss is CLIP's plus a constant"

# a tiny model and 3 steps; context_length 4 cuts every synthetic caption, so the loop warns about it
TINY = [
    "train.steps=3", "train.batch_size=8", "train.log_every=1", "data.num_samples=64", "model.embed_dim=16",
    "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "tokenizer.context_length=4",
]
UNKNOWN_OFFSET_CLIP = (
    "loss.name: unknown loss 'offset_clip'. Known: clip, filip, gloria, mgca, pacl, siglip, sparc. Your own loss? "
    "Load the module that registers it: sparc --plugin FILE.py or MODULE (in Python: import it)"
)


def sparc(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180):
    assert SPARC, "the sparc console script is not installed"
    full_env = {k: v for k, v in os.environ.items() if k != "SPARC_PLUGINS"}
    full_env.update(env or {})
    return subprocess.run(
        [SPARC, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def no_traceback(proc) -> None:
    for noise in ("Traceback", "UserWarning", "warnings.warn"):
        assert noise not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A user's folder: the plugin, a recipe that names its loss, and a plugin that fails to import."""
    root = tmp_path_factory.mktemp("user")
    (root / "offset_loss.py").write_text(OFFSET_LOSS)
    (root / "offset.yaml").write_text(
        "extends: sparc_tiny\nname: offset_tiny\nloss: {name: offset_clip, offset: 1000}\n"
    )
    (root / "broken.py").write_text("x = 1\ny = x / 0\n")
    return root


@pytest.fixture(scope="module")
def trained(folder):
    """``sparc --plugin offset_loss.py train offset.yaml --nproc 2`` (engine ddp): the two training processes are
    started by torch.distributed.run and know of the plugin only through SPARC_PLUGINS."""
    sets = [a for s in [*TINY, "engine.name=ddp"] for a in ("--set", s)]
    proc = sparc("--plugin", "offset_loss.py", "train", "offset.yaml", *sets, "--nproc", "2", "--out", "runs/o", "-q",
                 cwd=folder)
    return proc, folder / "runs" / "o"


def test_a_loss_from_a_file_trains_in_the_processes_the_command_starts(trained):
    proc, run = trained
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the plugin's loss, not CLIP's: its constant is in the optimised loss and its own diagnostic
        assert r["offset"] == 1000.0
        assert r["loss"] == pytest.approx(r["global_loss"] + 1000.0, abs=1e-3)
    assert "offset_clip" in (run / "recipe.yaml").read_text()


def test_warnings_are_one_line_each_on_stderr(trained):
    proc, _ = trained
    no_traceback(proc)
    lines = proc.stderr.splitlines()
    # the command and each of its two processes import the plugin (a multi-line warning, printed on one line);
    # the loop's tokenizer warning (a UserWarning from sparc_kit.train.loop) comes from the process of rank 0
    assert lines.count(PLUGIN_WARNING) == 3, lines
    cut = [line for line in lines if "longer than tokenizer.context_length=4" in line]
    assert len(cut) == 1 and cut[0].startswith("warning: 100% of the training captions are longer"), lines
    assert len(lines) == 4, lines


def test_without_the_plugin_the_error_names_the_loss_and_the_option(trained, folder):
    proc = sparc("train", "offset.yaml", cwd=folder)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: offset.yaml: {UNKNOWN_OFFSET_CLIP}"]
    # the trained run, loaded where the plugin is not imported (this test process): the same advice
    from sparc_kit import load_pretrained

    with pytest.raises(ValueError) as info:
        load_pretrained(str(trained[1]))
    assert str(info.value).endswith(UNKNOWN_OFFSET_CLIP)
    assert "recipe.yaml" in str(info.value)


def test_a_module_named_by_the_environment_and_an_entry_point_are_listed(folder, tmp_path):
    site = tmp_path / "site"  # an installed package with an entry point in group sparc_kit.plugins
    (site / "ep_losses").mkdir(parents=True)
    (site / "ep_losses" / "__init__.py").write_text(
        "from sparc_kit.losses import ClipLoss\nfrom sparc_kit.registry import losses\n\n"
        "@losses.register('ep_clip')\nclass EpClip(ClipLoss):\n    '''CLIP from an entry point.'''\n"
    )
    info = site / "ep_losses-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-losses\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sparc_kit.plugins]\nep = ep_losses\n")
    proc = sparc("components", "loss", cwd=folder, env={"SPARC_PLUGINS": "offset_loss", "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    assert "  offset_clip  CLIP's loss plus a constant (a test plugin).\n      offset: float = 100.0\n" in proc.stdout
    assert "  ep_clip  CLIP from an entry point.\n" in proc.stdout
    assert proc.stderr.splitlines() == [PLUGIN_WARNING]

    # the library loads entry points itself wherever recipes are read (no command involved)
    script = "import sparc_kit; print(sparc_kit.load_recipe('sparc_tiny', ['loss.name=ep_clip']).loss.name)"
    env = {k: v for k, v in os.environ.items() if k != "SPARC_PLUGINS"}
    lib = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)
    assert (lib.returncode, lib.stdout) == (0, "ep_clip\n"), lib.stderr


def test_a_plugin_that_fails_to_import_is_one_line(folder):
    proc = sparc("--plugin", "broken.py", "recipes", "list", cwd=folder)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: plugin broken.py: ZeroDivisionError: division by zero (broken.py, line 2)"
    ]


ACCEPTED = "expected a .py file, or a module importable from the current folder or the installed packages"


def test_plugin_errors_name_the_plugin_and_what_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PluginError) as info:
        load_plugin("missing_file.py")
    assert str(info.value) == f"plugin missing_file.py: file not found; {ACCEPTED} (my_pkg.my_loss)"
    with pytest.raises(PluginError) as info:
        load_plugin("no_such_module_here.sub")
    assert str(info.value) == (
        f"plugin no_such_module_here.sub: no module named 'no_such_module_here'; {ACCEPTED} (my_pkg.my_loss)"
    )
    (tmp_path / "syntax.py").write_text("def f(:\n    pass\n")
    with pytest.raises(PluginError) as info:
        load_plugin("syntax.py")
    assert str(info.value).startswith("plugin syntax.py: SyntaxError: ") and str(info.value).endswith(
        "(syntax.py, line 1)"
    )
    (tmp_path / "fails_inside.py").write_text("import json\n\njson.loads('{')\n")  # raised deep in json
    with pytest.raises(PluginError) as info:
        load_plugin("fails_inside")  # a module of the current folder, by name
    assert str(info.value).startswith("plugin fails_inside: JSONDecodeError: Expecting property name")
    assert str(info.value).endswith("(fails_inside.py, line 3)")  # the plugin's own line, not json's


def test_a_plugin_file_imports_once_and_is_exported_for_child_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARC_PLUGINS", raising=False)
    (tmp_path / "counter_plugin.py").write_text("import builtins\nbuiltins.__dict__.setdefault('_n_imports', [])"
                                                ".append(1)\n")
    import builtins

    from sparc_kit.plugins import load_plugins

    try:
        first = load_plugins(["counter_plugin.py"], export=True)
        again = load_plugins([str(tmp_path / "counter_plugin.py")], export=True)
        assert first[0] is again[0] and builtins._n_imports == [1]
        assert os.environ["SPARC_PLUGINS"] == str(tmp_path / "counter_plugin.py")  # absolute: found from anywhere
    finally:
        builtins.__dict__.pop("_n_imports", None)


def test_a_plugin_named_by_the_environment_that_fails_is_a_recipe_error(monkeypatch):
    monkeypatch.setenv("SPARC_PLUGINS", "no_such_plugin_module")
    with pytest.raises(RecipeError) as info:
        load_recipe("sparc_tiny")
    assert info.value.problems == [
        f"plugin no_such_plugin_module (from SPARC_PLUGINS): no module named 'no_such_plugin_module'; {ACCEPTED} "
        "(my_pkg.my_loss)"
    ]
