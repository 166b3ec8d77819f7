"""SIGKILL harness: a training run killed at random moments ends exactly where an uninterrupted one does.

    python tests/stress/sigkill.py --kills 20            # the figure in docs/reliability.md
    python tests/stress/sigkill.py --kills 5 --seed 3 --keep runs/sigkill

What it does:

1. trains a tiny recipe (the micro ``sparc_tiny`` of the training tests, ``train.log_every=1``,
   ``train.checkpoint_every=2``) once without interruption: the reference;
2. starts the same ``sparc train`` command (the installed console script) in a fresh folder and SIGKILLs its
   process group at a random moment, ``--kills`` times, each time starting the same command again; then lets the
   last start finish. The killed runs have ``SPARC_TEST_WRITE_DELAY`` set, which pauses inside every checkpoint
   write (after each file, between the rename and the ``latest`` pointer, before the pruning) and inside every
   metrics row (half the line written and flushed, then the rest), so a good share of the kills land inside a
   write; the pause changes no number;
3. asserts that the final checkpoint's ``model.safetensors`` holds tensors bit-identical to the reference's,
   that every line of ``metrics.jsonl`` is valid JSON, that it holds steps 1..N exactly once each with the
   reference's losses, and that no temporary checkpoint folder is left.

Where a kill landed is read from what it left behind, before the next start repairs it: a temporary
``.tmp-step_*`` folder that was not there before, a ``latest`` pointer behind the newest step folder or more step
folders than ``keep_checkpoints`` (``checkpoint write``); a last metrics line without its newline (``metrics
write``); neither, but no step logged since the start (``startup``: loading the checkpoint, repairing
metrics.jsonl); otherwise ``step`` (forward, backward, update, logging). Most kills come once the start has
logged a new step, after a random delay up to ``--max-delay``; every fifth (``startup``) comes at a random moment
up to 0.5 s after the start took the run folder's lock. Exit status 0 when everything held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import MICRO  # noqa: E402  (the micro sparc_tiny every training test uses)

PLACES = ("step", "checkpoint write", "metrics write", "startup")
KEEP = 2
WRITE_DELAY_ENV = "SPARC_TEST_WRITE_DELAY"


def train_command(out: str | os.PathLike, steps: int, *extra: str) -> list[str]:
    """The ``sparc train`` command line of the tiny recipe (the installed console script)."""
    sparc = shutil.which("sparc")
    if sparc is None:
        raise SystemExit("error: the `sparc` console script is not on PATH (pip install -e .)")
    sets = [*MICRO, f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=2",
            f"train.keep_checkpoints={KEEP}", *extra]
    return [sparc, "train", "sparc_tiny", *(a for s in sets for a in ("--set", s)), "--out", str(out), "--quiet"]


def child_env(write_delay: float = 0.0) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: the same arithmetic in every process
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SPARC_ERROR_DIR", WRITE_DELAY_ENV):
        env.pop(key, None)
    if write_delay:
        env[WRITE_DELAY_ENV] = str(write_delay)
    return env


# ---------------------------------------------------------------------------------------------------------------
# reading a run folder


def final_model_file(run: Path) -> Path:
    pointer = (run / "checkpoints" / "latest").read_text().strip()
    return run / "checkpoints" / pointer / "model.safetensors"


def weights_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's tensors, bit for bit: every tensor's name, dtype, shape and raw bytes in name
    order, and the metadata. Not of the file itself: safetensors writes its header's metadata keys in a random
    order, so two writes of the same tensors differ as files."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    digest = hashlib.sha256(json.dumps(header.pop("__metadata__", {}), sort_keys=True).encode())
    for name in sorted(header):
        entry = header[name]
        start, end = entry["data_offsets"]
        digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
        digest.update(body[start:end])
    return digest.hexdigest()


def strict_metrics(run: Path) -> list[dict]:
    """Every line of metrics.jsonl parsed; a line that is not valid JSON raises."""
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n"), "metrics.jsonl ends inside a line"
    return [json.loads(line) for line in text.splitlines()]


@dataclass
class Snapshot:
    """What a kill can leave behind in a run folder."""

    tmp: set  # (name, mtime) of temporary checkpoint folders
    steps: list  # complete step folders, ascending
    pointer: int | None  # the step ``latest`` names
    partial: bytes | None  # the unfinished last metrics line
    logged: int  # the newest step with a complete metrics line
    inode: int | None  # of metrics.jsonl: every start that resumes rewrites it (dropping rows past the checkpoint)

    @classmethod
    def of(cls, run: Path) -> "Snapshot":
        root = run / "checkpoints"
        tmp, steps, pointer = set(), [], None
        if root.is_dir():
            for d in root.iterdir():
                if d.name.startswith(".tmp-") and d.is_dir():
                    try:
                        tmp.add((d.name, d.stat().st_mtime_ns))
                    except FileNotFoundError:  # renamed into place (or removed) by the live run since iterdir
                        pass
                elif d.name.startswith("step_") and all(
                    (d / f).exists() for f in ("model.safetensors", "trainer.pt", "state.json")
                ):
                    steps.append(int(d.name[5:]))
            if (root / "latest").exists():
                name = (root / "latest").read_text().strip()
                pointer = int(name[5:]) if name.startswith("step_") else None
        steps.sort()
        try:
            with open(run / "metrics.jsonl", "rb") as f:
                data, inode = f.read(), os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            data, inode = b"", None
        lines = data.split(b"\n")
        partial = lines[-1] or None  # text after the last newline
        logged = 0
        for line in lines[:-1]:
            if line.strip():
                logged = max(logged, int(json.loads(line)["step"]))
        return cls(tmp, steps, pointer, partial, logged, inode)

    @property
    def resume_step(self) -> int:
        """The step a start resumes from (the trainer's own rule: the pointer if complete, else the newest)."""
        if self.pointer in self.steps:
            return self.pointer
        return self.steps[-1] if self.steps else 0


    def logged_since(self, before: "Snapshot") -> int:
        """The newest step this start logged itself (0: none yet). Rows a start did not write are the ones left
        by earlier starts, in a file it has not rewritten yet (a start without a checkpoint and without a metrics
        file writes a new one)."""
        if self.inode is None or self.inode == before.inode:
            return 0
        return self.logged if self.logged > before.resume_step else 0


    @property
    def stale_pointer(self) -> bool:
        return bool(self.steps) and self.pointer is not None and self.pointer < self.steps[-1]

    def publish_unfinished(self, before: "Snapshot") -> bool:
        """A save killed after its rename (``latest`` behind, or not pruned yet), and not the same state as
        ``before`` (which an earlier kill left)."""
        changed = (self.steps, self.pointer) != (before.steps, before.pointer)
        return changed and (self.stale_pointer or len(self.steps) > KEEP)


def where_it_landed(before: Snapshot, after: Snapshot) -> str:
    if after.tmp - before.tmp or after.publish_unfinished(before):
        return "checkpoint write"
    if after.partial is not None and (after.partial != before.partial or after.inode != before.inode):
        return "metrics write"
    return "step" if after.logged_since(before) else "startup"


# ---------------------------------------------------------------------------------------------------------------
# waiting for a moment to kill


def _wait(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.002)
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _metrics_tail(run: Path) -> tuple[int, bytes]:
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1))
            return size, f.read(1)
    except OSError:
        return 0, b""


