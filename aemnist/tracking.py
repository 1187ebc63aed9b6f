"""MLflow: the one module that talks to the tracking store.

One parent run per study, one nested run per task. Everything goes through an explicit
``MlflowClient`` and run ids rather than MLflow's process-global active run, so tasks running
in parallel threads or processes never log into each other's runs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from aemnist.storage import as_path, is_remote, is_url
from aemnist.workdir import sqlite_url

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from aemnist.jobs import TableUse

EXPERIMENT = "aemnist"
REGISTERED_MODEL = "aemnist-autoencoder"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# MLflow 3's UI opens an experiment on its GenAI overview unless it takes it for a
# machine-learning one: by this tag where the UI reads it (the kind its experiment settings
# set), and in MLflow 3.17's UI, which takes the kind from its "GenAI | Model training"
# toggle instead, by this query on every link to it (the toggle then follows the link).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "?workflowType=machine_learning"
# Kinds the UI infers and records by itself: replaced by ours; a kind a user chose is kept.
_INFERRED_KINDS = {"", "no_inferred_type", "genai_development_inferred",
                   "custom_model_development_inferred"}  # fmt: skip
# The registered model's alias of the newest finished paper-profile version. (MLflow reserves
# the alias "latest" and resolves ``models:/NAME@latest`` to the newest version itself.)
CHAMPION = "champion"
CHAMPION_PROFILE = "paper"
# Where `aemnist ui` serves the embedded store by default (flows/cli/stack_commands.py).
DEFAULT_UI_URL = "http://127.0.0.1:5000"
# MLflow keeps at most 36 characters of a dataset's digest: the SHA-256's first 36 hex
# digits (144 bits); the whole SHA-256 is in the dataset's profile.
_DIGEST_CHARS = 36
# Attempts at logging a run's dataset inputs, racing other tasks that log the same dataset.
_INPUT_ATTEMPTS = 4

# A tracking server with authentication: MLflow's client sends these as basic auth.
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
# MLflow caps a parameter value at 6000 characters and a batch at 100 params / 1000 metrics.
_PARAM_BATCH = 100
_METRIC_BATCH = 1000


def registered_model(dataset: str) -> str:
    """The registered model a study's final models go to: MNIST's the one it always was,
    another dataset's its own (``aemnist-autoencoder-fashion-mnist``), so that their
    versions and aliases (``champion``, ``latest-<profile>``) never mix."""
    return REGISTERED_MODEL if dataset == "mnist" else f"{REGISTERED_MODEL}-{dataset}"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; says which and how to fix it."""


@dataclass(frozen=True)
class TrackingContext:
    """Where a study logs: passed to every task so it can open its nested run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    # The study's dataset (data.dataset): a tag and a parameter of every run it opens, so
    # that the runs of studies on different datasets in one store are told apart.
    dataset: str = "mnist"


def embedded_tracking_uri(workdir: Path) -> str:
    """The SQLite store in the work dir as a SQLAlchemy URL (escaped: ``sqlite_url``)."""
    return sqlite_url(workdir / "mlflow.db")


def resolve_tracking_uri(workdir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store in the work dir."""
    return os.environ.get(TRACKING_ENV) or embedded_tracking_uri(workdir)


def artifact_root(workdir: Path) -> str:
    return (workdir / "mlartifacts").resolve().as_uri()


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a tracking server does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} is unreachable ({exc}); start it "
            f"(`aemnist server` or `mlflow server`) or unset {TRACKING_ENV} to use the "
            f"embedded store in the work dir"
        ) from exc
    _check_credentials(tracking_uri, timeout)


