"""Smoke test of benchmarks/vs_open_clip.py: it runs end to end at a tiny shape and writes its JSON. No time is
asserted (speed is measured by the benchmark, not tested); open_clip is left out, so the test needs only sparc-kit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_open_clip.py"


@pytest.mark.smoke
def test_smoke_vs_open_clip_tiny_without_open_clip(tmp_path):
    out = tmp_path / "vs_open_clip_tiny.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--threads", "1", "--systems", "sparc_clip,sparc_sparc",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert {(r["system"], r["precision"]) for r in record["rows"]} == {
        (s, p) for s in ("sparc_clip", "sparc_sparc") for p in ("fp32", "bf16")
    }
    assert all(r["step_flops"] > 0 and r["time_x_open_clip"] is None for r in record["rows"])
    assert record["device"] == "cpu" and all(r["mfu"] is None for r in record["rows"])  # no datasheet peak for a CPU


@pytest.mark.smoke
def test_smoke_vs_open_clip_short_captions_cost_sparc_kit_fewer_flops(tmp_path):
    """With --caption-tokens the text tower is given the cut length (train.pad_to: longest): fewer FLOPs per step
    than with captions that fill the context, counted by FlopCounterMode in the benchmark itself."""
    flops = {}
    for name, extra in (("full", []), ("short", ["--caption-tokens", "5"])):
        out = tmp_path / f"{name}.json"
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--threads", "1", "--systems", "sparc_sparc",
             "--precisions", "fp32", "--out", str(out), *extra],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        record = json.loads(out.read_text())
        flops[name] = record["rows"][0]["step_flops"]
        assert record["caption_tokens"] == (5 if name == "short" else None)
    assert flops["short"] < flops["full"]


@pytest.mark.smoke
def test_smoke_every_vs_open_clip_system_is_a_valid_recipe():
    """The systems the benchmark can only run elsewhere (xformers on CUDA) still name real recipe keys."""
    import importlib.util

    import sparc_kit

    spec = importlib.util.spec_from_file_location("vs_open_clip", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, recipe in bench.RECIPES.items():
        overrides = [*bench.sparc_overrides(bench.shape(False), "bf16", "cuda"), *bench.EXTRA_OVERRIDES.get(name, [])]
        loaded = sparc_kit.load_recipe(recipe, overrides)
        assert loaded.train.device == "cuda"
        assert loaded.model.attention == ("xformers" if name.endswith("_xformers") else "auto")
        assert loaded.train.compile == name.endswith("_compile")