def wait_for_moment(target: str, run: Path, before: Snapshot, proc: subprocess.Popen, rng: random.Random,
                    max_delay: float) -> bool:
    """Block until the moment to kill. ``random``: once the start has logged a step past its resume point, a
    random delay up to ``max_delay``. Aimed kills wait until the start has logged 3 steps past its resume point
    (so it has written a checkpoint of its own and the next start resumes from one), then for the start of a
    ``checkpoint write``, a ``metrics write``, or a ``step`` (just after the row of an odd step, whose next work is
    the following step's forward). False if the run ended first."""
    ckpt = run / "checkpoints"

    def logged_past(n: int):
        def check() -> bool:
            return _metrics_tail(run)[1] == b"\n" and Snapshot.of(run).logged_since(before) >= before.resume_step + n

        return check

    if target == "random":
        if not _wait(logged_past(1), proc, 120):
            return False
        time.sleep(rng.uniform(0, max_delay))
        return proc.poll() is None
    if not _wait(logged_past(3), proc, 120):
        return False
    if target == "checkpoint write":
        ok = _wait(lambda: ckpt.is_dir() and any(d.startswith(".tmp-step_") for d in os.listdir(ckpt)), proc, 120)
    elif target == "metrics write":
        ok = _wait(lambda: _metrics_tail(run)[1] not in (b"\n", b""), proc, 120)
    elif target == "step":
        ok = _wait(lambda: logged_past(3)() and Snapshot.of(run).logged % 2 == 1, proc, 120)
    else:
        raise ValueError(target)
    return ok and proc.poll() is None


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Kill:
    number: int
    target: str
    landed: str
    resumed_from: int  # the checkpoint the killed start had resumed from (0: a fresh start)
    evidence: str


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    starts: int = 0
    resumes: int = 0  # starts that resumed from a checkpoint
    finished_early: int = 0  # 1 when the run completed before its last kill (then fewer kills were made)
    identical: bool = False
    metrics_ok: bool = False
    leftovers: list[str] = field(default_factory=list)
    reference_sha: str = ""
    final_sha: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def landed(self) -> dict[str, int]:
        return {p: sum(k.landed == p for k in self.kills) for p in PLACES}

    @property
    def ok(self) -> bool:
        return self.identical and self.metrics_ok and not self.leftovers and not self.problems

    def table(self) -> str:
        lines = [f"{'kill':>4}  {'aimed at':<16} {'landed in':<16} {'resumed from':>12}  evidence"]
        for k in self.kills:
            lines.append(f"{k.number:>4}  {k.target:<16} {k.landed:<16} {k.resumed_from:>12}  {k.evidence}")
        landed = ", ".join(f"{p} {n}" for p, n in self.landed().items())
        lines += [
            "",
            f"kills: {len(self.kills)} ({landed}); starts: {self.starts}; resumes: {self.resumes}; "
            f"finished before the kill: {self.finished_early}",
            f"final weights identical to the uninterrupted run: {'yes' if self.identical else 'no'} "
            f"(sha256 {self.final_sha[:16]} vs {self.reference_sha[:16]})",
            f"metrics.jsonl: every step once, valid JSON, the reference's losses: {'yes' if self.metrics_ok else 'no'}",
            f"leftover temporary folders: {len(self.leftovers)}; {self.seconds:.0f} s",
        ]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _evidence(before: Snapshot, after: Snapshot) -> str:
    parts = []
    new_tmp = sorted(name for name, _ in after.tmp - before.tmp)
    if new_tmp:
        parts.append("tmp folder " + ",".join(new_tmp))
    if after.publish_unfinished(before):
        if after.stale_pointer:
            parts.append(f"latest={after.pointer} < step {after.steps[-1]}")
        if len(after.steps) > KEEP:
            parts.append(f"{len(after.steps)} step folders")
    if after.partial is not None and (after.partial != before.partial or after.inode != before.inode):
        parts.append(f"partial line of {len(after.partial)} bytes")
    if after.inode != before.inode and not after.logged_since(before):
        parts.append("metrics.jsonl repaired, no step yet")
    parts.append(f"logged to {after.logged}")
    return "; ".join(parts)


