"""The data stages: download MNIST, assign folds."""

from __future__ import annotations

from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from aemnist.data import (
    MirrorUnreachable,
    download_mnist,
    load_images,
    make_folds,
    mirror_to_fetch,
    redact_url,
)
from aemnist.datasets import dataset_spec
from aemnist.jobs import DownloadJob, FoldsJob
from aemnist.schemas import TableRef, write_table
from aemnist.tracking import TrackingContext
from tasks.caching import StageCache
from tasks.common import tracked_run


def _network_error(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a download only on transient network errors (a 5xx, a timeout, a reset): a wrong
    file stays wrong, and a refused connection or an unknown host fails at once."""
    try:
        state.result()
    except MirrorUnreachable:
        return True
    except Exception:
        return False
    return False


# Not cached by Prefect: the download checks its own tables (their pinned hashes) and
# fetches nothing when they are verified.
@task(
    name="download",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_network_error,
)
def download(ctx: TrackingContext, job: DownloadJob) -> dict[str, TableRef]:
    """The study's dataset into ``data/<dataset>_{train,test}.parquet`` (MNIST's in the work
    dir, another's in its folder there); nothing is fetched if they are verified.

    The job records the mirror redacted (aemnist.plan gets it so from flows.study): Prefect
    and MLflow see no credentials. The URL that carries them is read here, from
    AEMNIST_MNIST_MIRROR (aemnist.data.mirror_to_fetch)."""
    logger = get_run_logger()
    shown = redact_url(job.mirror) if job.mirror else "torchvision"
    with tracked_run(ctx, job.label, {"mirror": shown}, "download") as run:
        mirror = mirror_to_fetch(job.mirror)
        refs, fetched = download_mnist(
            job.layout.data_dir, mirror, force=job.force, dataset=job.layout.dataset
        )
        run.log_metrics({f"{split}_rows": ref.rows for split, ref in refs.items()})
        run.set_tags({"fetched": str(fetched)})
    logger.info(
        "%s %s: %s",
        dataset_spec(job.layout.dataset).title,
        f"downloaded from {shown} and verified" if fetched else "already verified, nothing fetched",
        ", ".join(f"{s} {r.rows} rows" for s, r in refs.items()),
    )
    return {split: ref.with_run(run.run_id) for split, ref in refs.items()}


@task(
    name="folds",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="folds"),
    persist_result=True,
)
def assign_folds(ctx: TrackingContext, job: FoldsJob) -> TableRef:
    """A seeded, stratified k-fold assignment of the training images."""
    with tracked_run(ctx, job.label, {"folds": job.k, "seed": job.seed}, "folds") as run:
        images = load_images(job.train.path, job.train_limit)
        folds = make_folds(images.idx, images.labels, job.k, job.seed)
        ref = write_table(folds, job.layout.folds, "folds")
        run.log_metrics({"rows": ref.rows})
        run.log_artifact(ref.path, "tables")
    return ref.with_run(run.run_id)
