"""Evaluation stages of the final model: corruption curves and the t-SNE map."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aemnist.config import StudyConfig
from aemnist.corruption import corruption_curves, corruption_examples
from aemnist.data import load_images
from aemnist.embedding import embed
from aemnist.layout import Layout
from aemnist.model import load_checkpoint
from aemnist.runtime import set_torch_threads
from aemnist.schemas import TableRef, metrics_frame, write_table
from aemnist.tracking import TrackingContext, task_run
from tasks.common import prefect_tags


@task(name="corruption", cache_policy=NO_CACHE)
def corruption(
    ctx: TrackingContext,
    config: StudyConfig,
    layout: Layout,
    test: TableRef,
    model: TableRef,
    threads: int,
) -> TableRef:
    """Reconstruction MSE under Gaussian noise and occlusion, with the input's own MSE."""
    levels = {
        "noise": config.corruption.noise_levels,
        "occlusion": config.corruption.occlusion_levels,
    }
    with task_run(
        ctx, "corruption", {"n_images": config.corruption.n_images, **levels}, prefect_tags()
    ) as run:
        set_torch_threads(threads)
        images = load_images(test.path, config.data.test_limit).images
        if config.corruption.n_images:
            images = images[: config.corruption.n_images]
        net = load_checkpoint(layout.final_model)
        table = corruption_curves(net, images, levels, config.seed)
        ref = write_table(table, layout.corruption, "corruption")
        examples = []
        for kind, kind_levels in levels.items():
            corrupted, restored = corruption_examples(
                net, images[0], kind, kind_levels, config.seed
            )
            for level, c, r in zip(kind_levels, corrupted, restored, strict=True):
                examples.append(
                    {
                        "kind": kind,
                        "level": level,
                        "corrupted": c.reshape(-1),
                        "restored": r.reshape(-1),
                    }
                )
        write_table(pd.DataFrame(examples), layout.corruption_examples, "corruption_examples")
        for kind in levels:
            for i, row in enumerate(table[table.kind == kind].itertuples()):
                run.log_metrics(
                    {f"{kind}_mse": row.mse, f"{kind}_baseline_mse": row.baseline_mse}, step=i
                )
        run.log_artifact(ref.path, "tables")
        run.log_artifact(layout.corruption_examples, "tables")
    get_run_logger().info("corruption: %d levels measured on %d images", len(table), len(images))
    return ref


@task(name="embedding", cache_policy=NO_CACHE)
def embedding(
    ctx: TrackingContext,
    config: StudyConfig,
    layout: Layout,
    test: TableRef,
    model: TableRef,
    threads: int,
) -> TableRef:
    """Encode test images, map them to 2-D with t-SNE, measure how well the digits separate."""
    params = {
        "n_images": config.embedding.n_images,
        "perplexity": config.embedding.perplexity,
        "knn": config.embedding.knn,
    }
    with task_run(ctx, "embedding", params, prefect_tags()) as run:
        set_torch_threads(threads)
        table, metrics = embed(
            load_checkpoint(layout.final_model),
            load_images(test.path, config.data.test_limit),
            config.embedding.n_images,
            config.embedding.perplexity,
            config.embedding.knn,
            config.seed,
        )
        ref = write_table(table, layout.embedding, "embedding")
        write_table(metrics_frame(metrics), layout.embedding_metrics, "metrics")
        run.log_metrics(metrics)
        run.log_artifact(ref.path, "tables")
        run.log_artifact(layout.embedding_metrics, "tables")
    get_run_logger().info(
        "embedding: k-NN accuracy %.3f in 2-D, %.3f in the latent space",
        metrics["knn_accuracy_tsne"],
        metrics["knn_accuracy_latent"],
    )
    return ref