def _check_credentials(tracking_uri: str, timeout: float) -> None:
    """One clear error when a tracking server with authentication refuses this process's
    credentials (MLflow's client would fail later, on the first run it logs)."""
    url = tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    headers = {}
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return  # not ours to judge: the client says what is wrong when it logs
        given = "were refused" if user and password else "are not set"
        raise TrackingError(
            f"the MLflow tracking server {tracking_uri} asks for credentials and "
            f"{USERNAME_ENV}/{PASSWORD_ENV} {given}: load the ones `aemnist server --auth` "
            f"wrote (`set -a; . WORKDIR/server/credentials.env; set +a`)"
        ) from None
    except (urllib.error.URLError, OSError):
        return


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if need be, and marked as a machine-learning experiment
    (the UI then opens it on its runs list), also when it was created before this mark."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and our create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG, "") in _INFERRED_KINDS:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _stringify(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _process_tags() -> dict[str, str]:
    """Which process owns a run: lets a later start tell a killed run from a live one."""
    return {"aemnist.host": socket.gethostname(), "aemnist.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_abandoned_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this host that no longer exists
    (a kill -9, a crash); runs of live processes and of other hosts are left alone."""
    client = MlflowClient(tracking_uri)
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`aemnist.host` = '{host}'",
        max_results=5000,
    )
    killed = []
    for run in runs:
        pid = run.data.tags.get("aemnist.pid", "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_name or run.info.run_id)
    return killed


def _tag_key(label: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", label)


def link_reused_runs(ctx: TrackingContext, links: Mapping[str, str]) -> None:
    """Tag the parent run with the runs that produced the results this study reused."""
    if links:
        TaskRun(ctx, ctx.parent_run_id).set_tags(
            {f"reused.{_tag_key(label)}": run_id for label, run_id in links.items()}
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, _stringify(v)) for k, v in params.items()]
    for start in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAM_BATCH], synchronous=True)


def open_store(tracking_uri: str, workdir: Path) -> str:
    """Check that the tracking store answers and holds the study's experiment (creating the
    embedded database, or migrating it, on first use); return the experiment's id.

    MLflow keeps the opened store for the process: `aemnist run` calls this while its
    temporary Prefect server starts, and the study's parent run opens without that wait."""
    check_reachable(tracking_uri)
    try:
        return _experiment_id(
            MlflowClient(tracking_uri),
            EXPERIMENT,
            None if tracking_uri.startswith("http") else artifact_root(workdir),
        )
    except Exception as exc:
        raise TrackingError(
            f"cannot open the MLflow store {tracking_uri} ({exc}); check {TRACKING_ENV} "
            f"or that the work dir {workdir} is writable"
        ) from exc


def start_study(
    tracking_uri: str,
    workdir: Path,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    dataset: str = "mnist",
) -> TrackingContext:
    """Open the study's parent run (parameters: the whole resolved config), tagged and
    parametrised with its ``dataset``, as its nested runs will be (``task_run``)."""
    experiment_id = open_store(tracking_uri, workdir)
    client = MlflowClient(tracking_uri)
    all_tags = {**tags, "dataset": dataset, **_process_tags()}
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    _log_params(client, run.info.run_id, {**params, "dataset": dataset})
    return TrackingContext(tracking_uri, experiment_id, run.info.run_id, dataset)


def finish_study(ctx: TrackingContext, status: str = "FINISHED") -> None:
    MlflowClient(ctx.tracking_uri).set_terminated(ctx.parent_run_id, status=status)


def _public_url(url: str) -> str:
    """``url`` without its user, password, query and fragment: fit for a log or a link."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def ui_page(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The page of the experiment's runs (or of one run) in the MLflow UI of the store at
    ``tracking_uri``: a tracking server's own UI, else the one `aemnist ui` serves by default.
    It opens on runs, not on the GenAI overview; credentials in the URI stay out of it."""
    base = DEFAULT_UI_URL
    if tracking_uri.startswith(("http://", "https://")):
        base = _public_url(tracking_uri)
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/{path}{UI_QUERY}"


def parent_run_page(ctx: TrackingContext, workdir: Path) -> tuple[str, str]:
    """The study's parent run in the MLflow UI: its URL, and a line saying how to open it.

    On a tracking server, the server's own UI; on the work dir's embedded store, the UI that
    `aemnist ui --workdir WORKDIR` serves (port 5000 unless told otherwise); on another store,
    an MLflow UI serving it. Credentials in the tracking URI never reach the URL or the line."""
    uri = ctx.tracking_uri
    page = ui_page(uri, ctx.experiment_id, ctx.parent_run_id)
    if uri.startswith(("http://", "https://")):
        return page, f"The study's MLflow run on the tracking server {_public_url(uri)}."
    if uri == embedded_tracking_uri(workdir):
        how = f"`aemnist ui --workdir {workdir.resolve()}` serves it"
    else:
        how = f"an MLflow UI serving the store {_public_url(uri)} on port 5000 shows it"
    return page, f"The study's MLflow run: {how}; then open this link."