def reference_run(folder: Path, steps: int) -> Path:
    """The uninterrupted run (cached by step count inside ``folder``)."""
    out = folder / f"reference-{steps}"
    if not (out / "checkpoints" / "latest").exists():
        proc = subprocess.run(train_command(out, steps), env=child_env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the reference run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def run_harness(
    work: Path,
    *,
    kills: int,
    steps: int,
    seed: int = 0,
    targets: list[str] | None = None,
    max_delay: float = 0.4,
    write_delay: float = 0.03,
    startup_every: int = 5,
    log=None,
) -> Report:
    """Kill ``kills`` starts of one run and finish it; ``targets`` (cycled) aims each kill at a place instead of
    a random moment ("checkpoint write", "metrics write", "step", "random", "startup")."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    reference = reference_run(work, steps)
    run = work / f"killed-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    report = Report()
    cmd, env = train_command(run, steps), child_env(write_delay)
    while len(report.kills) < kills:
        before = Snapshot.of(run)
        report.starts += 1
        report.resumes += before.resume_step > 0
        number = len(report.kills) + 1
        target = targets[(number - 1) % len(targets)] if targets else (
            "startup" if number % startup_every == 0 else "random"
        )
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        if target == "startup":  # once it holds the run folder's lock: inside the resume and the repairs
            alive = _wait(lambda: _read(run / ".lock") == str(proc.pid), proc, 120)
            time.sleep(rng.uniform(0, 0.5))
            alive = alive and proc.poll() is None
        else:
            alive = wait_for_moment(target, run, before, proc, rng, max_delay)
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        if not alive:
            if proc.returncode != 0:
                report.problems.append(f"start {report.starts} failed ({proc.returncode}): {stderr.strip()[-500:]}")
                break
            report.finished_early += 1  # the run completed before its kill: too few steps for this many kills
            break
        after = Snapshot.of(run)
        kill = Kill(len(report.kills) + 1, target, where_it_landed(before, after), before.resume_step,
                    _evidence(before, after))
        report.kills.append(kill)
        if log:
            log(f"kill {kill.number}: {kill.landed} ({kill.evidence})")
    if not report.problems:
        before = Snapshot.of(run)
        report.starts += 1
        report.resumes += before.resume_step > 0
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)  # no pauses
        if proc.returncode != 0:
            report.problems.append(f"the last start failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    if not report.problems:
        report.reference_sha = weights_digest(final_model_file(reference))
        report.final_sha = weights_digest(final_model_file(run))
        report.identical = report.reference_sha == report.final_sha
        try:
            rows, expected = strict_metrics(run), strict_metrics(reference)
            report.metrics_ok = [r["step"] for r in rows] == list(range(1, steps + 1)) and [
                r["loss"] for r in rows
            ] == [r["loss"] for r in expected]
        except (AssertionError, ValueError) as exc:
            report.problems.append(f"metrics.jsonl: {exc}")
        report.leftovers = sorted(d for d in os.listdir(run / "checkpoints") if d.startswith(".tmp"))
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="steps of the run (default 30 + 4 per kill)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--max-delay", type=float, default=0.4, help="longest wait after a new step before a kill (s)")
    parser.add_argument("--write-delay", type=float, default=0.03, help="SPARC_TEST_WRITE_DELAY of the killed runs (s)")
    parser.add_argument("--keep", default=None, help="a folder for the runs, kept (default: a temporary one)")
    args = parser.parse_args(argv)
    steps = args.steps or 30 + 4 * args.kills
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sparc-sigkill-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_harness(work, kills=args.kills, steps=steps, seed=args.seed, max_delay=args.max_delay,
                             write_delay=args.write_delay, log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"SIGKILL harness: {steps} steps, seed {args.seed}, write delay {args.write_delay} s\n")
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
