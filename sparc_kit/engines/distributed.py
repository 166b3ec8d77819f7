"""Process-group plumbing shared by the multi-process engines: who am I, where is the master, start the group.

A process learns its place from the variables its launcher sets, in this order:

- ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``: torchrun, ``sparc train --nproc``,
  the ``deepspeed`` launcher, or any launcher that sets the standard variables;
- ``OMPI_COMM_WORLD_RANK`` / ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_LOCAL_RANK``: ``mpirun`` (Open MPI);
- ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``: ``srun``, with the master the first host of
  ``SLURM_JOB_NODELIST`` and a port derived from ``SLURM_JOB_ID`` unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set.

No variables: one process (world size 1). The discovered values are written back to the standard variables,
because DeepSpeed reads them even after the group exists.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from sparc_kit.errors import EngineSetupError

__all__ = [
    "DistEnv",
    "discover",
    "init_process_group",
    "free_port",
    "first_slurm_host",
    "is_initialized",
    "destroy_process_group",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "env" (torchrun and friends), "mpi", "slurm" or "single"


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise EngineSetupError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise EngineSetupError(f"environment variable {key}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``; ``node7`` -> ``node7``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise EngineSetupError("SLURM_JOB_NODELIST is empty")
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise EngineSetupError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_id: str | None) -> int:
    """A port every task of one SLURM job agrees on without talking: 20000 + job id modulo 20000."""
    return 20000 + (int(job_id) % 20000 if job_id and job_id.isdigit() else 9500)


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's rank, world size, local rank and master address, from the launcher's variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK", rank % max(1, _int(env, "LOCAL_WORLD_SIZE", world_size)))
        addr = env.get("MASTER_ADDR", "127.0.0.1" if world_size == 1 else "")
        if world_size > 1 and not addr:
            raise EngineSetupError("RANK and WORLD_SIZE are set but MASTER_ADDR is not (the launcher must set it)")
        port = _int(env, "MASTER_PORT", 29500)
        return DistEnv(rank, world_size, local_rank, addr, port, "env")
    if "OMPI_COMM_WORLD_RANK" in env:
        world_size = _int(env, "OMPI_COMM_WORLD_SIZE")
        rank = _int(env, "OMPI_COMM_WORLD_RANK")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
        addr = env.get("MASTER_ADDR", "127.0.0.1" if world_size == 1 else "")
        if world_size > 1 and not addr:
            raise EngineSetupError("mpirun: set MASTER_ADDR (and MASTER_PORT) to the host of rank 0, e.g. -x MASTER_ADDR")
        return DistEnv(rank, world_size, local_rank, addr, _int(env, "MASTER_PORT", 29500), "mpi")
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        world_size = _int(env, "SLURM_NTASKS")
        rank = _int(env, "SLURM_PROCID")
        local_rank = _int(env, "SLURM_LOCALID", 0)
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        port = _int(env, "MASTER_PORT", slurm_port(env.get("SLURM_JOB_ID")))
        return DistEnv(rank, world_size, local_rank, addr, port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_process_group(backend: str = "auto", timeout_s: float = 1800.0) -> tuple[DistEnv, bool]:
    """Join (or start) the default process group; returns the environment and whether this call created it.

    ``backend``: ``auto`` picks nccl when CUDA is available, gloo otherwise. One process with no launcher
    variables starts a group of one on a free local port, so a distributed engine also runs without a launcher.
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise EngineSetupError("engine.backend is 'nccl' but CUDA is not available here (use 'gloo' or 'auto')")
    if is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        env = discover()
        if env.world_size != size:  # a group created by the caller: trust it
            env = DistEnv(rank, size, int(os.environ.get("LOCAL_RANK", rank)), "", 0, "caller")
        return env, False
    env = discover()
    port = env.master_port if env.world_size > 1 else (env.master_port or free_port())
    _SAVED_ENV.clear()
    _SAVED_ENV.update({k: os.environ.get(k) for k in _GROUP_VARS})
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr or "127.0.0.1",
        MASTER_PORT=str(port),
    )
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistEnv(env.rank, env.world_size, env.local_rank, os.environ["MASTER_ADDR"], port, env.launcher), True


_GROUP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SAVED_ENV: dict[str, str | None] = {}


def destroy_process_group() -> None:
    """End the group :func:`init_process_group` started and put back the environment variables it set."""
    if is_initialized():
        dist.destroy_process_group()
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED_ENV.clear()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (identity without a group)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
