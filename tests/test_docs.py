"""Every snippet of README.md and docs/*.md, as written, collected from the files (a new snippet is covered
without editing this test).

- ```python blocks run, each in a process of its own, in a working folder prepared with the files they name:
  ``recipes/``, a small trained run at ``runs/sparc_tiny`` (also as ``runs/sparc_cifar10`` and, with its DeepSpeed
  checkpoint, ``runs/x/checkpoints/step_00002000``), ``cat.jpg``, ``data/cifar10/test-000.tar``,
  ``data/coco/val5k.jsonl`` and ``shards/train-{000..009}.tar``, all tiny.
- ``sparc ...`` lines of ```bash blocks (also ``torchrun ... -m sparc_cli ...`` and the like) are parsed by the
  real typer/click app, so an unknown option or a missing argument fails; the recipes they name are validated
  with their ``--set`` overrides (and their ``--plugin`` / ``SPARC_PLUGINS`` plugins): a built-in name or a file
  of the working folder must load; a file of the user's own (``my.yaml``, not in the folder) is not checked.
  The cheap ones run (``recipes list|show|validate``, ``components``, ``--print-config``, ``--help``,
  ``ablate --dry-run``) and must succeed.
- ``$ sparc ...`` lines of other blocks are transcripts: the cheap ones, and those whose shown output is an
  ``error:``, run and must print what is shown (``...`` stands for any text).
- ```yaml blocks that are recipes or recipe fragments (top-level keys of a recipe) validate, a fragment on top of
  ``sparc_tiny``.

A block whose first line is a comment naming a file (``# my_loss.py``, ``# bad.yaml``) is also written into the
working folder under that name, for the other snippets and commands to use. A python block right after the line
``<!-- doc-test: imports only (REASON) -->`` is too costly to run (it trains for minutes): only its imports run.

Commands and snippets run in processes forked from one that imported the library once (``sparc_cli.main:main``,
the console script's function, with the command's argv), so each is isolated from the others without paying
for the imports each time.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NAMED_FILE = re.compile(r"^#\s*([\w.-]+\.(?:py|ya?ml))(?=[\s:]|$)")
IMPORTS_ONLY = re.compile(r"<!--\s*doc-test:\s*imports only\b.*?-->")
RECIPE_KEYS = {"extends", "name", "description", "model", "tokenizer", "loss", "data", "optim", "train", "engine",
               "eval"}
CHEAP = {("recipes", "list"), ("recipes", "show"), ("recipes", "validate"), ("components",)}
HELP = {"--help", "-h"}

# the trained run the snippets load: tiny, 2 steps (the same for every engine)
TINY_RUN = [
    "train.steps=2", "train.batch_size=8", "data.num_samples=64", "model.embed_dim=16",
    "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------------------------
# collecting


@dataclass
class Block:
    doc: str  # README.md, docs/cli.md
    line: int  # of the opening fence
    lang: str
    text: str
    imports_only: bool = False

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def filename(self) -> str | None:
        match = NAMED_FILE.match(self.text)
        return match.group(1) if match and self.lang in ("python", "yaml", "yml") else None


@dataclass
class Command:
    id: str  # DOC:LINE
    argv: list[str]  # after `sparc`
    env: dict[str, str]
    expected: str | None = None  # a transcript's shown output

    @property
    def cheap(self) -> bool:
        words = [a for a in self.argv if not a.startswith("-")]
        path = tuple(words[:2]) if words[:1] == ["recipes"] else tuple(words[:1])
        return (
            path in CHEAP
            or "--print-config" in self.argv
            or bool(HELP & set(self.argv))
            or (path == ("ablate",) and "--dry-run" in self.argv)
        )

    @property
    def runs(self) -> bool:
        return self.cheap or (self.expected is not None and self.expected.lstrip().startswith("error:"))


def collect_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            blocks.append(
                Block(
                    doc=str(path.relative_to(REPO)),
                    line=text.count("\n", 0, match.start()) + 1,
                    lang=match.group(1).lower(),
                    text=match.group(2),
                    imports_only=bool(IMPORTS_ONLY.search(before)),
                )
            )
    return blocks


def _segments(line: str) -> list[list[str]]:
    """Shell words of each command of a line (``&&``, ``;``, ``|`` separate; ``>`` and what follows go)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current, skip = [], [], False
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            out.append(current)
            current, skip = [], False
        elif token in (">", ">>", "2>", "<"):
            skip = True
        elif not skip:
            current.append(token)
    out.append(current)
    return [words for words in out if words]


