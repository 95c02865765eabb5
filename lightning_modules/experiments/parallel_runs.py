"""Several `fit` runs at once, each in its own process (compare's `compare.jobs`).

A tiny model on one CPU thread leaves the other cores idle, so a comparison of many small runs
goes about `jobs` times faster when each run has a process and a core of its own. Each run's
output (Lightning, progress bars, warnings) goes to its own log file instead of interleaving on
the terminal. Runs that share a world wait for one another's base build (a file lock in
`core.files.build_once`), so the first runs are those of different worlds.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

from core.errors import UserError, one_line, quiet_lightning_tips
from core.files import open_log
from lightning_modules.run import training


def fit_logged(cfg, log: str) -> float:
    """Run `training.run(cfg)` (one fit) in this worker process with stdout and stderr in `log`; the wall time."""
    sys.stdout.flush(), sys.stderr.flush()
    with open_log(log, what="run log") as out:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)  # the file descriptors: C code and handlers too
        try:
            quiet_lightning_tips()
            start = time.perf_counter()
            training.run(cfg)
            return time.perf_counter() - start
        except UserError as err:  # the log ends with what went wrong, as the terminal would have shown it
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise
        except SystemExit as err:  # a Slurm job pre-empted: submitit requeues it (exit 144 locally)
            print(f"stopped (exit {err.code}): this run goes on from its last checkpoint when requeued",
                  file=sys.stderr)
            raise
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def process_pool_available() -> str | None:
    """None where worker processes can be started; else why not (e.g. no POSIX semaphores in a sandbox)."""
    try:
        multiprocessing.get_context("spawn").Lock()
    except (OSError, ImportError, NotImplementedError) as err:
        return str(err) or type(err).__name__
    return None


def interleave(items: Sequence[Any], group: Callable[[Any], Hashable]) -> list[Any]:
    """Round-robin over the groups, in order of first appearance: [a1, b1, c1, a2, b2, ...]."""
    groups: dict[Hashable, list] = {}
    for item in items:
        groups.setdefault(group(item), []).append(item)
    return [item for batch in itertools.zip_longest(*groups.values()) for item in batch if item is not None]


def run_parallel(tasks: Iterable[tuple[Any, Any, Path]], jobs: int, done: Callable[[Any, float], None],
                 describe: Callable[[Any], str]) -> None:
    """Run each (tag, cfg, log) task in a pool of `jobs` processes; `done(tag, wall_s)` as each one
    finishes. After a failure no new run starts; the runs already going finish (and are recorded)
    before the first error is raised, naming the run and its log."""
    queue = list(tasks)
    # spawn, not fork: a fresh interpreter per worker, no copied threads or locks of the parent
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    running: dict = {}
    failure = None
    try:
        while queue or running:
            while queue and len(running) < jobs:  # submitted one by one: after a failure nothing new starts
                tag, cfg, log = queue.pop(0)
                running[pool.submit(fit_logged, cfg, str(log))] = (tag, log)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                tag, log = running.pop(future)
                try:
                    done(tag, future.result())
                except BrokenProcessPool as err:  # a worker died (killed, out of memory): no Python error
                    failure = failure or (tag, log, UserError(f"its worker process died ({err})"))
                except Exception as err:  # noqa: BLE001 -- reported below, with the run and its log
                    failure = failure or (tag, log, err)
            if failure is not None:
                queue.clear()
    finally:
        # Ctrl-C or an error: nothing new starts; the runs already going finish.
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        tag, log, err = failure
        message = f"run ({describe(tag)}) failed: {err}; its output: {log}"
        if isinstance(err, UserError):
            raise UserError(message) from err
        raise RuntimeError(message) from err
