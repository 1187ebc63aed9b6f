"""The ``study`` flow: every stage of the seed's study, chained through parquet tables.

The stages, their jobs and the files they write are declared once, in aemnist.plan; this
flow resolves the study, sizes its task runner, and submits each declared stage's jobs to
the task wrapper below, stage after stage. Each task is keyed by content (tasks.caching): a
re-run reuses every result whose job and code are unchanged and whose files are intact, and
recomputes the rest.

Every launch path runs this same function: `aemnist run`, a deployment on a worker, a Dask
run (``task_runner="dask"``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from aemnist import plan
from aemnist.config import (
    MIRROR_ENV,
    SEED_MAX,
    ConfigError,
    Dataset,
    Device,
    Profile,
    load_config,
    run_overrides,
)
from aemnist.jobs import FoldGroupJob, Job, SizeGroupJob
from aemnist.machine_slots import MachineSlots, slot_folder
from aemnist.runtime import prepare_device, with_resolved_device
from aemnist.storage import check_storage
from aemnist.workdir import hold_workdir
from deployments.dask_tls import DaskTLS
from tasks.aggregate import summarise_grid, summarise_sweep
from tasks.caching import result_storage, submit_job
from tasks.data import assign_folds, download
from tasks.evaluation import evaluate_corruption, map_embedding
from tasks.slots import machine_slots, set_training_slots
from tasks.study import close_study, link_reused, open_study, publish_results, write_report
from tasks.training import final_model, grid_fold, grid_stack, sweep_size, sweep_stack

DEFAULT_WORKDIR = "aemnist-runs"
LOOPBACK = "127.0.0.1"

# The task wrapping each declared stage's library call.
STAGE_TASKS: dict[str, Task[..., Any]] = {
    "download": download,
    "folds": assign_folds,
    "grid": grid_fold,
    "grid-summary": summarise_grid,
    "sweep": sweep_size,
    "sweep-summary": summarise_sweep,
    "final": final_model,
    "corruption": evaluate_corruption,
    "embedding": map_embedding,
    "report": write_report,
}

# Jobs a stage's task does not run: the grid's and the sweep's stacked groups
# (runtime.stacked_cells).
JOB_TASKS: dict[type, Task[..., Any]] = {FoldGroupJob: grid_stack, SizeGroupJob: sweep_stack}


def task_for(stage: str, job: Job) -> Task[..., Any]:
    return JOB_TASKS.get(type(job), STAGE_TASKS[stage])


# The flow's parameters, typed so that Prefect validates them and the UI's custom-run form
# offers the choices: the profiles and devices are the config's, the stages the plan's.
StageName = Literal[tuple(plan.STAGES)]  # type: ignore[valid-type]
RunnerKind = Literal["threads", "dask"]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="the study's seed")]
Repeats = Annotated[
    int, Field(ge=1, description="seeds of the grid, the sweep and the final model")
]


class StageFailed(RuntimeError):
    """Some tasks of a stage failed; names them."""


def prepare_study(
    profile: str | None,
    workdir: str,
    config_file: str | None,
    mnist_mirror: str | None,
    overrides: dict[str, Any],
    redo: frozenset[str],
) -> plan.Study:
    """Load and validate the config, then resolve it (device, task slots, torch threads):
    the one place every launch path goes through.

    The mirror (``mnist_mirror``, else AEMNIST_MNIST_MIRROR) is checked here, before any
    task, and enters the study redacted: the download task reads a URL's credentials from
    AEMNIST_MNIST_MIRROR, so that they reach no Prefect task run, MLflow run or log."""
    from aemnist.data import check_mirror, has_secrets, redact_url
    from aemnist.datasets import dataset_spec

    config = load_config(profile, Path(config_file) if config_file else None, overrides)
    if config.runtime.storage:
        check_storage(config.runtime.storage)  # one line, before any task
    configured = os.environ.get(MIRROR_ENV) or None
    mirror = mnist_mirror or configured
    if mirror is not None:
        check_mirror(mirror, dataset_spec(config.data.dataset).title)
        if has_secrets(mirror) and mirror != configured:
            # A deployment's parameter: Prefect has recorded it already; the tasks of this
            # process (and the Dask workers it starts) read it from the environment.
            os.environ[MIRROR_ENV] = mirror
            get_run_logger().warning(
                "the mnist_mirror parameter %s carries credentials or a query string, which "
                "Prefect stores with the flow run's parameters: set %s in the worker's "
                "environment instead",
                redact_url(mirror),
                MIRROR_ENV,
            )
    study = plan.resolve_study(config, Path(workdir), redact_url(mirror) if mirror else None, redo)
    prepare_device(study.config.runtime.device)
    return study


def task_runner_for(
    study: plan.Study, kind: str, dask_address: str | None, dask_security: DaskTLS | None = None
) -> TaskRunner:
    """The task runner sized from the resolved study: ``study.workers`` tasks side by side,
    in threads, or on a Dask cluster (an existing one at ``dask_address``, over mutual TLS
    with ``dask_security``'s files or those of Dask's config, else a local one of
    single-threaded worker processes: each task sets its own torch threads)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=study.workers)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        if dask_security is None:  # Dask's client reads its config's TLS files itself
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            address=dask_address, client_kwargs={"security": dask_security.security()}
        )
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": study.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": LOOPBACK,
        }
    )


