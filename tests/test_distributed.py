"""Training past one process: real torchrun processes (gloo on CPU, two of them), checked against one process.

One torchrun launch (``tests/distributed_worker.py``) trains every engine configuration on the micro recipe
for 3 optimizer steps and computes accumulated DDP gradients of one fixed batch; the tests compare each result
with the ``local`` engine on the same global batch in this process. The CLI tests start ``sparc train --nproc``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparc_kit
from sparc_kit.engines import BatchLayout, EngineSetupError, LocalEngine, OptimizerSpec, param_groups
from sparc_kit.engines.distributed import discover, first_slurm_host
from sparc_kit.train import latest_checkpoint, read_metrics, train
from sparc_kit.train.step import compute_gradients
from test_train import MICRO  # noqa: E402  (the micro sparc_tiny every training test uses)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
_spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

STEPS = ["train.steps=3", "train.checkpoint_every=3", "train.log_every=1"]
LOSSES = {"clip": "clip_tiny", "sparc": "sparc_tiny", "siglip": "siglip_tiny"}
DEEPSPEED = {
    "zero1": ["engine.name=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"],
    "zero2_offload": ["engine.name=deepspeed", "engine.zero_stage=2", "engine.offload_optimizer=true"],
}
TOL = 1e-5
CUT_CONTEXT = ["tokenizer.context_length=32"]
BOUNDED_ENGINES = {"ddp": {}, "zero1": {"zero_stage": 1}, "zero2": {"zero_stage": 2}, "zero3": {"zero_stage": 3}}


def overrides(*extra: str) -> list[str]:
    return [*MICRO, *STEPS, *extra]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(latest_checkpoint(os.path.join(run_dir, "checkpoints")), "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(HERE.parent))
    for key in ("SPARC_ERROR_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=HERE.parent)


def sparc(*args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sparc_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=HERE.parent)


# ---------------------------------------------------------------------------------------------------------------
# one launch for all the parity runs


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    retrieval = worker_manifest(root)
    runs, grads = [], []
    for loss, recipe in LOSSES.items():
        runs.append({"recipe": recipe, "overrides": overrides("engine.name=ddp"), "out": str(root / f"ddp-{loss}")})
        for name, engine in DEEPSPEED.items():
            runs.append({"recipe": recipe, "overrides": overrides(*engine), "out": str(root / f"{name}-{loss}")})
        grads.append({
            "recipe": recipe, "overrides": overrides("train.batch_size=16"), "accum_steps": 4,
            "out": str(root / f"grads-{loss}.safetensors"),
        })
    # train.pad_to: longest with rank 0 holding a caption of 20 tokens and rank 1 none past 10: both must cut to
    # the global longest (24 of 32 columns), or FILIP's gather of the tokens would not even match in shape
    for recipe, extra in (("filip_tiny", ["loss.token_drop=0"]), ("sparc_tiny", [])):
        grads.append({
            "recipe": recipe, "overrides": overrides("train.batch_size=16", *CUT_CONTEXT, *extra), "accum_steps": 2,
            "longest": 20, "out": str(root / f"grads-cut-{recipe}.safetensors"),
        })
    # the all-pairs baseline gathers patches and tokens (token drop off: its draws differ by process count)
    runs.append({
        "recipe": "filip_tiny", "overrides": overrides("engine.name=ddp", "loss.token_drop=0",
                                                       "engine.find_unused_parameters=true"),
        "out": str(root / "ddp-filip"),
    })
    # accumulation inside a multi-process run; evaluation during a ZeRO-3 run
    runs.append({"recipe": "sparc_tiny", "overrides": overrides("engine.name=ddp", "train.accum_steps=2",
                                                                eval_entry(retrieval)),
                 "out": str(root / "ddp-accum-sparc")})
    runs.append({"recipe": "sparc_tiny", "overrides": overrides(*DEEPSPEED["zero3"], eval_entry(retrieval)),
                 "out": str(root / "zero3-eval-sparc")})
    # a bounded scalar (like the temperature) pushed up against its cap, then down, through each engine
    bounds = [{"engine": name, "out": str(root / f"bounded-{name}.json")} for name in BOUNDED_ENGINES]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "grads": grads, "bounds": bounds}))
    result = torchrun(str(WORKER), str(spec))
    assert result.returncode == 0 and (root / "done").exists(), result.stderr[-4000:]
    return root, retrieval, result


def worker_manifest(root: Path) -> str:
    from conftest import DataGen

    return DataGen.manifest(root / "retrieval", n=8, size=32, captions_per_image=2)


def eval_entry(manifest: str) -> str:
    return f"eval=[{{task: retrieval, data: '{manifest}', name: val, every: 2}}]"


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    out = {}
    for loss, recipe in LOSSES.items():
        out[loss] = str(root / loss)
        train(sparc_kit.load_recipe(recipe, overrides()), out[loss], progress=False)
    out["filip"] = str(root / "filip")
    train(sparc_kit.load_recipe("filip_tiny", overrides("loss.token_drop=0")), out["filip"], progress=False)
    return out


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ddp_two_processes_give_the_weights_of_one_process(launched, local_runs, loss):
    root, _, _ = launched
    ddp, local = final_weights(root / f"ddp-{loss}"), final_weights(local_runs[loss])
    assert max_difference(ddp, local) < TOL
    torch.manual_seed(0)
    initial = sparc_kit.build_model(sparc_kit.load_recipe(LOSSES[loss], overrides())).state_dict()
    assert max_difference(ddp, initial) > 100 * TOL  # three steps moved the weights far beyond the tolerance
    # and the logged curve: each step once, from rank 0 only, the losses of the global batch
    rows, ref = read_metrics(str(root / f"ddp-{loss}")), read_metrics(local_runs[loss])
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, ref):
        assert abs(a["loss"] - b["loss"]) < TOL and a["samples_seen"] == b["samples_seen"]


@pytest.mark.parametrize("engine", list(DEEPSPEED))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_deepspeed_two_processes_give_the_weights_of_one_process(launched, local_runs, engine, loss):
    root, _, _ = launched
    run = root / f"{engine}-{loss}"
    assert max_difference(final_weights(run), final_weights(local_runs[loss])) < TOL
    # DeepSpeed's own checkpoint: one optimizer partition per process
    files = os.listdir(os.path.join(latest_checkpoint(str(run / "checkpoints")), "deepspeed", "state"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)


@pytest.mark.parametrize("engine", list(BOUNDED_ENGINES))
def test_a_bounded_parameter_is_held_at_its_cap_and_comes_back_on_two_processes(launched, engine):
    """The temperature's bound is applied after every update in DeepSpeed's fp32 master copy too (ZeRO-3 with a
    1-element parameter on two processes included): pushed up it stays at the cap, pushed down it leaves it."""
    root, _, _ = launched
    values = json.loads((root / f"bounded-{engine}.json").read_text())
    assert values["at_cap"] == pytest.approx(2.0) and values["after_down"] < 2.0 - 0.1


def test_filip_under_ddp_contrasts_the_whole_global_batch(launched, local_runs):
    root, _, _ = launched
    assert max_difference(final_weights(root / "ddp-filip"), final_weights(local_runs["filip"])) < TOL


def test_accumulation_inside_a_ddp_run_gives_the_weights_of_one_process(launched, local_runs):
    root, _, _ = launched
    assert max_difference(final_weights(root / "ddp-accum-sparc"), final_weights(local_runs["sparc"])) < TOL


@pytest.mark.parametrize("loss", list(LOSSES))
def test_accumulated_ddp_gradients_equal_the_full_batch_gradient(launched, loss):
    """k = 4 micro-batches on each of 2 processes (16 samples, 2 per micro-batch) against one backward of the
    whole batch in one process: the contrastive-correct accumulation reproduces the full batch's gradient."""
    root, _, _ = launched
    recipe = sparc_kit.load_recipe(LOSSES[loss], overrides("train.batch_size=16"))
    reference = full_batch_gradients(recipe, accum_steps=1)
    got = load_file(str(root / f"grads-{loss}.safetensors"))
    assert got.keys() == reference.keys()
    assert max_difference(got, reference) < TOL


