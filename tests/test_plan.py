"""The stage declarations (aemnist.plan) and the flow that submits them: one entry per stage,
one task per entry, typed flow parameters, and one resolution of the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError

from aemnist import plan
from aemnist.config import load_config
from aemnist.jobs import FoldJob, SizeJob
from aemnist.runtime import cpu_count
from aemnist.schemas import SCHEMAS
from flows.study import STAGE_TASKS, prepare_study, study, task_runner_for


def test_every_declared_stage_has_one_task_and_writes_declared_schemas() -> None:
    assert list(STAGE_TASKS) == list(plan.STAGES)
    for stage in plan.STAGES.values():
        assert set(stage.tables) <= set(SCHEMAS), stage.name
        assert set(stage.reads) < set(plan.STAGES), stage.name
    # A task's cache policy is its own stage's (a task wired to another stage's key would
    # reuse the wrong results).
    for name, task in STAGE_TASKS.items():
        if plan.STAGES[name].cached:
            assert task.cache_policy.stage == name


def test_the_flow_offers_the_profiles_devices_and_stages_and_refuses_other_values() -> None:
    properties = study.parameters.model_dump()["properties"]
    enum = properties["profile"]["anyOf"][0]["enum"]
    assert enum == ["smoke", "quick", "paper"]
    assert properties["device"]["anyOf"][0]["enum"] == ["auto", "cpu", "cuda"]
    assert properties["refresh"]["anyOf"][0]["items"]["enum"] == list(plan.STAGES)
    assert properties["task_runner"]["enum"] == ["threads", "dask"]
    for bad in ({"profile": "huge"}, {"seed": 2**32}, {"repeats": 0}, {"refresh": ["gird"]}):
        with pytest.raises(ParameterTypeError):
            study.validate_parameters(bad)
    valid = study.validate_parameters({"profile": "smoke", "seed": 3})
    assert (valid["profile"], valid["seed"], valid["task_runner"]) == ("smoke", 3, "threads")


def test_one_resolution_sizes_the_task_runner_from_runtime_workers(tmp_path: Path) -> None:
    config = tmp_path / "one.toml"
    config.write_text("[runtime]\nworkers = 1\ndevice = 'cpu'\n")
    resolved = prepare_study("smoke", str(tmp_path / "w"), str(config), None, {}, frozenset())
    assert (resolved.workers, resolved.threads, resolved.final_threads) == (
        1,
        cpu_count(),
        cpu_count(),
    )
    runner = task_runner_for(resolved, "threads", None)
    assert runner._max_workers == 1  # noqa: SLF001 - what the flow's tasks get
    assert resolved.layout.root == (tmp_path / "w").resolve()
    assert not (tmp_path / "w").exists()  # resolving writes nothing


def test_jobs_carry_their_labels_checkpoints_and_fields(tmp_path: Path) -> None:
    from aemnist.schemas import TableRef
    from aemnist.training import DEFAULT_OPTIONS

    config = load_config("smoke", overrides={"runtime": {"device": "cpu"}})
    resolved = plan.Study(config, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS)
    ref = TableRef(str(tmp_path / "t.parquet"), "a" * 64, 10)
    upstream = {"download": [{"train": ref, "test": ref}], "folds": [ref]}
    grid = plan.STAGES["grid"].jobs(resolved, upstream)
    assert [job.label for job in grid] == plan.STAGES["grid"].labels(config)
    first = grid[0]
    assert isinstance(first, FoldJob)
    assert first.checkpoint == resolved.layout.checkpoint(first.label)
    assert plan.STAGES["grid"].writes(first) == [
        resolved.layout.grid_history(first.lr, first.weight_decay, first.fold)
    ]
    with pytest.raises(AttributeError):  # frozen: a job is what its key says
        first.lr = 1.0  # type: ignore[misc]
    assert SizeJob.__dataclass_params__.frozen


def test_a_repeated_grid_carries_each_repeat_and_repeat_zero_keeps_its_name_path_and_key(
    tmp_path: Path,
) -> None:
    from aemnist.caching import fingerprint, stage_key
    from aemnist.jobs import SummaryJob
    from aemnist.schemas import TableRef
    from aemnist.training import DEFAULT_OPTIONS

    config = load_config("smoke", overrides={"runtime": {"device": "cpu"}})
    repeated = config.with_overrides({"grid": {"repeats": 2}})
    ref = TableRef(str(tmp_path / "t.parquet"), "a" * 64, 10)
    upstream = {"download": [{"train": ref, "test": ref}], "folds": [ref]}

    def grid_jobs(c):  # noqa: ANN001, ANN202 - a config in, its grid jobs out
        resolved = plan.Study(c, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS)
        return plan.STAGES["grid"].jobs(resolved, upstream)

    once, twice = grid_jobs(config), grid_jobs(repeated)

    assert len(twice) == 2 * len(once)
    assert [job.label for job in twice] == plan.STAGES["grid"].labels(repeated)
    zero = [job for job in twice if job.repeat == 0]
    # Repeat 0 is the grid as it was: its names, files, parameters and keys.
    assert [job.label for job in zero] == [job.label for job in once]
    assert [job.output for job in zero] == [job.output for job in once]
    assert [stage_key("grid", job) for job in zero] == [stage_key("grid", j) for j in once]
    assert "repeat" not in fingerprint(once[0])  # keyed only when not 0: keys as before
    second = twice[1]
    assert second.repeat == 1 and second.label == f"{once[0].label} repeat=1"
    assert second.output.name == once[0].output.name.replace(".parquet", "_repeat=1.parquet")
    assert second.checkpoint != once[0].checkpoint and second.params()["repeat"] == 1
    assert stage_key("grid", second) != stage_key("grid", once[0])

    # Table 1's job knows each history's seed where the grid repeats, and is keyed by it.
    refs = {"grid": [ref] * len(twice)}
    one = plan.STAGES["grid-summary"].jobs(
        plan.Study(config, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS), refs
    )[0]
    two = plan.STAGES["grid-summary"].jobs(
        plan.Study(repeated, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS), refs
    )[0]
    assert isinstance(two, SummaryJob) and one.repeats == ()
    assert two.repeats == tuple(job.repeat for job in twice)
    assert "repeats" not in fingerprint(one) and stage_key("grid-summary", one) != stage_key(
        "grid-summary", two
    )


def test_stacked_cells_group_each_folds_cells_evenly_and_the_summary_reads_them_in_order(
    tmp_path: Path,
) -> None:
    from aemnist.caching import stage_key
    from aemnist.jobs import FoldGroupJob
    from aemnist.schemas import TableRef
    from aemnist.training import DEFAULT_OPTIONS
    from flows.study import task_for
    from tasks.training import grid_fold, grid_stack

    # The paper's grid, 6 x 6 cells x 3 folds, twice: 72 cells a fold.
    paper = load_config("paper", overrides={"runtime": {"device": "cpu"}, "grid": {"repeats": 2}})
    ref = TableRef(str(tmp_path / "t.parquet"), "a" * 64, 10)
    upstream = {"download": [{"train": ref, "test": ref}], "folds": [ref]}

    def grid_jobs(stacked: int) -> list:
        c = paper.with_overrides({"runtime": {"stacked_cells": stacked}})
        resolved = plan.Study(c, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS)
        return plan.STAGES["grid"].jobs(resolved, upstream)

    separate = grid_jobs(1)
    by_label = {job.label: job for job in separate}
    for most, sizes in ((36, [36, 36]), (32, [24, 24, 24]), (72, [72]), (500, [72])):
        groups = grid_jobs(most)
        assert all(isinstance(job, FoldGroupJob) for job in groups)
        # Every cell exactly once, as its own job would be (so its table, MLflow run name and
        # parameters are those of separate training), in groups of one fold each, as even as
        # the limit allows.
        cells = [cell for group in groups for cell in group.cells]
        assert sorted(cell.label for cell in cells) == sorted(by_label)
        assert all(cell == by_label[cell.label] for cell in cells)
        for fold in range(3):
            mine = [group for group in groups if group.first.fold == fold]
            assert [len(group.cells) for group in mine] == sizes
            assert {cell.fold for group in mine for cell in group.cells} == {fold}
            assert [group.label for group in mine] == [
                f"grid fold={fold} stack {i}/{len(sizes)}" for i in range(1, len(sizes) + 1)
            ]
        c = paper.with_overrides({"runtime": {"stacked_cells": most}})
        assert [group.label for group in groups] == plan.STAGES["grid"].labels(c)
        assert plan.STAGES["grid"].writes(groups[0]) == [cell.output for cell in groups[0].cells]
        assert len({group.checkpoint for group in groups}) == len(groups)
        assert task_for("grid", groups[0]) is grid_stack
        # Table 1 reads one table a cell, in the order of separate training, whatever the
        # groups returned them in.
        results = {
            **upstream,
            "grid": [
                {cell.label: TableRef(str(cell.output), "b" * 64, 1) for cell in group.cells}
                for group in reversed(groups)
            ],
        }
        (summary,) = plan.STAGES["grid-summary"].jobs(
            plan.Study(c, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS), results
        )
        assert [h.path for h in summary.histories] == [str(job.output) for job in separate]
    assert task_for("grid", separate[0]) is grid_fold
    # Stacked training rounds otherwise than separate training: it never reuses those keys.
    stacked = grid_jobs(36)
    assert stage_key("grid", stacked[0]) not in {stage_key("grid", job) for job in separate}
    assert stage_key("grid", stacked[0]) == stage_key("grid", grid_jobs(36)[0])
    with pytest.raises(ValueError, match="one fold"):
        FoldGroupJob((separate[0], next(job for job in separate if job.fold == 1)))


def test_stacked_cells_group_the_sweeps_sizes_and_the_summary_reads_them_in_order(
    tmp_path: Path,
) -> None:
    import dataclasses

    import pandas as pd

    from aemnist.caching import stage_key
    from aemnist.jobs import SizeGroupJob
    from aemnist.schemas import TableRef, write_table
    from aemnist.training import DEFAULT_OPTIONS
    from flows.study import task_for
    from tasks.training import sweep_size, sweep_stack

    # The paper's sweep, ten sizes with three seeds: 30 cells on the same images.
    paper = load_config("paper", overrides={"runtime": {"device": "cpu"}, "sweep": {"repeats": 3}})
    ref = TableRef(str(tmp_path / "t.parquet"), "a" * 64, 10)
    # The sweep reads Table 1's best learning rate and weight decay.
    summary = write_table(
        pd.DataFrame(
            {"rank": [1], "lr": [1e-3], "weight_decay": [1e-5], "train_loss_mean": [0.03],
             "train_loss_std": [0.0], "val_loss_mean": [0.03], "val_loss_std": [0.0],
             "n_folds": [3], "repeats": [1], "dead_starts": [0]}
        ),
        tmp_path / "grid_summary.parquet",
        "grid_summary",
    )  # fmt: skip
    upstream = {"download": [{"train": ref, "test": ref}], "grid-summary": [summary]}

    def study(stacked: int) -> plan.Study:
        c = paper.with_overrides({"runtime": {"stacked_cells": stacked}})
        return plan.Study(c, plan.Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS)

    separate = plan.STAGES["sweep"].jobs(study(1), upstream)
    by_label = {job.label: job for job in separate}
    for most, sizes in ((36, [30]), (12, [10, 10, 10]), (8, [8, 8, 7, 7])):
        groups = plan.STAGES["sweep"].jobs(study(most), upstream)
        assert all(isinstance(job, SizeGroupJob) for job in groups)
        assert [len(group.cells) for group in groups] == sizes
        # Every (size, seed) once, as its own job would be, in the sweep's order.
        cells = [cell for group in groups for cell in group.cells]
        assert [cell.label for cell in cells] == [job.label for job in separate]
        assert all(cell == by_label[cell.label] for cell in cells)
        assert [group.label for group in groups] == [
            f"sweep stack {i}/{len(sizes)}" for i in range(1, len(sizes) + 1)
        ]
        assert [group.label for group in groups] == plan.STAGES["sweep"].labels(study(most).config)
        assert plan.STAGES["sweep"].writes(groups[0]) == [c.output for c in groups[0].cells]
        assert task_for("sweep", groups[0]) is sweep_stack
        # Table 2 and the report read one table a (size, seed) in the separate order.
        results = {
            **upstream,
            "sweep": [
                {cell.label: TableRef(str(cell.output), "b" * 64, 1) for cell in group.cells}
                for group in reversed(groups)
            ],
        }
        (table2,) = plan.STAGES["sweep-summary"].jobs(study(most), results)
        assert [h.path for h in table2.histories] == [str(job.output) for job in separate]
    assert task_for("sweep", separate[0]) is sweep_size
    stacked = plan.STAGES["sweep"].jobs(study(36), upstream)
    assert stage_key("sweep", stacked[0]) not in {stage_key("sweep", job) for job in separate}
    # A group trains every cell with the first one's settings: others are refused.
    other_lr = dataclasses.replace(separate[1], lr=5e-3)
    with pytest.raises(ValueError, match="one learning rate"):
        SizeGroupJob((separate[0], other_lr))
    with pytest.raises(ValueError, match="only the sweep"):
        SizeGroupJob((dataclasses.replace(separate[0], stage="final"),))