def _sparc_argv(words: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """The argv after ``sparc`` of one shell command (``sparc ...``, ``torchrun ... -m sparc_cli ...``,
    ``deepspeed ... --module sparc_cli ...``), with its leading ``VAR=value`` assignments; None for others."""
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        return None
    if words[0] == "sparc":
        return words[1:], env
    for i, word in enumerate(words[:-1]):
        if word in ("-m", "--module") and words[i + 1] in ("sparc_cli", "sparc_cli.main"):
            return words[i + 2 :], env
    return None


def collect_commands(blocks: list[Block]) -> list[Command]:
    commands = []
    for block in blocks:
        if block.lang in ("bash", "sh", "shell"):
            pending, start = "", 0
            for offset, line in enumerate(block.text.splitlines()):
                start = start if pending else offset  # a command continued with a backslash keeps its first line
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line, pending = pending + line, ""
                for words in _segments(line):
                    found = _sparc_argv(words)
                    if found:
                        commands.append(Command(f"{block.doc}:{block.line + 1 + start}", found[0], found[1]))
        elif block.lang in ("", "console", "text"):
            lines = block.text.splitlines()
            for i, line in enumerate(lines):
                if not line.startswith("$ "):
                    continue
                rest = []
                for after in lines[i + 1 :]:
                    if after.startswith("$ "):
                        break
                    rest.append(after)
                for words in _segments(line[2:]):
                    found = _sparc_argv(words)
                    if found:
                        commands.append(
                            Command(f"{block.doc}:{block.line + 1 + i}", found[0], found[1], "\n".join(rest))
                        )
    return commands


BLOCKS = collect_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
COMMANDS = collect_commands(BLOCKS)
NAMED = {b.filename: b for b in BLOCKS if b.filename}
# YAML checked on its own: a named file that a command uses is checked by that command (with its plugins; or,
# in a transcript, against the errors it shows)
YAML = [b for b in BLOCKS if b.lang in ("yaml", "yml") and b.filename not in {a for c in COMMANDS for a in c.argv}]


# ---------------------------------------------------------------------------------------------------------------
# the driver: one process imports the library, then forks one process per snippet or command


def _start(job: dict, workdir: str, scratch: str) -> int:
    """Fork a child that runs ``job`` in ``workdir``, its stdout and stderr into one file (in the order a terminal
    would show them: every line is flushed); returns its pid."""
    out_file = os.path.join(scratch, f"{job['n']}.out")
    pid = os.fork()
    if pid:
        return pid
    code = 99  # the child: never returns
    try:
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(workdir)
        os.environ.update(job.get("env", {}))
        code = _child(job, os.path.join(scratch, f"{job['n']}.json"))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 98
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _collect(job: dict, status: int | str, scratch: str) -> dict:
    rc = status if isinstance(status, str) else os.waitstatus_to_exitcode(status)
    result = {"rc": rc, "output": Path(scratch, f"{job['n']}.out").read_text(errors="replace")}
    res_file = Path(scratch, f"{job['n']}.json")
    if res_file.exists():
        result.update(json.loads(res_file.read_text()))
    return result


def _run_all(jobs: list[dict], workdir: str, scratch: str, parallel: int = 2) -> dict:
    """Every job in a child of its own, ``parallel`` at a time; a job with ``first`` runs alone before the rest
    (and its ``then`` code after it)."""
    results: dict[str, dict] = {}
    pending = list(enumerate(jobs))
    running: dict[int, tuple[dict, float, float]] = {}  # pid -> (job, started, deadline)
    while pending or running:
        alone = any(job.get("first") for job, _, _ in running.values())
        while pending and len(running) < parallel and not alone:
            n, job = pending.pop(0)
            job["n"] = n
            if job.get("first") and running:
                pending.insert(0, (n, job))
                break
            started = time.monotonic()
            running[_start(job, workdir, scratch)] = (job, started, started + job.get("timeout", 90))
            alone = bool(job.get("first"))
        time.sleep(0.02)
        for pid, (job, started, deadline) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                done, status = pid, "timeout"
            if done:
                del running[pid]
                seconds = round(time.monotonic() - started, 2)
                results[job["key"]] = {**_collect(job, status, scratch), "seconds": seconds}
                if job.get("then"):  # a preparation of the working folder, after its job
                    exec(job["then"], {"workdir": workdir, "os": os, "shutil": shutil, "glob": glob})
    return results


def _child(job: dict, res_file: str) -> int:
    kind = job["kind"]
    if kind == "python":
        code = job["code"]
        if job.get("imports_only"):
            import ast

            tree = ast.parse(code)
            tree.body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
            code = ast.unparse(tree)
        exec(compile(code, job["id"], "exec"), {"__name__": "__main__"})
        return 0
    if kind == "run":  # the console script's own function, with the command's argv
        from sparc_cli.main import main

        sys.argv = ["sparc", *job["argv"]]
        main()
        return 0
    if kind == "check":
        Path(res_file).write_text(json.dumps(_check_command(job["argv"])))
        return 0
    if kind == "yaml":
        Path(res_file).write_text(json.dumps(_check_yaml(job["text"], job["id"])))
        return 0
    raise ValueError(kind)


def _check_command(argv: list[str]) -> dict:
    """Parse ``argv`` with the real app (nothing is invoked), load its plugins, validate the recipes it names."""
    import typer

    from sparc_cli.main import app

    # duck-typed: typer may bring its own copy of click, whose classes are not click's
    command = typer.main.get_command(app)
    chain, params = [], {}
    try:
        ctx = command.make_context("sparc", list(argv))
        params.update(ctx.params)
        args = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        while hasattr(ctx.command, "resolve_command") and args:  # a group: the next word is its command
            name, sub, rest = ctx.command.resolve_command(ctx, args)
            chain.append(name)
            ctx = sub.make_context(name, rest, parent=ctx)
            params.update(ctx.params)
            args = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if args:
            return {"parsed": False, "problem": f"unexpected extra arguments {args}", "chain": chain}
    except Exception as exc:
        if type(exc).__name__ in ("Exit", "NoArgsIsHelpError"):  # --help, or a group called bare: its help
            return {"parsed": True, "help": True, "chain": chain}
        if hasattr(exc, "format_message"):  # a usage error: unknown option, missing argument, bad value
            return {"parsed": False, "problem": exc.format_message(), "chain": chain}
        raise
    if not chain:
        return {"parsed": False, "problem": "no command", "chain": chain}

    from sparc_kit.config import RecipeError, builtin_recipes, load_recipe
    from sparc_kit.plugins import PluginError, ensure_plugins, load_plugins

    try:
        load_plugins(params.get("plugin") or [], export=True)
        ensure_plugins()
    except PluginError as exc:
        return {"parsed": True, "chain": chain, "problems": [str(exc)]}
    recipes: list[str] = []
    if chain[:1] == ["train"] or chain == ["recipes", "show"]:
        recipes = [params["recipe"]]
    elif chain == ["recipes", "validate"]:
        recipes = list(params["recipes"])
    elif chain[:1] == ["ablate"]:
        recipes = [params.get("recipe") or "sparc_tiny"]
    problems, checked, unchecked = [], [], []
    for recipe in recipes:
        own_file = "/" not in recipe and recipe.endswith((".yaml", ".yml")) and not os.path.exists(recipe)
        if own_file and recipe[: -len(".yaml")] not in builtin_recipes():
            unchecked.append(recipe)  # a user's own file (my.yaml), not one of this folder
            continue
        try:
            load_recipe(recipe, params.get("set_") or [])
            checked.append(recipe)
        except RecipeError as exc:
            problems += [f"{recipe}: {p}" for p in exc.problems]
    if chain[:1] == ["ablate"] and not problems and not unchecked:
        from sparc_kit.ablate import AblationError, plan_sweep

        try:
            plan_sweep(params.get("recipe"), params.get("vary") or [], seeds=params.get("seeds"),
                       overrides=params.get("set_") or [], out_dir=params.get("out"))
        except AblationError as exc:
            problems += exc.problems
    return {"parsed": True, "chain": chain, "problems": problems, "checked": checked, "unchecked": unchecked}


def _check_yaml(text: str, where: str) -> dict:
    import yaml

    from sparc_kit.config import RecipeError, load_recipe

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not set(data) <= RECIPE_KEYS:
        return {"recipe": False}
    if "extends" not in data and "model" not in data:
        data = {"extends": "sparc_tiny", **data}  # a fragment: on top of the default recipe
    path = f".fragment-{abs(hash(where))}.yaml"
    Path(path).write_text(yaml.safe_dump(data))
    try:
        load_recipe(path)
        return {"recipe": True, "problems": []}
    except RecipeError as exc:
        return {"recipe": True, "problems": exc.problems}


def _driver(jobs_file: str, results_file: str, workdir: str) -> None:
    import sparc_cli.main  # noqa: F401  (the imports every child shares)
    import sparc_kit  # noqa: F401
    import sparc_kit.evaluate  # noqa: F401
    import sparc_kit.train  # noqa: F401

    jobs = json.loads(Path(jobs_file).read_text())
    with tempfile.TemporaryDirectory(prefix="doc-driver-") as scratch:
        results = _run_all(jobs, workdir, scratch)
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    _driver(*sys.argv[1:4])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------------
# the tests


def _prepare(work: Path) -> None:
    """The files the snippets name, all tiny."""
    from conftest import DataGen

    png = DataGen.image_bytes
    shutil.copytree(REPO / "recipes", work / "recipes", ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    for name, block in NAMED.items():
        (work / name).write_text(block.text)
    (work / "cat.jpg").write_bytes(png(0, 48, "JPEG"))
    cifar = work / "data" / "cifar10"
    cifar.mkdir(parents=True)
    samples = [(f"{i:05d}", {"png": png(i, 16), "txt": CIFAR10[i % 10].encode()}) for i in range(20)]
    DataGen.write_shard(cifar / "test-000.tar", samples)
    (cifar / "classnames.txt").write_text("\n".join(CIFAR10) + "\n")
    coco = work / "data" / "coco"
    (coco / "val2014").mkdir(parents=True)
    with open(coco / "val5k.jsonl", "w") as f:
        for i in range(6):
            (coco / "val2014" / f"{i:03d}.png").write_bytes(png(100 + i, 16))
            f.write(json.dumps({"image": f"val2014/{i:03d}.png", "captions": [f"a {CIFAR10[i]}", f"one {CIFAR10[i]}"]}))
            f.write("\n")
    (work / "shards").mkdir()
    for s in range(10):
        samples = [(f"{s:03d}{j:03d}", {"png": png(s * 16 + j, 16), "txt": f"a {CIFAR10[j % 10]} number {j}".encode()})
                   for j in range(16)]
        DataGen.write_shard(work / "shards" / f"train-{s:03d}.tar", samples)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# after the trained run: the same run under the names the snippets use; the DeepSpeed one at the step they name
_COPY_RUNS = """
src = os.path.join(workdir, "runs", "sparc_tiny")
shutil.copytree(src, os.path.join(workdir, "runs", "sparc_cifar10"))
ckpt = os.path.join(workdir, "runs", "x", "checkpoints")
shutil.copytree(os.path.join(src, "checkpoints", "step_00000002"), os.path.join(ckpt, "step_00002000"))
"""


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("docs")
    _prepare(work)
    engine = ["--set", "engine.name=deepspeed"] if _has_deepspeed() else []
    sets = [a for s in TINY_RUN for a in ("--set", s)]
    jobs = [{"key": "prepare", "kind": "run", "argv": ["train", "sparc_tiny", *sets, *engine, "--out",
                                                      "runs/sparc_tiny", "--quiet"],
             "timeout": 240, "then": _COPY_RUNS, "first": True}]
    for block in PYTHON:
        jobs.append({"key": block.id, "id": block.id, "kind": "python", "code": block.text,
                     "imports_only": block.imports_only, "timeout": 120})
    for block in YAML:
        jobs.append({"key": block.id, "id": block.id, "kind": "yaml", "text": block.text})
    for command in COMMANDS:
        expanded = []
        for a in command.argv:
            matches = sorted(glob.glob(a, root_dir=work)) if any(c in a for c in "*?[") else []
            expanded += matches or [a]
        jobs.append({"key": "check " + command.id, "kind": "check", "argv": expanded, "env": command.env})
        if command.runs:
            jobs.append({"key": "run " + command.id, "kind": "run", "argv": expanded, "env": command.env})
    jobs_file, results_file = work / ".jobs.json", work / ".results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "SPARC_PLUGINS"}
    proc = subprocess.run([sys.executable, __file__, str(jobs_file), str(results_file), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(results_file.read_text())
    prepared = out["prepare"]
    assert prepared["rc"] == 0, prepared["output"][-3000:]
    return out


def test_the_snippets_are_collected():
    docs = {b.doc for b in BLOCKS}
    assert {"README.md", "docs/cli.md", "docs/recipes.md", "docs/evaluation.md"} <= docs
    assert len(PYTHON) >= 8 and len(COMMANDS) >= 40 and len(YAML) >= 5
    assert [c.argv[:2] for c in COMMANDS if c.id.startswith("README.md")][:1] == [["train", "recipes/sparc_tiny.yaml"]]
    named = [b.filename for b in BLOCKS if b.filename]
    assert len(named) == len(set(named)), "two snippets name the same file"


def test_command_lines_are_read_as_a_shell_reads_them():
    bash = Block("x.md", 10, "bash", (
        "pip install -e . && sparc train a.yaml --set 'data.urls=s/{0..1}.tar'   # a comment\n"
        "SPARC_PLUGINS=p.py sparc components loss > out.txt\n"
        "torchrun --nproc-per-node 2 -m sparc_cli train b \\\n  --set x=1\n"
        "#SBATCH --nodes=4\n"
        "sparc recipes show d\n"
    ))
    transcript = Block("x.md", 20, "", "$ sparc recipes validate c\nerror: c: bad\n... more\n$ sparc recipes list\n")
    got = [(c.id, c.argv, c.env, c.expected) for c in collect_commands([bash, transcript])]
    assert got == [
        ("x.md:11", ["train", "a.yaml", "--set", "data.urls=s/{0..1}.tar"], {}, None),
        ("x.md:12", ["components", "loss"], {"SPARC_PLUGINS": "p.py"}, None),
        ("x.md:13", ["train", "b", "--set", "x=1"], {}, None),
        ("x.md:16", ["recipes", "show", "d"], {}, None),
        ("x.md:21", ["recipes", "validate", "c"], {}, "error: c: bad\n... more"),
        ("x.md:24", ["recipes", "list"], {}, ""),
    ]
    assert _matches("error: c: bad\n... more", "error: c: bad\nanything at all\n and more  \n")
    assert not _matches("error: c: bad", "error: c: bad\nerror: another")


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_snippet_runs_as_written(results, block):
    result = results[block.id]
    if result["rc"] != 0 and not _has_deepspeed() and "deepspeed" in block.text.lower():
        pytest.skip("needs DeepSpeed (the test extra installs it)")
    assert result["rc"] == 0, f"{block.id} failed:\n{result['output'][-4000:]}"


@pytest.mark.parametrize("block", YAML, ids=[b.id for b in YAML])
def test_yaml_snippet_is_a_valid_recipe_or_fragment(results, block):
    result = results[block.id]
    assert result["rc"] == 0, result["output"][-3000:]
    if not result.get("recipe"):
        pytest.skip("not a recipe")
    assert result["problems"] == [], f"{block.id}:\n" + "\n".join(result["problems"])


def _matches(expected: str, actual: str) -> bool:
    """``actual`` is ``expected``, where ``...`` stands for any text (line ends' spaces ignored)."""
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip("\n").splitlines())  # noqa: E731
    pattern = ".*?".join(re.escape(part) for part in norm(expected).split("..."))
    return re.fullmatch(pattern, norm(actual), re.S) is not None


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_sparc_command_parses_and_its_recipe_validates(results, command):
    check = results["check " + command.id]
    shown = "sparc " + " ".join(command.argv)
    assert check["rc"] == 0, f"{command.id}: {shown}\n{check['output'][-3000:]}"
    assert check["parsed"], f"{command.id}: {shown}: {check['problem']}"
    expects_errors = bool(command.expected and command.expected.lstrip().startswith("error:"))
    if not expects_errors:
        assert check.get("problems", []) == [], f"{command.id}: {shown}:\n" + "\n".join(check["problems"])
    if not command.runs:
        return
    run = results["run " + command.id]
    if command.expected is not None:
        assert _matches(command.expected, run["output"]), (
            f"{command.id}: {shown} prints\n{run['output']}\nnot what the doc shows:\n{command.expected}"
        )
        assert (run["rc"] == 0) == (not expects_errors), (command.id, run["rc"])
    else:
        assert run["rc"] == 0, f"{command.id}: {shown}\n{run['output'][-3000:]}"
    assert "Traceback" not in run["output"]