@pytest.mark.parametrize("recipe_name,extra", [("filip_tiny", ["loss.token_drop=0"]), ("sparc_tiny", [])])
def test_two_processes_cut_the_padding_to_the_global_batchs_longest_caption(launched, recipe_name, extra):
    """Rank 1's own captions would be cut to 16 columns; it is given the global 24 (one all-reduce), and the
    gradients equal one process's on the whole batch at its full 32 columns."""
    root, _, _ = launched
    recipe = sparc_kit.load_recipe(recipe_name, overrides("train.batch_size=16", *CUT_CONTEXT, *extra))
    out = root / f"grads-cut-{recipe_name}.safetensors"
    seen = json.loads(Path(str(out) + ".json").read_text())["seen"]
    assert seen == [[24] * 4, [24] * 4]  # 2 cached + 2 live micro-batches on each process
    reference = full_batch_gradients(recipe, accum_steps=1, longest=20, pad_to="context_length")
    assert max_difference(load_file(str(out)), reference) < TOL


@pytest.mark.parametrize("run_name", ["zero3-eval-sparc", "ddp-accum-sparc"])
def test_evaluation_during_a_multi_process_run_logs_what_one_process_logs(launched, tmp_path, run_name):
    """Evaluation runs on rank 0 while the others wait (no hang), on the consolidated fp32 weights for ZeRO-3."""
    root, manifest, _ = launched
    local = tmp_path / "local-eval"
    train(sparc_kit.load_recipe("sparc_tiny", overrides(eval_entry(manifest))), str(local), progress=False)
    rows, ref = read_metrics(str(root / run_name)), read_metrics(str(local))
    evaluated = [r for r in rows if "eval/val/i2t_R@1" in r]
    assert [r["step"] for r in evaluated] == [2, 3]  # every 2 steps and at the end
    for a, b in zip(evaluated, [r for r in ref if "eval/val/i2t_R@1" in r]):
        for key in ("eval/val/i2t_R@1", "eval/val/t2i_R@1", "eval/val/i2t_R@5"):
            assert a[key] == b[key]


