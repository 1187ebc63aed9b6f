"""data.dataset: Fashion-MNIST and KMNIST beside MNIST (pins, mirrors, layout, keys, report).

Only MNIST's files are on these machines, so Fashion-MNIST's are small IDX slices written
here; their pins (the MD5 of each ``.gz``, its size, the rows) stand in for the published
ones for the test's duration (``fashion_slice``), the way the real pins stand for the
published files. Every other part is the real one.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import REPO_ROOT, cli_env, run_cli
from mlflow import MlflowClient
from test_data import idx_payload, snapshot
from test_report import write_study

from aemnist import datasets
from aemnist.caching import fingerprint, stage_key
from aemnist.config import DATASETS, MIRROR_ENV, ConfigError, load_config, run_overrides
from aemnist.data import DataError, download_mnist, load_images, mnist_paths, verified_tables
from aemnist.datasets import DATASET_NAMES, DatasetSpec, IdxFile, dataset_spec
from aemnist.jobs import FoldsJob
from aemnist.layout import Layout
from aemnist.plots import tsne_figure
from aemnist.report import NO_REFERENCE, build_report, load_tables, render_report
from aemnist.schemas import TableRef
from aemnist.tracking import embedded_tracking_uri, start_study, task_run

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")  # fmt: skip
SLICE_ROWS = {"train": 300, "test": 200}


# --- a Fashion-MNIST slice and its pins ----------------------------------------------------


def write_slice(folder: Path, rows: dict[str, int], seed: int = 0) -> DatasetSpec:
    """Four gzipped IDX files of random 28x28 images, labels 0-9 in turn, in ``folder``; and
    Fashion-MNIST's record with their pins in place of the published files'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, (images_name, labels_name) in datasets.SPLITS.items():
        n = rows[split]
        arrays = {
            images_name: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            labels_name: (np.arange(n) % 10).astype(np.uint8),
        }
        for name, array in arrays.items():
            payload = idx_payload(array)
            packed = gzip.compress(payload, mtime=0)
            (folder / f"{name}.gz").write_bytes(packed)
            md5 = hashlib.md5(packed, usedforsecurity=False).hexdigest()
            files[name] = IdxFile(name, len(payload), None, md5)
    real = datasets.DATASETS["fashion-mnist"]
    return dataclasses.replace(real, files=files, rows=dict(rows))


