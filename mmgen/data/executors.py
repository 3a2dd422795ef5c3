"""Where per-file work runs: in this process, in local worker processes, or on Ray.

:func:`map_in_order` maps a module-level function over jobs and hands the results back IN JOB ORDER.
``mmgen filter`` maps :func:`mmgen.data.filter_worker.process_unit` over its work units (whole files, byte
ranges of a large jsonl, row groups of a parquet file; the parent then decides deduplication and
writes everything); ``mmgen tokenize`` and ``mmgen pack`` map one shard's work each. So the output is
byte-identical whatever the executor or the number of workers.

Ray: tasks on the cluster that ``ray.init`` finds (``RAY_ADDRESS`` for a running cluster; otherwise a
local one with ``workers`` CPUs). At most ``2 * workers`` jobs are in flight, so the parent's memory
stays bounded on any corpus size.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator

from mmgen.config import from_dict
from mmgen.data.filter_recipe import Recipe, build_ops
from mmgen.data.filter_worker import process_unit
from mmgen.errors import MMGenError

EXECUTORS = ("local", "ray")

_WORKER_OPS: dict = {}


def _ops_for(recipe_data: dict):
    """The worker's operators for a recipe, built once per process (models load once)."""
    import json

    key = json.dumps(recipe_data, sort_keys=True, default=str)
    if key not in _WORKER_OPS:
        _WORKER_OPS.clear()
        _WORKER_OPS[key] = build_ops(from_dict(Recipe, recipe_data))
    return _WORKER_OPS[key]


def _init_worker(recipe_data: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _ops_for(recipe_data)


def run_one(recipe_data: dict, unit, read_opts: dict) -> list:
    return process_unit(_ops_for(recipe_data), unit, read_opts)


def _call(job: tuple):
    fn, args = job
    return fn(*args)


def _start_worker(initializer, initargs) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def map_in_order(executor: str, workers: int, fn, jobs: list[tuple], initializer=None, initargs: tuple = ()):
    """An iterator over ``fn(*job)`` for ``jobs``, in order; workers are stopped on exit.

    ``fn`` (and ``initializer``, run once per worker process) must be module-level functions: worker
    processes and Ray tasks import them. ``local`` with one worker runs in this process."""
    if executor not in EXECUTORS:
        raise MMGenError(f"unknown executor '{executor}' (use one of: {', '.join(EXECUTORS)})")
    if executor == "ray":
        with _ray_map(workers, fn, jobs) as it:
            yield it
        return
    if workers <= 1 or len(jobs) <= 1:
        yield (fn(*job) for job in jobs)
        return
    import multiprocessing as mp

    # spawn: workers start clean (no inherited threads or open files), on every platform
    pool = mp.get_context("spawn").Pool(
        min(workers, len(jobs)), initializer=_start_worker, initargs=(initializer, initargs)
    )
    try:
        yield pool.imap(_call, [(fn, job) for job in jobs], chunksize=1)
    finally:
        pool.terminate()
        pool.join()


def map_resumable(
    executor: str, workers: int, fn, jobs: list[tuple], markers: list, same_work, desc: str, progress: bool = True
) -> tuple[list, int]:
    """``fn(*job)`` for every job whose done marker (a JSON file ``fn`` writes, equal to its return value)
    is missing, the markers' entries for the rest: all entries in job order. ``same_work(i, entry)``
    says whether a marker left by an earlier run was made by the same job; a marker that was not stops
    the run with an error naming it, since mixing two runs' outputs would be silent corruption.
    Returns the entries and how many of them came from earlier runs."""
    import json

    from tqdm import tqdm

    entries: dict[int, dict] = {}
    for i, marker in enumerate(markers):
        if marker.is_file():
            entry = json.loads(marker.read_text())
            if not same_work(i, entry):
                raise MMGenError(
                    f"{marker.parent} holds output of other inputs or settings ({marker}); "
                    "write into a fresh --out directory"
                )
            entries[i] = entry
    todo = [i for i in range(len(jobs)) if i not in entries]
    with map_in_order(executor, workers, fn, [jobs[i] for i in todo]) as results:
        bar = tqdm(total=len(jobs), initial=len(entries), desc=desc, unit="shard", disable=not progress)
        for i, entry in zip(todo, results):
            entries[i] = entry
            bar.update(1)
        bar.close()
    return [entries[i] for i in range(len(jobs))], len(jobs) - len(todo)


@contextlib.contextmanager
def results_in_order(
    executor: str, workers: int, recipe_data: dict, ops, units: list, read_opts: dict
) -> Iterator[Iterator[list]]:
    """An iterator over ``process_unit`` results of ``units``, in order; workers are stopped on exit."""
    if executor == "local" and (workers <= 1 or len(units) <= 1):
        yield (process_unit(ops, u, read_opts) for u in units)  # the operators already built here
        return
    with map_in_order(
        executor,
        workers,
        run_one,
        [(recipe_data, u, read_opts) for u in units],
        initializer=_init_worker if executor == "local" else None,
        initargs=(recipe_data,),
    ) as it:
        yield it


@contextlib.contextmanager
def _ray_map(workers: int, fn, jobs: list[tuple]):
    try:
        import ray
    except ImportError:
        raise MMGenError("executor 'ray' needs the ray package: pip install ray") from None
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            num_cpus=None if address else workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    task = ray.remote(num_cpus=1)(fn)

    def gen():
        window = max(2, 2 * workers)
        pending: deque = deque()
        todo = iter(jobs)
        for job in todo:
            pending.append(task.remote(*job))
            if len(pending) >= window:
                break
        while pending:
            out = ray.get(pending.popleft())
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(task.remote(*nxt))
            yield out

    try:
        yield gen()
    finally:
        if started:
            ray.shutdown()
