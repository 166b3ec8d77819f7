"""Ctrl-C before the first step of ``sparc train`` (the data set, the tokenizer, the model and the engine are being
built): exit 130 at once with one line saying nothing new was saved, not a silent exit or a traceback.

Interrupts inside the training loop (the step finishes and is saved) are tested in tests/test_faults.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

SPARC = shutil.which("sparc", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


def test_ctrl_c_while_the_run_is_being_set_up(tmp_path):
    # 200,000 captions to train the tokenizer on: the set-up takes seconds, and the lock is taken before it starts
    sets = ["data.num_samples=200000", "tokenizer.train_captions=200000", "train.steps=5"]
    argv = [SPARC, "train", "sparc_tiny", *[a for s in sets for a in ("--set", s)], "--out", "run", "--quiet"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / ".lock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert (out, err.strip().splitlines()) == ("", ["interrupted before the first step; nothing new was saved in run"])
    assert not (tmp_path / "run" / "checkpoints").exists()