def _producers(label: str, result: Any) -> dict[str, str]:
    """The MLflow runs that produced a task's result, by their names: the task's own, or
    each cell's of a stacked group (its tables by cell label)."""
    if isinstance(result, dict):
        return {cell: getattr(ref, "run_id", "") for cell, ref in result.items()}
    return {label: getattr(result, "run_id", "")}


def _await_stage(stage: str, futures: dict[str, PrefectFuture]) -> None:
    """Wait for every task of a stage (a failure does not cancel the others), reporting
    progress as they finish."""
    logger = get_run_logger()
    total = len(futures)
    # A stage of several tasks shows its progress in the Prefect UI; each update is a round
    # trip to the server, so at most one a second (and the last): cached tasks finish by
    # the dozen within milliseconds.
    progress = (
        create_progress_artifact(0.0, description=f"{stage}: tasks finished (%)")
        if total > 1
        else None
    )
    shown = time.monotonic()
    for done, future in enumerate(as_completed(list(futures.values())), start=1):
        future.wait()  # as_completed can yield before the future's final state is readable
        logger.info("[%s] %d/%d tasks finished", stage, done, total)
        if progress is not None and (done == total or time.monotonic() - shown >= 1.0):
            update_progress_artifact(progress, 100.0 * done / total)
            shown = time.monotonic()


def collect(ctx: Any, wave: dict[str, dict[str, PrefectFuture]]) -> dict[str, list[Any]]:
    """Wait for every task of the stages of one wave, link reused results to the parent run,
    then return each stage's results in job order, or name the tasks that failed."""
    for stage, futures in wave.items():
        _await_stage(stage, futures)
    failures = []
    causes = []
    for stage, futures in wave.items():
        failed = [label for label, future in futures.items() if not future.state.is_completed()]
        if failed:
            failures.append(
                f"{stage}: {len(failed)} of {len(futures)} tasks failed: {', '.join(failed)}"
            )
            # The cause, in the terminal too: on a Dask worker it is otherwise only in that
            # worker's log and the Prefect UI.
            message = (futures[failed[0]].state.message or "").splitlines()
            if message:
                causes.append(f"{failed[0]}: {message[0]}")
    if failures:
        raise StageFailed(
            f"{'; '.join(failures)} ({'; '.join(causes) or 'see the log above'}); what completed "
            f"is kept: fix the cause and run the study again to re-run only what failed"
        )
    results: dict[str, list[Any]] = {}
    for stage, futures in wave.items():
        results[stage] = [future.result() for future in futures.values()]
        reused = {
            run: producer
            for (label, future), result in zip(futures.items(), results[stage], strict=True)
            if future.state.name == "Cached"
            for run, producer in _producers(label, result).items()
        }
        if reused:
            cached = sum(future.state.name == "Cached" for future in futures.values())
            get_run_logger().info(
                "[%s] %d/%d results reused from earlier runs", stage, cached, len(futures)
            )
            link_reused(ctx, reused)
    return results


