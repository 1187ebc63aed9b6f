"""The study's own tasks: its parent MLflow run, the report, links to reused results."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE

from aemnist.config import StudyConfig, save_config
from aemnist.data import ensure_writable
from aemnist.datasets import has_reference
from aemnist.faults import FAULT_ENV
from aemnist.jobs import ReportJob
from aemnist.layout import Layout
from aemnist.report import (
    StudyRun,
    build_report,
    load_study_tables,
    report_figures,
    seed_comparison,
)
from aemnist.runtime import machine_tags
from aemnist.schemas import TableRef, read_frame
from aemnist.summaries import flat_table
from aemnist.tracking import (
    TrackingContext,
    finish_study,
    link_reused_runs,
    log_to_parent,
    mark_abandoned_runs,
    parent_run_page,
    resolve_tracking_uri,
    start_study,
)
from tasks.caching import StageCache
from tasks.common import prefect_tags, tracked_run

# The parent run's tag that holds AEMNIST_FAULT when a study runs with it set.
FAULT_TAG = "aemnist.fault"
# The Prefect link artifact, on each flow run, to its study's MLflow parent run.
MLFLOW_LINK_KEY = "mlflow-run"
# Tables 1 and 2 on the parent run as CSV, which the MLflow UI previews.
TABLE_CSVS = {
    "grid_summary": "tables/table1_grid_search.csv",
    "sweep_summary": "tables/table2_size_sweep.csv",
}


@task(name="open-study", cache_policy=NO_CACHE)
def open_study(config: StudyConfig, layout: Layout) -> TrackingContext:
    """Check the work dir and the tracking store, save the resolved config, open the parent
    run, and mark KILLED the runs a killed earlier process left RUNNING.

    A fault hook set in the environment (AEMNIST_FAULT) is logged as a warning and tagged on
    the parent run (``aemnist.fault``): an injected failure must not pass for a real one."""
    logger = get_run_logger()
    fault = os.environ.get(FAULT_ENV, "").strip()
    if fault:
        logger.warning(
            "%s=%r is set: this study's tasks fail or pause where it says (fault injection "
            "for tests and drills); unset it for a real run",
            FAULT_ENV,
            fault,
        )
    ensure_writable(layout.root)
    # Another dataset's folder in the work dir (a store was checked before any task).
    if layout.study_dir != layout.root and not layout.remote:
        ensure_writable(layout.study_dir)
    save_config(config, layout.config)
    uri = resolve_tracking_uri(layout.root)
    tags = {
        "profile": config.profile,
        "config_hash": config.config_hash(),
        "seed": str(config.seed),
        "workdir": str(layout.root),
        **machine_tags(config.runtime.device),
        **prefect_tags(),
    }
    if layout.storage:  # where its tables lie (no credentials: the config refuses them)
        tags["storage"] = layout.storage
    if fault:
        tags[FAULT_TAG] = fault[:5000]
    ctx = start_study(
        uri, layout.root, f"study-{config.profile}", config.flat(), tags, config.data.dataset
    )
    killed = mark_abandoned_runs(uri, ctx.experiment_id)
    if killed:
        logger.warning(
            "marked KILLED %d runs left RUNNING by a killed process: %s",
            len(killed),
            ", ".join(killed),
        )
    # Its page in the UI rather than the tracking URI, which may carry credentials.
    page, how = parent_run_page(ctx, layout.root)
    logger.info("MLflow parent run %s: %s", ctx.parent_run_id, page)
    create_link_artifact(
        page, link_text=f"MLflow run {ctx.parent_run_id}", key=MLFLOW_LINK_KEY, description=how
    )
    return ctx


@task(name="close-study", cache_policy=NO_CACHE)
def close_study(ctx: TrackingContext, status: str) -> None:
    finish_study(ctx, status)


@task(name="link-reused", cache_policy=NO_CACHE)
def link_reused(ctx: TrackingContext, links: dict[str, str]) -> None:
    """Tag the parent run with the earlier runs whose results this study reused."""
    link_reused_runs(ctx, links)


@task(
    name="report",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="report"),
    persist_result=True,
)
def write_report(ctx: TrackingContext, job: ReportJob) -> TableRef:
    """report.md and its figures, from the stored tables."""
    with tracked_run(ctx, job.label, {"tables": len(job.tables)}, "report") as run:
        path = build_report(
            job.layout, job.config, run=StudyRun(ctx.parent_run_id, ctx.experiment_id)
        )
        run.log_artifact(path)
        for figure in report_figures(job.layout):
            run.log_artifact(figure, "figures")
    get_run_logger().info("report written to %s", path)
    return TableRef.of_file(path).with_run(run.run_id)


@task(name="publish", cache_policy=NO_CACHE)
def publish_results(ctx: TrackingContext, config: StudyConfig, layout: Layout) -> None:
    """The study's results on its parent run (headline metrics, report, figures, Tables 1
    and 2) and beside its Prefect flow run (artifacts)."""
    artifacts = [(layout.report, None)] + [(fig, "figures") for fig in report_figures(layout)]
    artifacts += [(layout.grid_summary, "tables"), (layout.sweep_summary, "tables")]
    final = read_frame(layout.final_metrics, "metrics").set_index("metric")["value"]
    metrics = {f"final_{k}": float(v) for k, v in final.items()}
    # Ours beside the seed's, with the ratios and the targets met: comparable across runs.
    # The seed studied MNIST only: another dataset's study has nothing to compare with.
    if has_reference(config.data.dataset):
        metrics |= seed_comparison(load_study_tables(layout, config))
    tables = {
        schema: flat_table(read_frame(path, schema))
        for schema, path in (
            ("grid_summary", layout.grid_summary),
            ("sweep_summary", layout.sweep_summary),
        )
    }
    csvs = {TABLE_CSVS[schema]: frame for schema, frame in tables.items()}
    log_to_parent(ctx, metrics=metrics, artifacts=artifacts, tables=csvs)
    create_markdown_artifact(
        layout.report.read_text(), key="aemnist-report", description="Study report"
    )
    for key, schema in (("aemnist-table-1", "grid_summary"), ("aemnist-table-2", "sweep_summary")):
        create_table_artifact(tables[schema].to_dict(orient="records"), key=key)
