"""Batch generation over devices: the local mesh, per-device programs, multi-process runs.

A batch of keyframe pairs needs no communication between devices: each device runs the single-device
program on its own rows (`jax.shard_map` under `jax.jit` over a 1-D mesh, parameters replicated), and a
video does not depend on the device count (`Pipeline.interpolate_batch` says to what precision). Leaving
the partitioning to XLA's sharding propagation instead was measured to be worse: the `[uncond; cond]`
concatenation of classifier-free guidance runs along the batch axis, so XLA inserts all-gathers,
all-to-alls and collective permutes around every UNet call, and each device computes with other shapes
than a single-device run.

Several hosts: every process calls `initialize()` first, then generates its own share of the pairs
(`process_share`) on a mesh of its local devices. No array spans hosts, so no process waits on another.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jinbetween.errors import ConfigError

AXIS = "batch"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> tuple[int, int]:
    """Returns `(process_index, process_count)` after joining a multi-process run (`jax.distributed.initialize`).

    Without arguments JAX detects SLURM, Open MPI and `JAX_COORDINATOR_ADDRESS`; elsewhere every process
    passes the same `coordinator_address` ("host:port" of process 0) and `num_processes`, and its own
    `process_id`. Must run before anything touches a device (loading a pipeline included). Calling it again
    in a process that already joined returns the same answer.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"num_processes={num_processes}: a run has at least one process.")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ConfigError(f"process_id={process_id} is not in 0..{(num_processes or 1) - 1}: number the processes "
                          "0, 1, …, num_processes − 1, with 0 on the coordinator's host.")
    if coordinator_address is not None and not _is_host_port(coordinator_address):
        raise ConfigError(f"coordinator_address={coordinator_address!r}: write HOST:PORT, e.g. 10.0.0.1:1234 (the "
                          "address of process 0 and a free port, the same for every process).")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except RuntimeError as err:
        if "must be called before" in str(err):
            raise ConfigError("jinbetween.distributed.initialize() ran after JAX had already started on this "
                              "process's devices; call it first, before loading a pipeline or any JAX "
                              "computation.") from err
        where = coordinator_address or "the detected coordinator"
        raise ConfigError(f"Could not join the multi-process run at {where}: {err}. Check that every process runs "
                          "with the same coordinator address and process count, and that process 0's host is "
                          "reachable.") from err
    except ValueError as err:
        raise ConfigError(f"Cannot start a multi-process run: {err}. Outside SLURM or Open MPI pass the "
                          "coordinator address (HOST:PORT of process 0), the number of processes and this "
                          "process's id (CLI: --coordinator-address, --num-processes, --process-id).") from err
    return jax.process_index(), jax.process_count()


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit())


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh (axis "batch") of `devices`, by default every device of this process."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ConfigError("A mesh needs at least one device.")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"Devices listed twice in {devices}; list each device once.")
    return check_mesh(Mesh(np.array(devices), (AXIS,)))


def check_mesh(mesh: Mesh) -> Mesh:
    """Returns `mesh` if it is 1-D over devices of this process; raises ConfigError otherwise."""
    if len(mesh.axis_names) != 1:
        raise ConfigError(f"The batch mesh must be 1-D, got axes {mesh.axis_names}; build it with "
                          "jinbetween.distributed.local_mesh(devices).")
    remote = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
    if remote:
        raise ConfigError(f"The mesh holds devices of other processes ({remote[:4]}); every process generates its "
                          "own share of the pairs on its own devices (jinbetween.distributed.process_share and "
                          "local_mesh).")
    return mesh


def process_share(n: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """Returns the indices of the `n` items that process `process_index` (default: this one) generates: a
    contiguous block, the blocks of processes 0, 1, … in order, their sizes differing by at most one."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Returns `tree` with every array copied to every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_rows(tree: Any, mesh: Mesh) -> Any:
    """Returns `tree` with every array split along its leading axis over `mesh` (device d holds the d-th block)."""
    return jax.device_put(tree, NamedSharding(mesh, P(mesh.axis_names[0])))


def per_device(fn: Callable, mesh: Mesh, batched: Sequence[bool]) -> Callable:
    """Returns `fn` as one jitted program in which each device of `mesh` runs `fn` on its own rows.

    Argument i is split along its leading axis if `batched[i]`, else every device gets all of it (a
    replicated array); every output is split along its leading axis, the devices' blocks in mesh order.
    Cached per (fn, mesh, batched): pass the same `fn` object for the same program.
    """
    return _per_device(fn, mesh, tuple(batched))


@functools.lru_cache(maxsize=64)
def _per_device(fn: Callable, mesh: Mesh, batched: tuple[bool, ...]) -> Callable:
    axis = mesh.axis_names[0]
    in_specs = tuple(P(axis) if split else P() for split in batched)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(axis)))