def run_stages(study: plan.Study, runner: TaskRunner) -> str:
    """Every declared stage, in order, each stage's jobs side by side on ``runner``; the
    stages of one wave (the evaluations) too. Returns the report's path."""
    ctx = open_study(study.config, study.layout)
    storage = result_storage(study.layout)
    results: dict[str, list[Any]] = {}
    try:
        for wave in plan.waves():
            submitted = {
                stage.name: {
                    job.label: submit_job(
                        runner,
                        task_for(stage.name, job),
                        stage,
                        job,
                        ctx,
                        storage,
                        refresh=stage.name in study.redo,
                    )  # fmt: skip
                    for job in stage.jobs(study, results)
                }
                for stage in wave
            }
            results |= collect(ctx, submitted)
        publish_results(ctx, study.config, study.layout)
    except BaseException:
        close_study(ctx, "FAILED")
        raise
    close_study(ctx, "FINISHED")
    return results["report"][0].path


def study_run_name() -> str:
    """The flow run's name: its profile, seed and config hash (the hash the parent MLflow run
    is tagged with, of the config with its device resolved), e.g. ``smoke seed=0
    config=0123456789ab``. A config that does not load names the run after its profile; the
    flow then stops with the config's error."""
    parameters = flow_run.parameters
    config_file = parameters.get("config_file")
    try:
        config = with_resolved_device(
            load_config(
                parameters.get("profile"),
                Path(config_file) if config_file else None,
                run_overrides(
                    parameters.get("seed"),
                    parameters.get("device"),
                    parameters.get("repeats"),
                    parameters.get("dataset"),
                    parameters.get("storage"),
                ),
            )
        )
    except (ConfigError, OSError):
        return f"{parameters.get('profile') or 'study'} (config not loaded)"
    dataset = "" if config.data.dataset == "mnist" else f" {config.data.dataset}"
    return f"{config.profile}{dataset} seed={config.seed} config={config.config_hash()[:12]}"


@flow(name="study", flow_run_name=study_run_name)
def study(
    profile: Profile | None = None,
    workdir: str = DEFAULT_WORKDIR,
    config_file: str | None = None,
    mnist_mirror: str | None = None,
    seed: Seed | None = None,
    fresh: bool = False,
    refresh: list[StageName] | None = None,
    device: Device | None = None,
    repeats: Repeats | None = None,
    dataset: Dataset | None = None,
    storage: str | None = None,
    task_runner: RunnerKind = "threads",
    dask_address: str | None = None,
    dask_security: DaskTLS | None = None,
    share_slots: bool = True,
) -> str:
    """Run the whole study; returns the path of the report.

    ``profile`` (default: the config file's, else quick) and ``config_file`` (a TOML file
    overriding any field) give the config; ``seed``, ``device`` (auto, cpu or cuda) and
    ``repeats`` (seeds of the grid, the sweep and the final model) and ``dataset`` (mnist,
    fashion-mnist or kmnist) and ``storage`` (an object store's URL for the study's files)
    override its fields. ``fresh``
    recomputes every stage; ``refresh`` names stages to recompute with every stage that
    follows from them. ``task_runner`` runs the tasks in threads or on Dask (at
    ``dask_address``, with ``dask_security``'s TLS files for a tls:// scheduler, else a local
    cluster), sized by the config's runtime section. ``share_slots``: training tasks hold
    slots of this machine's limit on the Prefect server, shared by every study on it; off
    (for a server no other study uses: `aemnist run`'s temporary one), they hold this
    machine's slot lock files instead (aemnist.machine_slots), shared by the user's studies
    on this machine whatever server they run on."""
    resolved = prepare_study(
        profile,
        workdir,
        config_file,
        mnist_mirror,
        run_overrides(seed, device, repeats, dataset, storage),
        plan.refreshed_stages(fresh, refresh),
    )
    # One study at a time in a work dir, on every launch path: `aemnist run` holds the lock
    # already; a deployment run takes it here, before any task writes there.
    from aemnist.data import ensure_writable

    ensure_writable(resolved.layout.root)
    hold_workdir(resolved.layout.root)
    resolved_device = resolved.config.runtime.device
    if share_slots:
        slots: str | MachineSlots = set_training_slots(resolved_device, resolved.workers)
        where = f"{slots}, shared by the studies on this Prefect server"
    else:
        slots = machine_slots(resolved_device, resolved.workers)
        where = f"{slots.name} lock files in {slot_folder()}, shared by this user's studies here"
    resolved = dataclasses.replace(resolved, slots=slots)
    get_run_logger().info("training slots: %d of %s", resolved.workers, where)
    # The decorator's default runner runs nothing: every task goes to this one, sized from
    # the resolved config on every launch path.
    with task_runner_for(resolved, task_runner, dask_address, dask_security) as runner:
        return run_stages(resolved, runner)
