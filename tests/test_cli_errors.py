"""How ``sparc`` reports failures, and how its commands are found.

- ``sparc_cli._errors.reported``, on a test app: a project error (``SparcError``) is its line(s) and exit 2; a
  ``RunError`` is exit 1; Ctrl-C is exit 130; any other error is exit 1 with one line naming the file that holds
  its traceback, never exit 2.
- ``sparc train`` in-process: a plain ``ValueError`` raised inside training (a loss whose forward fails) exits 1
  naming RUN/error.log, which holds the traceback; a recipe check at model build time (a ``RecipeError``) exits 2.
- The command modules: every module of the package but ``main`` and ``_*`` is a command, found without a list to
  edit, in ``ORDER``; ``sparc --help`` imports neither torch nor the library.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import sparc_cli
from sparc_cli._errors import fail, reported
from sparc_cli.main import app, command_modules
from sparc_kit.config import RecipeError
from sparc_kit.errors import RunError, SparcError
from test_train import MICRO


def _run(body) -> "typer.testing.Result":
    test_app = typer.Typer(pretty_exceptions_enable=False)

    @test_app.command()
    def go() -> None:
        with reported():
            body()

    @test_app.callback()
    def _root() -> None:
        """test app"""

    return CliRunner().invoke(test_app, ["go"])


def _raise(exc: BaseException):
    def body():
        raise exc

    return body


def test_a_project_error_is_its_lines_and_exit_2():
    result = _run(_raise(RecipeError(["train.steps: got 'x'", "loss.name: unknown loss 'spark'"], source="r.yaml")))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [
        "error: r.yaml: train.steps: got 'x'", "error: r.yaml: loss.name: unknown loss 'spark'"
    ]
    result = _run(_raise(SparcError("data.path: manifest not found: x.jsonl")))
    assert (result.exit_code, result.stderr) == (2, "error: data.path: manifest not found: x.jsonl\n")
    assert result.stdout == ""


def test_a_run_error_is_exit_1_and_ctrl_c_is_130():
    result = _run(_raise(RunError("loss is nan at step 3")))
    assert (result.exit_code, result.stderr) == (1, "error: loss is nan at step 3\n")
    result = _run(_raise(KeyboardInterrupt()))
    assert (result.exit_code, result.stderr) == (130, "interrupted\n")


def test_a_commands_own_exit_passes_through():
    result = _run(lambda: fail(["first", "second"], 1))
    assert (result.exit_code, result.stderr) == (1, "error: first\nerror: second\n")
    result = _run(_raise(typer.Exit(0)))
    assert (result.exit_code, result.stderr) == (0, "")


@pytest.mark.parametrize(
    "exc", [ValueError("bad shape [3, 4]\nmore"), TypeError("unexpected argument"), OSError(28, "No space left")]
)
def test_any_other_error_is_exit_1_naming_its_traceback_file(exc):
    result = _run(_raise(exc))
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.splitlines()
    first = str(exc).splitlines()[0]
    assert line.startswith(f"error: {type(exc).__name__}: {first} (traceback: ") and line.endswith(".log)")
    path = Path(line[line.index("(traceback: ") + len("(traceback: ") : -1])
    text = path.read_text()
    path.unlink()
    assert "Traceback (most recent call last):" in text and "in body" in text


def test_a_value_error_inside_training_exits_1_with_its_traceback_in_the_run_folder(tmp_path, monkeypatch):
    """A bug inside the package or a user's component (here the loss's forward) is not bad input: exit 1, one line
    naming RUN/error.log, not exit 2."""
    from sparc_kit.losses import SparcLoss

    def broken_forward(self, *args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(SparcLoss, "forward", broken_forward)
    out = tmp_path / "run"
    args = ["train", "sparc_tiny", "--out", str(out), "--quiet"]
    for item in [*MICRO, "train.steps=2"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, (result.output, result.exception)
    log = out / "error.log"
    assert result.stderr.splitlines() == [
        f"error: ValueError: operands could not be broadcast together (traceback: {log})"
    ]
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and "in broken_forward" in text
    assert text.rstrip().endswith("ValueError: operands could not be broadcast together")


def test_a_recipe_check_at_model_build_time_exits_2(tmp_path):
    args = ["train", "sparc_tiny", "--out", str(tmp_path / "run"), "--quiet"]
    for item in [*MICRO, "train.steps=2", "model.text_pooler.name=cls"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.splitlines() == [
        "error: model.text_pooler: 'cls' needs a class token and text towers have none (use mean or last)"
    ]
    assert not (tmp_path / "run" / "error.log").exists()


# ------------------------------------------------------------------------------------------------ the commands


def test_every_module_is_a_command_in_order():
    modules = command_modules()
    names = [m.__name__.rsplit(".", 1)[1] for m in modules]
    assert sorted(names) == [
        "ablate", "components", "data", "eval", "export", "plot", "recipes", "runs", "tokenizer", "train"
    ]
    assert [m.ORDER for m in modules] == sorted(m.ORDER for m in modules)
    shown = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    assert shown == [
        "train", "eval", "export", "ablate", "runs", "plot", "components", "recipes", "data", "tokenizer"
    ]


def test_a_new_command_is_one_new_file(tmp_path, monkeypatch):
    (tmp_path / "hello.py").write_text(textwrap.dedent('''
        import typer

        ORDER = 15


        def register(app):
            app.command("hello")(hello)


        def hello(name: str) -> None:
            """Say hello."""
            typer.echo(f"hello {name}")
    '''))
    monkeypatch.setattr(sparc_cli, "__path__", [*sparc_cli.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "sparc_cli.hello", raising=False)
    modules = command_modules()
    assert [m.__name__ for m in modules][:3] == ["sparc_cli.train", "sparc_cli.hello", "sparc_cli.eval"]
    new_app = typer.Typer()
    for module in modules:
        module.register(new_app)
    result = CliRunner().invoke(new_app, ["hello", "you"])
    assert (result.exit_code, result.stdout) == (0, "hello you\n")
    sys.modules.pop("sparc_cli.hello", None)


def test_help_imports_neither_torch_nor_the_library():
    script = (
        "import sys\nfrom sparc_cli.main import main\nsys.argv = ['sparc', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'sparc_kit') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPARC_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
