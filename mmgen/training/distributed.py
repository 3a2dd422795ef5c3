"""Distributed setup: the launcher's environment, or a single-rank gloo group when run in-process
(so a training run can be debugged without a launcher)."""

from __future__ import annotations

import os
import socket

import torch

from mmgen.utils.compat import clear_stale_extension_locks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed through DeepSpeed once per process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    clear_stale_extension_locks()  # DeepSpeed JIT-builds an op below; a killed earlier build would hang it
    sweep_orphan_shm_buffers()  # what runs killed before release_shm_buffers left in RAM
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # not under a launcher: a single-rank job in this process
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                LOCAL_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        backend = "gloo" if get_accelerator().device_name() == "cpu" else None
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        barrier()  # every rank has mapped every peer's shared-memory buffer before any name goes
        release_shm_buffers()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def release_shm_buffers() -> list[str]:
    """Unlink the DeepSpeed CPU all-reduce buffers this process maps; returns their paths.

    DeepSpeed's CPU accelerator gives each rank a 67 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file and
    never unlinks it, so every run left its buffers in RAM until a reboot (hundreds of runs: gigabytes).
    Once all ranks have opened each other's buffers the names are not needed: the mappings stay valid, and
    the memory is freed when the last process using it exits."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted(
                {w for line in f for w in line.split() if w.startswith("/dev/shm/deepspeed_allreduce_buffer")}
            )
    except OSError:  # not Linux: nothing of ours to find
        return []
    released = []
    for p in paths:
        try:
            os.unlink(p)
            released.append(p)
        except OSError:
            continue  # already gone
    return released


SHM_BUFFER_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"
ORPHAN_SHM_SECONDS = 300


def _mapped_anywhere(paths: set[str]) -> set[str]:
    """Those of ``paths`` that some process we can read maps (other users' processes are skipped:
    their files are not ours to remove either)."""
    from pathlib import Path

    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped.update(p for p in paths if p in text)
    return mapped


def sweep_orphan_shm_buffers(prefix: str = SHM_BUFFER_PREFIX, max_age_s: float = ORPHAN_SHM_SECONDS) -> list[str]:
    """Unlink DeepSpeed all-reduce buffers that no process maps and that are older than ``max_age_s``;
    returns their paths. A run killed before :func:`release_shm_buffers` (during start-up, or a rank
    that died before the barrier) leaves its 67 MB file behind; the age keeps a buffer that a rank is
    creating right now, before it maps it."""
    import glob

    old = {p for p in glob.glob(prefix + "*") if _age(p) > max_age_s}
    if not old:
        return []
    swept = []
    for p in sorted(old - _mapped_anywhere(old)):
        try:
            os.unlink(p)
            swept.append(p)
        except OSError:
            continue  # gone already, or another user's
    return swept


def _age(path: str) -> float:
    import time

    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def barrier():
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def gather(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order (a collective: all ranks call it)."""
    if world <= 1:
        return [obj]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, obj)
    return everyone
