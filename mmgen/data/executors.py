"""Where ``mmgen filter`` runs the per-input work: in this process, in local worker processes, or on Ray.

Each executor maps :func:`mmgen.data.pipeline.process_unit` over the work units (whole files, byte
ranges of a large jsonl, row groups of a parquet file) and hands the results back IN UNIT ORDER; the parent then decides deduplication and writes everything. So the
output is byte-identical whatever the executor or the number of workers.

Ray: tasks on the cluster that ``ray.init`` finds (``RAY_ADDRESS`` for a running cluster; otherwise a
local one with ``workers`` CPUs). At most ``2 * workers`` units are in flight, so the parent's memory
stays bounded on any corpus size.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from typing import Iterator

from mmgen.errors import MMGenError

EXECUTORS = ("local", "ray")

_WORKER_OPS: dict = {}


def _ops_for(recipe_data: dict):
    """The worker's operators for a recipe, built once per process (models load once)."""
    import json

    key = json.dumps(recipe_data, sort_keys=True, default=str)
    if key not in _WORKER_OPS:
        from mmgen.config import from_dict
        from mmgen.data.pipeline import Recipe, build_ops

        _WORKER_OPS.clear()
        _WORKER_OPS[key] = build_ops(from_dict(Recipe, recipe_data))
    return _WORKER_OPS[key]


def _init_worker(recipe_data: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _ops_for(recipe_data)


def run_one(recipe_data: dict, unit, read_opts: dict) -> list:
    from mmgen.data.pipeline import process_unit

    return process_unit(_ops_for(recipe_data), unit, read_opts)


def _pool_run(args: tuple) -> list:
    return run_one(*args)


@contextlib.contextmanager
def results_in_order(executor: str, workers: int, recipe_data: dict, ops, units: list, read_opts: dict) -> Iterator[Iterator[list]]:
    """An iterator over ``process_unit`` results of ``units``, in order; workers are stopped on exit."""
    if executor not in EXECUTORS:
        raise MMGenError(f"unknown executor '{executor}' (use one of: {', '.join(EXECUTORS)})")
    if executor == "ray":
        with _ray_results(workers, recipe_data, units, read_opts) as it:
            yield it
        return
    if workers <= 1 or len(units) <= 1:
        from mmgen.data.pipeline import process_unit

        yield (process_unit(ops, u, read_opts) for u in units)
        return
    import multiprocessing as mp

    # spawn: workers start clean (no inherited threads or open files), on every platform
    pool = mp.get_context("spawn").Pool(min(workers, len(units)), initializer=_init_worker, initargs=(recipe_data,))
    try:
        yield pool.imap(_pool_run, [(recipe_data, u, read_opts) for u in units], chunksize=1)
    finally:
        pool.terminate()
        pool.join()


@contextlib.contextmanager
def _ray_results(workers: int, recipe_data: dict, units: list, read_opts: dict):
    try:
        import ray
    except ImportError:
        raise MMGenError("executor 'ray' needs the ray package: pip install ray") from None
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=1)(run_one)

    def gen():
        window = max(2, 2 * workers)
        pending: deque = deque()
        todo = iter(units)
        for u in todo:
            pending.append(task.remote(recipe_data, u, read_opts))
            if len(pending) >= window:
                break
        while pending:
            out = ray.get(pending.popleft())
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(task.remote(recipe_data, nxt, read_opts))
            yield out

    try:
        yield gen()
    finally:
        if started:
            ray.shutdown()