@pytest.fixture
def fashion_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mirror folder of a Fashion-MNIST slice, pinned as Fashion-MNIST for this test."""
    mirror = tmp_path / "fashion-mirror"
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist", write_slice(mirror, SLICE_ROWS))
    return mirror


# --- pins and mirrors ----------------------------------------------------------------------


def test_the_pins_are_torchvisions_published_md5s_and_class_names() -> None:
    # The published checksums as torchvision's downloader checks them: a typo here would
    # refuse every good download of the dataset.
    from torchvision.datasets import KMNIST, MNIST, FashionMNIST

    for name, cls in (("mnist", MNIST), ("fashion-mnist", FashionMNIST), ("kmnist", KMNIST)):
        spec = dataset_spec(name)
        published = {file.removesuffix(".gz"): md5 for file, md5 in cls.resources}
        assert {n: f.gz_md5 for n, f in spec.files.items()} == published
        assert spec.torchvision_class == cls.__name__
    assert dataset_spec("fashion-mnist").classes == tuple(FashionMNIST.classes) == FASHION_CLASSES
    assert dataset_spec("kmnist").classes == tuple(KMNIST.classes)
    # MNIST stays pinned by its payloads' SHA-256 (the local copy's .gz wrappers differ).
    assert dataset_spec("mnist").checked_by_payload
    assert not dataset_spec("fashion-mnist").checked_by_payload


def test_a_fashion_slice_is_downloaded_into_its_own_tables_and_then_verified(
    fashion_slice: Path, tmp_path: Path
) -> None:
    data_dir = Layout(tmp_path / "work", "fashion-mnist").data_dir

    refs, fetched = download_mnist(data_dir, fashion_slice, dataset="fashion-mnist")
    again, fetched_again = download_mnist(data_dir, tmp_path / "gone", dataset="fashion-mnist")

    assert fetched and not fetched_again and again == refs
    assert {s: Path(r.path).name for s, r in refs.items()} == {
        "train": "fashion-mnist_train.parquet",
        "test": "fashion-mnist_test.parquet",
    }
    test = load_images(refs["test"].path)
    assert len(test) == SLICE_ROWS["test"] and list(test.labels[:12]) == [*range(10), 0, 1]
    # MNIST's tables there are neither written nor taken for these.
    assert not mnist_paths(data_dir)["train"].exists() and verified_tables(data_dir) is None


def test_a_fashion_mirror_holding_mnists_files_is_refused_naming_both(
    mnist_mirror: Path, tmp_path: Path
) -> None:
    # The real pins: MNIST's files (in the local copy's own gzip wrappers) are known by
    # their payloads' SHA-256.
    data_dir = tmp_path / "data"

    with pytest.raises(DataError) as refused:
        download_mnist(data_dir, mnist_mirror, dataset="fashion-mnist")

    message = str(refused.value)
    assert "this is MNIST's train-images-idx3-ubyte, not Fashion-MNIST's" in message
    assert "--dataset mnist" in message and MIRROR_ENV in message and "\n" not in message
    assert not data_dir.exists() or snapshot(data_dir) == {}


def test_an_mnist_mirror_holding_fashion_files_is_refused_naming_both(
    fashion_slice: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    before = snapshot(data_dir)

    with pytest.raises(DataError) as refused:
        download_mnist(data_dir, fashion_slice, dataset="mnist")

    message = str(refused.value)
    assert "this is Fashion-MNIST's train-images-idx3-ubyte, not MNIST's" in message
    assert "--dataset fashion-mnist" in message
    assert snapshot(data_dir) == before


def test_a_damaged_or_uncompressed_fashion_file_is_refused_naming_it(
    fashion_slice: Path, tmp_path: Path
) -> None:
    labels = fashion_slice / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(labels.read_bytes()))
    payload[-1] = (payload[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(payload), mtime=0))

    with pytest.raises(DataError, match=f"{re.escape(str(labels))}: wrong MD5 for t10k-labels"):
        download_mnist(tmp_path / "a", fashion_slice, dataset="fashion-mnist")

    # The published pins are of the .gz files: a raw file cannot be checked against them.
    labels.unlink()
    (fashion_slice / "t10k-labels-idx1-ubyte").write_bytes(bytes(payload))
    with pytest.raises(DataError, match="pinned by the MD5 of their published .gz files"):
        download_mnist(tmp_path / "b", fashion_slice, dataset="fashion-mnist")


# --- config --------------------------------------------------------------------------------


def test_the_config_knows_the_three_datasets_and_refuses_another_in_one_line() -> None:
    assert DATASETS == DATASET_NAMES == ("mnist", "fashion-mnist", "kmnist")
    assert load_config("smoke").data.dataset == "mnist"
    assert load_config("smoke", overrides=run_overrides(dataset="kmnist")).data.dataset == "kmnist"

    with pytest.raises(ConfigError) as refused:
        load_config("smoke", overrides=run_overrides(dataset="cifar10"))

    assert str(refused.value) == (
        "data.dataset: unknown dataset 'cifar10'; choose one of mnist, fashion-mnist, kmnist "
        "(--dataset or data.dataset in the config file)"
    )


def test_an_mnist_config_dumps_and_hashes_as_before_datasets_were_a_field() -> None:
    # Earlier work dirs' saved configs, config hashes and cache keys stay valid.
    # The paper profile: unchanged since (smoke and quick now start at the mean intensity).
    mnist = load_config("paper")
    fashion = load_config("paper", overrides=run_overrides(dataset="fashion-mnist"))

    assert "dataset" not in mnist.to_dict()["data"]
    assert mnist.config_hash().startswith("ada315ad7d80")  # main's, before this field
    assert fashion.to_dict()["data"]["dataset"] == "fashion-mnist"
    assert fashion.config_hash() != mnist.config_hash()
    assert fashion.flat()["data.dataset"] == "fashion-mnist"


@pytest.mark.e2e
def test_aemnist_run_with_an_unknown_dataset_stops_before_anything_in_one_line(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "work"

    result = run_cli(
        ["run", "--profile", "smoke", "--workdir", str(workdir), "--dataset", "mnits"],
        home=tmp_path / "home",
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "aemnist: error: data.dataset: unknown dataset 'mnits'; choose one of mnist, "
        "fashion-mnist, kmnist (--dataset or data.dataset in the config file)"
    ]
    assert not workdir.exists()
    # The other commands that take --dataset say the same.
    where = ["--workdir", str(workdir)]
    for command in (["status", "--profile", "smoke", *where], ["report", *where], ["config"]):
        other = run_cli([*command, "--dataset", "mnits"], home=tmp_path / "home")
        assert other.returncode == 2 and "unknown dataset 'mnits'" in other.stderr, command
    assert not workdir.exists()
    shown = run_cli(["config", "--profile", "smoke", "--dataset", "kmnist"], home=tmp_path / "home")
    assert json.loads(shown.stdout)["data"]["dataset"] == "kmnist"


# --- layout and cache keys -----------------------------------------------------------------


def test_mnists_layout_is_unchanged_and_another_datasets_lies_in_its_own_folder(
    tmp_path: Path,
) -> None:
    mnist = Layout(tmp_path)
    fashion = Layout(tmp_path, "fashion-mnist")

    assert mnist.train_table == tmp_path / "data" / "mnist_train.parquet"
    assert mnist.config == tmp_path / "study_config.json"
    assert (
        mnist.grid_history(0.01, 1e-5, 0) == tmp_path / "grid" / "lr=0.01_wd=1e-05_fold=0.parquet"
    )
    assert mnist.cache_dir == tmp_path / "cache" and mnist.report == tmp_path / "report.md"
    assert (
        fashion.train_table == tmp_path / "fashion-mnist" / "data" / "fashion-mnist_train.parquet"
    )

    def files(layout: Layout) -> list[Path]:
        return [
            layout.data_dir, layout.train_table, layout.test_table, layout.config, layout.folds,
            layout.grid_history(0.01, 1e-5, 0), layout.grid_summary, layout.sweep_history(4),
            layout.sweep_summary, layout.final_model, layout.final_history,
            layout.final_metrics, layout.corruption, layout.corruption_examples,
            layout.embedding, layout.embedding_metrics, layout.figures_dir, layout.report,
            layout.report_run, layout.cache_dir, layout.checkpoint("grid lr=0.01 wd=1e-05 fold=0"),
        ]  # fmt: skip

    for path in files(fashion):
        assert path.is_relative_to(tmp_path / "fashion-mnist"), path
    assert not set(files(mnist)) & set(files(fashion))


def test_the_same_job_on_another_dataset_has_another_cache_key(tmp_path: Path) -> None:
    train = TableRef(str(tmp_path / "t.parquet"), "a" * 64, 60000)

    def key(dataset: str) -> str:
        return stage_key("folds", FoldsJob(Layout(tmp_path, dataset), train, 3000, 3, 0))

    assert len({key(name) for name in DATASET_NAMES}) == 3
    # MNIST's key is the one it had before datasets (its layout fingerprint unchanged).
    assert fingerprint(Layout(tmp_path)) == {"workdir": str(tmp_path)}


# --- MLflow --------------------------------------------------------------------------------


def test_the_parent_and_each_nested_run_carry_the_dataset_as_tag_and_parameter(
    tmp_path: Path,
) -> None:
    uri = embedded_tracking_uri(tmp_path)
    ctx = start_study(uri, tmp_path, "study-smoke", {"seed": 0}, {"profile": "smoke"}, "kmnist")
    with task_run(ctx, "folds", {"folds": 3}) as child:
        pass
    with task_run(ctx, "report") as bare:
        pass

    client = MlflowClient(uri)
    for run_id in (ctx.parent_run_id, child.run_id, bare.run_id):
        run = client.get_run(run_id)
        assert run.data.tags["dataset"] == "kmnist"
        assert run.data.params["dataset"] == "kmnist"


# --- report and figures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, str]:
    root = tmp_path_factory.mktemp("fashion")
    mnist_layout, _ = write_study(root / "fashion-mnist")  # the tables, where fashion's lie
    layout = Layout(root, "fashion-mnist")
    assert layout.grid_summary == mnist_layout.grid_summary
    config = load_config("smoke", overrides=run_overrides(dataset="fashion-mnist"))
    build_report(layout, config, today=date(2024, 1, 2))
    return layout, layout.report.read_text(encoding="utf-8")


def test_a_fashion_report_names_its_dataset_and_classes_and_has_no_seed_numbers(
    fashion_report: tuple[Layout, str],
) -> None:
    _, text = fashion_report

    assert text.startswith("# aemnist study report: Fashion-MNIST\n")
    assert all(name in text for name in FASHION_CLASSES)
    assert NO_REFERENCE in text
    for seed_only in ("## Targets", "ours/seed", "seed test loss", "0.0086", "0.022443", "Seed:"):
        assert seed_only not in text, seed_only


def test_an_mnist_report_keeps_the_seeds_numbers_and_targets(tmp_path: Path) -> None:
    layout, config = write_study(tmp_path)
    text = render_report(load_tables(layout), config, layout, date(2024, 1, 2))

    assert text.startswith("# aemnist study report: MNIST\n")
    assert "## Targets" in text and "ours/seed" in text and NO_REFERENCE not in text


def test_the_tsne_legend_names_fashions_classes_and_mnists_digits(
    fashion_report: tuple[Layout, str],
) -> None:
    layout, _ = fashion_report
    embedding = load_tables(layout).embedding

    def legend(dataset: str) -> tuple[str, list[str]]:
        fig = tsne_figure(embedding, dataset)
        box = fig.axes[0].get_legend()
        return fig.axes[0].get_title(), [t.get_text() for t in box.get_texts()]

    title, names = legend("fashion-mnist")
    assert names == list(FASHION_CLASSES) and title.startswith("Fashion-MNIST: ")
    assert legend("mnist")[1] == [str(d) for d in range(10)]
    assert legend("kmnist")[1] == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


# --- end to end ----------------------------------------------------------------------------

# Runs `aemnist` with Fashion-MNIST pinned to a slice's files (the JSON record in argv[1]).
_PINNED_CLI = """
import json, sys
from aemnist import datasets
record = json.load(open(sys.argv[1]))
datasets.DATASETS["fashion-mnist"] = datasets.DatasetSpec(
    **{**record, "classes": tuple(record["classes"]),
       "files": {n: datasets.IdxFile(**f) for n, f in record["files"].items()}})