def test_a_zero3_run_folder_loads_consolidates_and_evaluates_like_any_other(launched, local_runs):
    from typer.testing import CliRunner

    from sparc_cli.main import app
    from sparc_kit.engines import consolidate_zero_checkpoint

    root, manifest, _ = launched
    run = root / "zero3-eval-sparc"
    pretrained = sparc_kit.load_pretrained(str(run))  # the consolidated fp32 weights of the ZeRO-3 run
    assert pretrained.step == 3
    assert max_difference(dict(pretrained.model.state_dict()), final_weights(local_runs["sparc"])) < TOL
    # the same weights rebuilt from DeepSpeed's partitions alone, without a process group
    parts = consolidate_zero_checkpoint(latest_checkpoint(str(run / "checkpoints")))
    saved = final_weights(run)
    assert parts["model"].keys() == saved.keys()
    assert all(torch.equal(parts["model"][k], saved[k]) for k in saved)
    result = CliRunner().invoke(app, ["eval", str(run), "--task", "retrieval", "--data", manifest])
    assert result.exit_code == 0, result.output
    logged = [r for r in read_metrics(str(run)) if "eval/val/i2t_R@1" in r][-1]
    written = json.loads((run / "eval" / "retrieval.json").read_text())
    assert written["metrics"]["i2t_R@1"] == logged["eval/val/i2t_R@1"]


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation in one process


def full_batch_gradients(recipe, accum_steps: int, longest: int | None = None, pad_to: str = "longest"):
    module = worker.build_module(recipe)
    engine = LocalEngine(device="cpu")
    engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=1e-3), BatchLayout(recipe.train.batch_size))
    batch = worker.fixed_batch(recipe, recipe.train.batch_size, longest=longest)
    compute_gradients(engine, batch, accum_steps, pad_to=pad_to)
    return worker.gradients_of(engine)


@pytest.mark.parametrize("loss", [*LOSSES, "filip", "mgca"])
def test_accumulated_gradients_equal_the_full_batch_gradient(loss):
    """Within 1e-5 with k = 4; FILIP's token drop included (every pass draws from the same RNG state)."""
    recipe = sparc_kit.load_recipe(f"{loss}_tiny", overrides("train.batch_size=16"))
    full = full_batch_gradients(recipe, 1)
    accumulated = full_batch_gradients(recipe, 4)
    assert accumulated.keys() == full.keys()
    assert max_difference(accumulated, full) < TOL
    # and the check is not vacuous: accumulating by averaging micro-batch losses (the classifier habit, which
    # shrinks the pool of negatives) gives another gradient
    module = worker.build_module(recipe)
    batch = worker.fixed_batch(recipe, 16)
    for part in range(4):
        rows = slice(4 * part, 4 * part + 4)
        (module(**{k: v[rows] for k, v in batch.items()})["loss"] / 4).backward()
    naive = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert max_difference(naive, full) > 1e-3