def _duplicate_key(exc: MlflowException) -> bool:
    """Whether the tracking store refused a write for a key another writer stored first
    (PostgreSQL's unique_violation, SQLite's UNIQUE constraint)."""
    text = str(exc)
    return "UniqueViolation" in text or "UNIQUE constraint failed" in text


class TaskRun:
    """A nested run of the study's parent run: one per task."""

    def __init__(self, ctx: TrackingContext, run_id: str) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self.client = MlflowClient(ctx.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        _log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = _now_ms()
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(
                self.run_id, metrics=items[start : start + _METRIC_BATCH], synchronous=True
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True
        )

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Log the file ``path`` (in the work dir, or in the study's object store: fetched
        to a local copy of the same name first, as MLflow logs local files)."""
        path = as_path(path)
        if not is_remote(path):
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="aemnist-artifact-") as folder:
            local = Path(folder) / path.name
            local.write_bytes(path.read_bytes())
            self.client.log_artifact(self.run_id, str(local), artifact_path)

    def log_inputs(self, uses: Sequence[TableUse]) -> None:
        """Log the tables the task read as the run's dataset inputs: metadata only (where
        each table is, its schema, its SHA-256 and rows), the split as its context."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from aemnist.schemas import SCHEMAS

        inputs = []
        for use in uses:
            profile: dict[str, Any] = {"sha256": use.table.sha256}
            if use.table.rows >= 0:
                profile["rows"] = use.table.rows
            if use.limit:
                profile["rows_read"] = use.limit
            dataset = Dataset(
                name=use.name,
                digest=use.table.sha256[:_DIGEST_CHARS],
                source_type=_source_type(use.table.path),
                source=json.dumps({"uri": _source_uri(use.table.path)}),
                schema=json.dumps({"mlflow_colspec": _colspec(SCHEMAS[use.schema])}),
                profile=json.dumps(profile),
            )
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, use.context)]))
        # The server looks a dataset up and inserts it if absent, in one transaction: tasks
        # logging the same table at once (a study's folds, every study's MNIST) race there,
        # and on PostgreSQL the loser's insert breaks the unique key. Logging again, once
        # the winner has committed, links the dataset it stored.
        for attempt in range(_INPUT_ATTEMPTS):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as exc:
                if attempt == _INPUT_ATTEMPTS - 1 or not _duplicate_key(exc):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_pytorch_model(
        self, model: Any, input_example: Any, registered_name: str | None = None
    ) -> str:
        """Log ``model`` with its signature and input example and register it; returns the
        registered version."""
        import numpy as np
        import torch
        import torchvision
        from mlflow.models import infer_signature

        with torch.inference_mode():
            output = model(torch.from_numpy(input_example)).numpy()
        signature = infer_signature(input_example, output)
        registered_name = registered_name or registered_model(self.ctx.dataset)
        # Naming the requirements spares MLflow a slow subprocess that infers them.
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
        ]
        # The model logger needs MLflow's global tracking URI, whose setter also exports it
        # to the environment: restore both afterwards so nothing leaks into later runs.
        env_before = os.environ.get(TRACKING_ENV)
        mlflow.set_tracking_uri(self.ctx.tracking_uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=signature,
                    input_example=input_example,
                    registered_model_name=registered_name,
                    pip_requirements=requirements,
                )
        finally:
            mlflow.set_tracking_uri(None)
            if env_before is not None:
                os.environ[TRACKING_ENV] = env_before
        version = info.registered_model_version
        self.set_tags({"registered_model": f"{registered_name}/{version}"})
        return str(version)


