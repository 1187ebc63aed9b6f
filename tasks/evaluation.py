"""Evaluation stages of the final model: corruption curves and the t-SNE map."""

from __future__ import annotations

from prefect import get_run_logger, task

from aemnist.corruption import corruption_curves, examples_frame, levels_of
from aemnist.data import load_images
from aemnist.embedding import embed
from aemnist.jobs import CorruptionJob, EmbeddingJob
from aemnist.model import load_checkpoint
from aemnist.runtime import set_torch_threads
from aemnist.schemas import TableRef, metrics_frame, write_table
from aemnist.tracking import TrackingContext
from tasks.caching import StageCache
from tasks.common import tracked_run


@task(
    name="corruption",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="corruption"),
    persist_result=True,
)
def evaluate_corruption(ctx: TrackingContext, job: CorruptionJob) -> TableRef:
    """Reconstruction MSE under Gaussian noise and occlusion, with the input's own MSE."""
    corruption, device, seed, layout = job.corruption, job.compute.device, job.seed, job.layout
    levels = levels_of(corruption)
    params = {"n_images": corruption.n_images, "clip": corruption.clip, **levels, "device": device}
    with tracked_run(ctx, job.label, params, "corruption") as run:
        set_torch_threads(job.compute.threads)
        images = load_images(job.test.path, job.test_limit).images
        if corruption.n_images:
            images = images[: corruption.n_images]
        net = load_checkpoint(job.model.path)
        table = corruption_curves(
            net, images, levels, seed, job.training.eval_batch_size, device, corruption.clip
        )
        ref = write_table(table, layout.corruption, "corruption")
        examples = examples_frame(net, images[0], levels, seed, corruption.clip)
        write_table(examples, layout.corruption_examples, "corruption_examples")
        for kind in levels:
            for i, row in enumerate(table[table.kind == kind].itertuples()):
                run.log_metrics(
                    {f"{kind}_mse": row.mse, f"{kind}_baseline_mse": row.baseline_mse}, step=i
                )
        run.log_artifact(ref.path, "tables")
        run.log_artifact(layout.corruption_examples, "tables")
    get_run_logger().info("corruption: %d levels measured on %d images", len(table), len(images))
    return ref.with_run(run.run_id)


@task(
    name="embedding",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="embedding"),
    persist_result=True,
)
def map_embedding(ctx: TrackingContext, job: EmbeddingJob) -> TableRef:
    """Encode test images, map them to 2-D with t-SNE, measure how well the digits separate."""
    embedding, device, seed, layout = job.embedding, job.compute.device, job.seed, job.layout
    params = {
        "n_images": embedding.n_images,
        "perplexity": embedding.perplexity,
        "knn": embedding.knn,
        "seed": embedding.seed_for(seed),
        "device": device,
    }
    with tracked_run(ctx, job.label, params, "embedding") as run:
        set_torch_threads(job.compute.threads)
        table, metrics = embed(
            load_checkpoint(job.model.path),
            load_images(job.test.path, job.test_limit),
            embedding.n_images,
            embedding.perplexity,
            embedding.knn,
            embedding.seed_for(seed),
            device,
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
    return ref.with_run(run.run_id)