from flows.cli import main
sys.exit(main(sys.argv[2:]))
"""

SLICE_CONFIG = """
[data]
train_limit = 0
test_limit = 0
[corruption]
n_images = 50
[embedding]
n_images = 100
perplexity = 10.0
"""


@pytest.mark.e2e
def test_a_smoke_study_on_a_fashion_slice_through_the_command_line(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    record = tmp_path / "pins.json"
    record.write_text(json.dumps(dataclasses.asdict(write_slice(mirror, SLICE_ROWS))))
    config = tmp_path / "slice.toml"
    config.write_text(SLICE_CONFIG)
    workdir = tmp_path / "work"
    args = ["run", "--profile", "smoke", "--config", str(config), "--dataset", "fashion-mnist",
            "--workdir", str(workdir), "--mnist-mirror", str(mirror)]  # fmt: skip

    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _PINNED_CLI, str(record), *args],
        cwd=REPO_ROOT,
        env=cli_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started

    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"fashion slice smoke study: {seconds:.0f} s")
    layout = Layout(workdir.resolve(), "fashion-mnist")
    assert f"Report: {layout.report}" in proc.stdout
    text = layout.report.read_text(encoding="utf-8")
    assert text.startswith("# aemnist study report: Fashion-MNIST")
    assert "Ankle boot" in text and NO_REFERENCE in text and "## Targets" not in text
    # Nothing of MNIST's in the work dir: its tables, results and report are not there.
    assert not (workdir / "data").exists() and not (workdir / "report.md").exists()
    assert not (workdir / "grid").exists() and not (workdir / "study_config.json").exists()
    # Every run of the study carries the dataset; its model is registered apart from MNIST's.
    client = MlflowClient(embedded_tracking_uri(workdir.resolve()))
    runs = client.search_runs([client.get_experiment_by_name("aemnist").experiment_id])
    assert runs and {r.data.tags.get("dataset") for r in runs} == {"fashion-mnist"}
    assert {r.data.params.get("dataset") for r in runs} == {"fashion-mnist"}
    names = {m.name for m in client.search_registered_models()}
    assert names == {"aemnist-autoencoder-fashion-mnist"}

    # Switching datasets in the work dir reuses nothing: MNIST's study there is all to run,
    # while Fashion-MNIST's is all cached or verified.
    def status(*extra: str) -> str:
        status_args = ["status", "--profile", "smoke", "--config", str(config),
                       "--workdir", str(workdir), *extra]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", _PINNED_CLI, str(record), *status_args],
            cwd=REPO_ROOT,
            env=cli_env(tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    fashion = status("--dataset", "fashion-mnist")
    assert fashion.startswith("Study smoke on Fashion-MNIST (config ")
    assert "16 tasks: 15 cached, 1 done; a re-run computes 0." in fashion
    assert "16 tasks: 16 pending; a re-run computes 16." in status()
    # `aemnist report --dataset` rebuilds that dataset's report, from its folder.
    rebuilt = run_cli(
        ["report", "--workdir", str(workdir), "--dataset", "fashion-mnist"], home=tmp_path / "home"
    )
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert f"Report: {layout.report}" in rebuilt.stdout
