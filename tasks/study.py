"""Opening and closing the study's parent MLflow run, and the report."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from aemnist.config import StudyConfig, save_config
from aemnist.data import ensure_writable
from aemnist.layout import Layout
from aemnist.report import build_report, report_figures
from aemnist.schemas import read_frame
from aemnist.tracking import (
    TrackingContext,
    finish_study,
    log_to_parent,
    resolve_tracking_uri,
    start_study,
)
from tasks.common import prefect_tags


@task(name="open-study", cache_policy=NO_CACHE)
def open_study(config: StudyConfig, layout: Layout) -> TrackingContext:
    """Check the work dir and the tracking store, save the resolved config, open the parent run."""
    ensure_writable(layout.root)
    save_config(config, layout.config)
    uri = resolve_tracking_uri(layout.root)
    tags = {
        "profile": config.profile,
        "config_hash": config.config_hash(),
        "seed": str(config.seed),
        "workdir": str(layout.root.resolve()),
        **prefect_tags(),
    }
    ctx = start_study(uri, layout.root, f"study-{config.profile}", config.flat(), tags)
    get_run_logger().info("MLflow parent run %s in %s", ctx.parent_run_id, uri)
    return ctx


@task(name="close-study", cache_policy=NO_CACHE)
def close_study(ctx: TrackingContext, status: str) -> None:
    finish_study(ctx, status)


@task(name="report", cache_policy=NO_CACHE)
def write_report(ctx: TrackingContext, config: StudyConfig, layout: Layout) -> Path:
    """Build report.md and its figures; log them to the parent run and as Prefect artifacts."""
    path = build_report(layout, config)
    artifacts = [(path, None)] + [(fig, "figures") for fig in report_figures(layout)]
    artifacts += [(layout.grid_summary, "tables"), (layout.sweep_summary, "tables")]
    final = read_frame(layout.final_metrics, "metrics").set_index("metric")["value"]
    log_to_parent(
        ctx, metrics={f"final_{k}": float(v) for k, v in final.items()}, artifacts=artifacts
    )
    create_markdown_artifact(path.read_text(), key="aemnist-report", description="Study report")
    for key, table in (
        ("aemnist-table-1", layout.grid_summary),
        ("aemnist-table-2", layout.sweep_summary),
    ):
        schema = "grid_summary" if table == layout.grid_summary else "sweep_summary"
        create_table_artifact(read_frame(table, schema).to_dict(orient="records"), key=key)
    get_run_logger().info("report written to %s", path)
    return path
