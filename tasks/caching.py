"""Prefect caching keyed by content: a task's result is reused exactly when its key
(aemnist.caching.stage_key) is unchanged and the files it wrote are intact.

Results are stored as plain data and checked when read (tasks.results): a cache record
this project did not write is refused and its task recomputed, never deserialized."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from prefect.transactions import get_transaction

from aemnist.caching import stage_key
from aemnist.jobs import Job
from aemnist.layout import Layout
from aemnist.plan import Stage
from aemnist.schemas import output_state, remove_stale_temps
from aemnist.tracking import TrackingContext
from tasks.results import CacheStore, RemoteCacheStore, TableRefSerializer, run_logger


@dataclass
class StageCache(CachePolicy):
    """The cache key of a stage's task: its stage, its job (tables by content) and its
    library code (aemnist.caching.stage_key)."""

    stage: str = ""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        return stage_key(self.stage, inputs["job"])


def current_key() -> str | None:
    """The cache key of the running task (its transaction's key): checkpoints are only
    resumed, and outputs only trusted, under the same key."""
    transaction = get_transaction()
    return transaction.key if transaction is not None else None


def job_tags(stage: Stage, job: Job) -> set[str]:
    """The task run's tags, to filter on in the Prefect UI and API: its stage
    (``stage:grid``) and, for a task that computes on a device, that device
    (``device:cpu``, ``device:cuda``)."""
    tags = {f"stage:{stage.name}"}
    compute = getattr(job, "compute", None)
    if compute is not None:
        tags.add(f"device:{compute.device}")
    return tags


def submit_job(
    runner: TaskRunner,
    task: Task,
    stage: Stage,
    job: Job,
    ctx: TrackingContext,
    storage: CacheStore | RemoteCacheStore,
    refresh: bool = False,
) -> PrefectFuture:
    """Submit ``task`` for ``job`` to ``runner``, bound to the work dir's result store (its
    result kept as plain data: tasks.results).

    It is recomputed rather than reused when asked (the stage is in ``--refresh``: its
    checkpoint goes too) or when one of the files it writes is missing, damaged (it does not
    match its recorded SHA-256) or was since overwritten by a task of another config."""
    parameters = {"ctx": ctx, "job": job}
    tags = job_tags(stage, job)
    if not stage.cached:
        return runner.submit(task.with_options(tags=tags), parameters)
    key = stage_key(stage.name, job)
    states = {path: output_state(path, key) for path in stage.writes(job)}
    damaged = [str(path) for path, state in states.items() if state == "damaged"]
    if damaged:
        get_run_logger().warning(
            "%s: damaged (content does not match its recorded SHA-256); recomputing",
            ", ".join(damaged),
        )
    checkpoint = getattr(job, "checkpoint", None)
    if refresh and checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    recompute = refresh or any(state != "intact" for state in states.values())
    configured = task.with_options(
        tags=tags,
        result_storage=storage,
        result_serializer=TableRefSerializer(),
        refresh_cache=recompute,
    )
    return runner.submit(configured, parameters)


SAVE_ATTEMPTS = 5  # of the cache block, racing other runs' first saves on a fresh server


def result_storage(layout: Layout) -> CacheStore | RemoteCacheStore:
    """The work dir's result store (the cache), beside the tables it describes: moving or
    deleting a work dir moves or deletes its cache with it. Saved as a block, so that every
    process of a run (a worker, a Dask worker) finds it.

    Called as a run starts: the work dir and the cache folder are made private (mode 0700),
    and temporary files that killed writers left in the work dir are removed."""
    logger = run_logger()
    for folder, mode in layout.make_private().items():
        if mode & 0o022:
            logger.warning(
                "%s (mode %o, another user's) is writable by others: they can change what "
                "the next run reads",
                folder,
                mode,
            )
    removed = remove_stale_temps(layout.root)
    if removed:
        logger.info(
            "removed %d temporary files left by interrupted writes: %s",
            len(removed),
            ", ".join(str(path) for path in removed),
        )
    storage: CacheStore | RemoteCacheStore = (
        RemoteCacheStore(basepath=str(layout.cache_dir))
        if layout.remote
        else CacheStore(basepath=str(layout.cache_dir))
    )
    # MNIST's block keeps its name (the work dir's); another dataset's cache has its own.
    digest = hashlib.sha256(str(layout.study_dir).encode()).hexdigest()[:16]
    # The first saves on a server race when runs start at once (seen with three deployment
    # runs on a PostgreSQL-backed server): the block's type and schema are registered
    # read-then-create, so the losers get ObjectAlreadyExists; and the server's first block
    # document creates its encryption key, which the losers' documents collide on, reported
    # as "already exists" for a document that does not (ObjectNotFound when overwritten).
    # Saving again, once the winner has committed, reads what it created.
    for attempt in range(SAVE_ATTEMPTS):
        try:
            storage.save(f"aemnist-cache-{digest}", overwrite=True)
            break
        except (ObjectAlreadyExists, ObjectNotFound):
            if attempt == SAVE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return storage
