"""Multi-host start-up: ``jax.distributed`` from config or environment, and barriers.

A multi-host run is the same program started on every host (docs/scaling.md). After
``initialize_distributed`` every process sees every device of the run, so the meshes of
``trackstar.sharding`` span all hosts, and the kernels (featurize, Hessian, scoring) need no
coordination beyond their collectives and the barriers of ``trackstar.stages``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

from trackstar.sharding import ShardingError


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in a (possibly multi-host) run."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def _env(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def initialize_distributed(cfg_mesh: Any = None) -> ProcessInfo:
    """Starts ``jax.distributed`` from config or environment; call before any JAX computation.

    Coordinator, process count and id come from ``mesh.coordinator`` / ``num_processes`` /
    ``process_id`` when set, else from ``TRACKSTAR_COORDINATOR`` / ``TRACKSTAR_NUM_PROCESSES``
    / ``TRACKSTAR_PROCESS_ID``. ``mesh.distributed``: ``"off"`` (single process), ``"on"``
    (initialize; with no coordinator given, JAX auto-detects TPU pods, SLURM, Open MPI) or
    ``"auto"`` (initialize when a coordinator is given). On CPU, collectives use gloo.
    """
    get = (lambda k, d: getattr(cfg_mesh, k, d)) if cfg_mesh is not None else (lambda k, d: d)
    mode = str(get("distributed", "auto"))
    if mode not in ("off", "on", "auto"):
        raise ShardingError(f"mesh.distributed = {mode!r}; use 'off', 'on' or 'auto'")
    coordinator = str(get("coordinator", "")) or _env("TRACKSTAR_COORDINATOR")
    n_proc = int(get("num_processes", 0)) or int(_env("TRACKSTAR_NUM_PROCESSES") or 0)
    pid = int(get("process_id", -1))
    if pid < 0 and _env("TRACKSTAR_PROCESS_ID") is not None:
        pid = int(_env("TRACKSTAR_PROCESS_ID"))
    if mode == "on" or (mode == "auto" and coordinator):
        collectives = str(get("cpu_collectives", "gloo"))
        if collectives:
            # Affects only the CPU backend (GPU/TPU runs keep NCCL / ICI).
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        kwargs: dict[str, Any] = {}
        if coordinator:
            if n_proc < 1 or pid < 0:
                raise ShardingError(
                    f"coordinator {coordinator!r} given without the process count and id; set "
                    "mesh.num_processes and mesh.process_id (or TRACKSTAR_NUM_PROCESSES / "
                    "TRACKSTAR_PROCESS_ID)"
                )
            kwargs = dict(coordinator_address=coordinator, num_processes=n_proc, process_id=pid)
        jax.distributed.initialize(**kwargs)
    return process_info()


def process_info() -> ProcessInfo:
    """This process's index and the run's process / device counts."""
    return ProcessInfo(
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
    )


def is_main_process() -> bool:
    """Whether this process writes the run's shared outputs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Blocks until every process reaches ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