def test_accumulated_training_gives_the_weights_of_the_full_batch(tmp_path):
    full, accumulated = tmp_path / "full", tmp_path / "accum"
    train(sparc_kit.load_recipe("sparc_tiny", overrides()), str(full), progress=False)
    train(sparc_kit.load_recipe("sparc_tiny", overrides("train.accum_steps=4")), str(accumulated), progress=False)
    assert max_difference(final_weights(accumulated), final_weights(full)) < TOL
    state = json.loads(Path(latest_checkpoint(str(accumulated / "checkpoints")), "state.json").read_text())
    assert state["accum_steps"] == 4 and state["samples_seen"] == 3 * 8


# ---------------------------------------------------------------------------------------------------------------
# layouts, launch environments and the DeepSpeed config


def test_batch_layout_divides_the_global_batch():
    layout = BatchLayout(64, world_size=4, accum_steps=2)
    assert (layout.per_rank, layout.micro_batch) == (16, 8)
    with pytest.raises(EngineSetupError, match=r"train.batch_size=10 \(the global batch\) does not divide into 3 "
                                                r"processes = 3; use a multiple of 3"):
        BatchLayout(10, world_size=3)
    with pytest.raises(EngineSetupError, match="2 processes x 4 accumulation steps = 8"):
        BatchLayout(12, world_size=2, accum_steps=4)


