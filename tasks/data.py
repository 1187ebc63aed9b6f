"""The data stages: download MNIST, assign folds."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aemnist.config import StudyConfig
from aemnist.data import download_mnist, load_images, make_folds
from aemnist.layout import Layout
from aemnist.schemas import TableRef, write_table
from aemnist.tracking import TrackingContext, task_run
from tasks.common import prefect_tags


@task(name="download", cache_policy=NO_CACHE)
def download(ctx: TrackingContext, layout: Layout, mirror: str | None) -> dict[str, TableRef]:
    """MNIST into ``data/mnist_{train,test}.parquet``; nothing is fetched if they are verified."""
    logger = get_run_logger()
    with task_run(ctx, "download", {"mirror": mirror or "torchvision"}, prefect_tags()) as run:
        refs, fetched = download_mnist(layout.data_dir, mirror)
        run.log_metrics({f"{split}_rows": ref.rows for split, ref in refs.items()})
        run.set_tags({"fetched": str(fetched)})
    logger.info(
        "MNIST %s: %s",
        "downloaded and verified" if fetched else "already verified, nothing fetched",
        ", ".join(f"{s} {r.rows} rows" for s, r in refs.items()),
    )
    return refs


@task(name="folds", cache_policy=NO_CACHE)
def assign_folds(
    ctx: TrackingContext, config: StudyConfig, layout: Layout, train: TableRef
) -> TableRef:
    with task_run(
        ctx, "folds", {"folds": config.grid.folds, "seed": config.seed}, prefect_tags()
    ) as run:
        images = load_images(train.path, config.data.train_limit)
        table = make_folds(images.idx, images.labels, config.grid.folds, config.seed)
        ref = write_table(table, layout.folds, "folds")
        run.log_metrics({"rows": ref.rows})
        run.log_artifact(ref.path, "tables")
    return ref