@contextmanager
def task_run(
    ctx: TrackingContext,
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[TaskRun]:
    """A nested run that ends FINISHED, or FAILED (with the error as a tag) if the body raises.
    Its study's dataset is a tag and a parameter of it."""
    client = MlflowClient(ctx.tracking_uri)
    all_tags = {
        "mlflow.parentRunId": ctx.parent_run_id,
        "dataset": ctx.dataset,
        **_process_tags(),
        **(tags or {}),
    }
    run = client.create_run(ctx.experiment_id, tags=all_tags, run_name=name)
    tracked = TaskRun(ctx, run.info.run_id)
    try:
        tracked.log_params({"dataset": ctx.dataset, **(params or {})})
        yield tracked
    except BaseException as exc:
        try:
            tracked.set_tags(
                {
                    "error": f"{type(exc).__name__}: {exc}"[:5000],
                    "error.traceback": traceback.format_exc()[-5000:],
                }
            )
        finally:
            client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def _colspec(schema: pa.Schema) -> list[dict[str, Any]]:
    """A parquet schema as MLflow's column specs (what its UI shows for a dataset)."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    def mlflow_type(kind: pa.DataType) -> DataType | Array:
        if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
            return Array(mlflow_type(kind.value_type))
        if pa.types.is_integer(kind):
            return DataType.long if kind.bit_width == 64 else DataType.integer
        if pa.types.is_floating(kind):
            return DataType.double if kind.bit_width == 64 else DataType.float
        return DataType.string

    return Schema([ColSpec(mlflow_type(f.type), f.name) for f in schema]).to_dict()


def _source_type(path: str) -> str:
    """A table's MLflow dataset source type: ``local``, or its store's protocol (``s3``)."""
    return path.split("://", 1)[0] if is_url(path) else "local"


def _source_uri(path: str) -> str:
    return path if is_url(path) else str(Path(path).resolve())


def log_to_parent(
    ctx: TrackingContext,
    metrics: Mapping[str, float] | None = None,
    artifacts: list[tuple[Path, str | None]] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> None:
    """Study-level results: headline metrics, the report with its figures, and ``tables``
    (artifact path: frame) as CSV files, which the MLflow UI previews."""
    parent = TaskRun(ctx, ctx.parent_run_id)
    if metrics:
        parent.log_metrics(metrics)
    for path, artifact_path in artifacts or []:
        parent.log_artifact(path, artifact_path)
    for artifact_file, frame in (tables or {}).items():
        parent.client.log_text(parent.run_id, frame.to_csv(index=False), artifact_file)


def latest_alias(profile: str) -> str:
    """The alias of a profile's newest finished final model (MLflow reserves plain
    ``latest`` for its own newest version of any profile)."""
    return f"latest-{profile}"


def release_model(ctx: TrackingContext, version: str, name: str | None = None) -> list[str]:
    """Tag a registered version of the final model, once its run has finished, with the
    study's profile, config hash and seed (its parent run's tags) and its test MSE; give it
    the alias ``latest-<profile>`` and, for the paper profile, ``champion``, each unless a
    newer version holds it. Returns the aliases it took.

    Raises TrackingError when the version's run has not finished or logged no test MSE."""
    name = name or registered_model(ctx.dataset)
    client = MlflowClient(ctx.tracking_uri)
    model_version = client.get_model_version(name, version)
    run = client.get_run(model_version.run_id)
    test_mse = run.data.metrics.get("test_mse")
    if run.info.status != "FINISHED" or test_mse is None:
        raise TrackingError(
            f"version {version} of the MLflow model {name} comes from run {run.info.run_id}, "
            f"which is {run.info.status} with "
            f"{'no' if test_mse is None else 'a'} test_mse metric: only a finished final "
            f"model is released; run the study again to train and register a new one"
        )
    study = client.get_run(ctx.parent_run_id).data.tags
    tags = {
        key: study[key] for key in ("profile", "config_hash", "seed", "dataset") if key in study
    }
    tags["test_mse"] = repr(float(test_mse))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = [latest_alias(tags["profile"])] if "profile" in tags else []
    if tags.get("profile") == CHAMPION_PROFILE:
        aliases.append(CHAMPION)
    held = client.get_registered_model(name).aliases
    took = []
    for alias in aliases:
        if alias in held and int(held[alias]) > int(version):
            continue  # a newer model of that kind finished first
        client.set_registered_model_alias(name, alias, version)
        took.append(alias)
    return took


def study_experiment_id(tracking_uri: str) -> str | None:
    """The id of the study's experiment in the store, None if it has none."""
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(EXPERIMENT)
    return experiment.experiment_id if experiment is not None else None


def failed_task_keys(tracking_uri: str) -> set[str]:
    """The cache keys of tasks whose runs FAILED (for ``aemnist status``)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return set()
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FAILED'", max_results=5000
    )
    return {
        run.data.tags["aemnist.task_key"] for run in runs if "aemnist.task_key" in run.data.tags
    }