def test_launcher_environments_are_read():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert discover(torchrun_env) == type(discover({}))(3, 4, 1, "10.0.0.1", 1234, "env")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08,11]",
             "SLURM_JOB_ID": "123456"}
    env = discover(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert env.master_port == 20000 + 123456 % 20000
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "h0"}
    assert discover(mpi).rank == 1 and discover(mpi).launcher == "mpi"
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1  # one task of sbatch: alone
    assert first_slurm_host("node7") == "node7" and first_slurm_host("a[1-3],b2") == "a1"
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_deepspeed_config_is_generated_from_the_recipe_and_raw_keys_pass_through():
    from sparc_kit.engines.deepspeed import conflicts, deepspeed_config, merge

    recipe = sparc_kit.load_recipe("sparc_tiny", [
        "engine.name=deepspeed", "engine.zero_stage=3", "engine.offload_params=true", "train.precision=bf16",
        "train.accum_steps=2", "optim.grad_clip=1.0",
        "engine.config={zero_optimization: {overlap_comm: true}, gradient_clipping: 1.0}",
    ])
    generated = deepspeed_config(
        global_batch=64, world_size=4, accum_steps=2, grad_clip=recipe.optim.grad_clip, precision="bf16",
        zero_stage=3, offload_optimizer=False, offload_params=True, optimizer=None,
    )
    assert generated["train_micro_batch_size_per_gpu"] == 8 and generated["bf16"] == {"enabled": True}
    assert generated["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert conflicts(recipe.engine.config, generated) == []  # the same clipping value is no conflict
    merged = merge(generated, recipe.engine.config)
    assert merged["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}, "overlap_comm": True}


@pytest.mark.parametrize(
    "extra, line",
    [
        (["engine.config={train_batch_size: 32}"],
         "engine.config.train_batch_size: 32 contradicts train.batch_size (which gives 64); set train.batch_size "
         "instead of the raw DeepSpeed key"),
        (["engine.config={bf16: {enabled: true}}"],
         "engine.config.bf16.enabled: True contradicts train.precision (which gives False); set train.precision "
         "instead of the raw DeepSpeed key"),
        (["engine.config={zero_optimization: {offload_optimizer: {device: cpu}}}"],
         "engine.config.zero_optimization.offload_optimizer.device: DeepSpeed's 'zero_optimization.offload_optimizer' "
         "is decided by engine.offload_optimizer; set that instead of the raw key"),
        (["engine.offload_params=true"],
         "engine.offload_params: parameter offload needs engine.zero_stage=3 (got 2); set engine.zero_stage=3 or "
         "engine.offload_params=false"),
        (["engine.zero_stage=0", "engine.offload_optimizer=true"],
         "engine.offload_optimizer: optimizer offload needs ZeRO (engine.zero_stage 1, 2 or 3, got 0)"),
    ],
)
def test_deepspeed_recipe_conflicts_are_recipe_errors(extra, line):
    with pytest.raises(sparc_kit.RecipeError) as info:
        sparc_kit.load_recipe("sparc_tiny", ["engine.name=deepspeed", *extra])
    assert info.value.problems == [line]


# ---------------------------------------------------------------------------------------------------------------
# sparc train --nproc: the CLI's own launcher, faults and bad input

CLI_MICRO = [a for item in [*MICRO, "train.log_every=1"] for a in ("--set", item)]


def test_nproc_ddp_run_matches_one_process_and_reports_from_rank_zero(tmp_path):
    out = tmp_path / "run"
    result = sparc("train", "sparc_tiny", *CLI_MICRO, "--set", "train.steps=4", "--set", "engine.name=ddp",
                   "--nproc", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 4 steps") == 1  # rank 0 speaks for the run
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")] == [
        "1/4", "2/4", "3/4", "4/4"]
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3, 4]
    local = tmp_path / "local"
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=4"]), str(local), progress=False)
    assert max_difference(final_weights(out), final_weights(local)) < TOL
    # the run folder works with every tool, and resuming it in one process with ddp is allowed
    again = sparc("train", "sparc_tiny", *CLI_MICRO, "--set", "train.steps=4", "--set", "engine.name=ddp",
                  "--out", str(out))
    assert again.returncode == 0 and "run already complete at step 4" in again.stdout


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(str(run)) if (run / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def _popen_sparc(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sparc_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(), cwd=HERE.parent, start_new_session=True,
    )


def test_deepspeed_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL to the whole process group (launcher and both ZeRO-2 processes) between checkpoints; the same
    command again resumes from the last checkpoint and ends bit-identical to a run that was never killed."""
    import signal

    args = ["train", "sparc_tiny", *CLI_MICRO, "--set", "engine.name=deepspeed", "--set", "engine.zero_stage=2",
            "--set", "train.steps=40", "--set", "train.checkpoint_every=8", "--nproc", "2", "--quiet"]
    killed = tmp_path / "killed"
    proc = _popen_sparc(*args, "--out", str(killed))
    _wait_for_step(killed, 19, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    last = latest_checkpoint(str(killed / "checkpoints"))
    assert last is not None and 8 <= int(last.rsplit("_", 1)[1]) < 40
    resumed = sparc(*args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = tmp_path / "clean"
    uninterrupted = sparc(*args, "--out", str(clean))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    a, b = final_weights(killed), final_weights(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(str(killed))] == [r["loss"] for r in read_metrics(str(clean))]
    assert not [d for d in os.listdir(killed / "checkpoints") if d.startswith(".tmp")]  # a stale save is cleaned


def test_a_process_that_dies_stops_the_run_with_its_one_line_error(tmp_path):
    """Rank 1 is SIGKILLed mid-run: rank 0 does not hang, the launcher stops, one error line names rank 1."""
    import signal
    import time

    out = tmp_path / "run"
    proc = _popen_sparc("train", "sparc_tiny", *CLI_MICRO, "--set", "engine.name=ddp", "--set", "train.steps=400",
                        "--nproc", "2", "--quiet", "--out", str(out))
    _wait_for_step(out, 3, proc)
    rank1 = _worker_pid(proc.pid, rank=1)
    os.kill(rank1, signal.SIGKILL)
    t0 = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: [rank 1] process killed by SIGKILL"], stderr[-3000:]
    assert proc.returncode == 128 + 9
    assert "Traceback" not in stderr


def _worker_pid(launcher: int, rank: int) -> int:
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                stat = Path(f"/proc/{pid}/stat").read_text().split()
            except OSError:
                continue
            if int(stat[3]) == launcher and f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def test_rank_zero_refusal_reaches_every_process_as_one_line(tmp_path):
    """A run folder locked by another trainer: rank 0 refuses, rank 1 does not wait forever, one line, exit 1."""
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        result = sparc("train", "sparc_tiny", *CLI_MICRO, "--set", "engine.name=ddp", "--nproc", "2", "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: [rank 0] run folder {out} is in use by another training process (pid 4242); wait for it, or use "
        "another --out"
    ]


@pytest.mark.parametrize(
    "args, line",
    [
        (["--nproc", "0"], "error: --nproc: must be at least 1, got 0"),
        (["--nproc", "3", "--set", "engine.name=ddp"],
         "error: --nproc 3: train.batch_size=8 (the global batch) does not divide into 3 processes = 3; use a "
         "multiple of 3"),
        (["--nproc", "2", "--set", "train.accum_steps=8", "--set", "engine.name=ddp"],
         "error: --nproc 2: train.batch_size=8 (the global batch) does not divide into 2 processes x 8 accumulation "
         "steps = 16; use a multiple of 16"),
        (["--nproc", "2"],
         "error: --nproc 2: engine.name is 'local', which runs one process; add --set engine.name=ddp (or "
         "engine.name=deepspeed)"),
        (["--set", "engine.name=deepspeed", "--set", "engine.config={gradient_accumulation_steps: 4}"],
         "error: sparc_tiny: engine.config.gradient_accumulation_steps: 4 contradicts train.accum_steps (which gives 1); set "
         "train.accum_steps instead of the raw DeepSpeed key"),
    ],
)
def test_bad_distributed_input_is_one_line_and_exit_2(tmp_path, args, line):
    from typer.testing import CliRunner

    from sparc_cli.main import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "sparc_tiny", *CLI_MICRO, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [line]
    assert not out.exists()  # nothing was written


def test_deepspeed_not_installed_names_the_extra(tmp_path, monkeypatch):
    import importlib.util as iu

    from typer.testing import CliRunner

    from sparc_cli.main import app

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "sparc_tiny", *CLI_MICRO, "--set", "engine.name=deepspeed",
                                      "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: engine.name is 'deepspeed' but DeepSpeed is not installed: pip install 'sparc-kit[deepspeed]'"
    ]
    assert not out.exists()


def test_resuming_with_an_engine_that_cannot_is_refused_and_changes_nothing(tmp_path):
    from typer.testing import CliRunner

    from sparc_cli.main import app

    out = tmp_path / "run"
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2"]), str(out), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    result = CliRunner().invoke(app, ["train", "sparc_tiny", *CLI_MICRO, "--set", "train.steps=4",
                                      "--set", "engine.name=deepspeed", "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run folder {out} was trained with engine 'local', whose checkpoints engine 'deepspeed' cannot "
        "resume; resume with --set engine.name=local, or use a new --out"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_any_launcher_srun_variables_start_a_ddp_run(tmp_path):
    """Two plain processes with the variables srun sets (no torchrun): the ddp engine finds its group from
    SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST and trains the weights of one process."""
    from sparc_kit.engines.distributed import free_port

    out = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = child_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                        SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="77", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sparc_cli", "train", "sparc_tiny", *CLI_MICRO, "--set", "train.steps=3",
             "--set", "engine.name=ddp", "--quiet", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent,
        ))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    local = tmp_path / "local"
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=3"]), str(local), progress=False)
    assert max_difference(final_weights(out), final_weights(local)) < TOL


def test_the_deepspeed_launchers_local_rank_argument_is_taken_out(monkeypatch):
    from sparc_cli.main import _strip_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _strip_local_rank(["sparc", "--local_rank=1", "train", "r.yaml"]) == ["sparc", "train", "r.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _strip_local_rank(["sparc", "train", "--local-rank", "0", "r.yaml"]) == ["sparc", "train", "r.yaml"]


def test_sigterm_saves_the_current_step_and_the_run_resumes_to_the_same_weights(tmp_path):
    """A scheduler's preemption: SIGTERM to the launcher, which passes it to the processes; they finish the step,
    agree to stop, save a checkpoint together and exit (143). The same command then finishes the run."""
    import signal

    args = ["train", "sparc_tiny", *CLI_MICRO, "--set", "engine.name=ddp", "--set", "train.steps=40",
            "--set", "train.checkpoint_every=1000", "--nproc", "2", "--quiet"]
    out = tmp_path / "run"
    proc = _popen_sparc(*args, "--out", str(out))
    _wait_for_step(out, 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = int(latest_checkpoint(str(out / "checkpoints")).rsplit("_", 1)[1])
    assert 6 <= stopped < 40  # not a periodic checkpoint (every 1000): the one the stop wrote
    assert f"interrupted after step {stopped}; checkpoint saved in {out}" in stderr
    assert "Traceback" not in stderr and "death signal" not in stderr
    resumed = sparc(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    local = tmp_path / "local"
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=40"]), str(local), progress=False)
    assert max_difference(final_weights(out), final_weights(local)) < TOL


def test_two_deepspeed_runs_one_after_the_other_in_one_process(tmp_path):
    """A notebook trains twice with the deepspeed engine (a group of one each time): the second run starts."""
    for name in ("a", "b"):
        result = train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2", "engine.name=deepspeed"]),
                       str(tmp_path / name), progress=False)
        assert result.steps == 2
    assert max_difference(final_weights(tmp_path / "a"), final_weights(tmp_path / "b")) == 0.0
