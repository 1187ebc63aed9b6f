"""aemnist.config: profiles, overrides, validation, the config hash."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from aemnist.config import (
    PROFILES,
    ConfigError,
    StudyConfig,
    load_config,
    read_saved_config,
    save_config,
)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads_and_validates(profile: str) -> None:
    config = load_config(profile)

    assert isinstance(config, StudyConfig)
    assert config.profile == profile
    assert config.grid.learning_rates and config.grid.weight_decays and config.sweep.sizes


def test_default_profile_is_quick() -> None:
    assert load_config().profile == "quick"


def test_paper_profile_is_the_seed_protocol() -> None:
    c = load_config("paper")

    assert c.grid.learning_rates == (5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4)
    assert c.grid.weight_decays == (5e-4, 1e-4, 5e-5, 1e-5, 5e-6, 1e-6)
    assert c.grid.folds == 3
    assert c.grid.epochs == 20
    assert c.sweep.sizes == (2, 4, 6, 8, 10, 12, 15, 20, 25, 30)
    assert c.sweep.epochs == 50
    assert c.sweep.plateau_patience == 5
    assert c.final.epochs == 50
    assert c.embedding.n_images == 2000
    assert c.training.batch_size == 256
    assert c.data.train_limit == 0 and c.data.test_limit == 0  # the full data


def test_smoke_profile_is_small() -> None:
    c = load_config("smoke")

    assert 0 < c.data.train_limit <= 5000
    assert c.grid.epochs <= 3 and c.sweep.epochs <= 3 and c.final.epochs <= 3


def test_user_toml_file_overrides_a_field_and_keeps_the_rest(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text('profile = "smoke"\n\n[grid]\nepochs = 2\n')

    config = load_config(config_file=user)
    smoke = load_config("smoke")

    assert config.profile == "smoke"
    assert config.grid.epochs == 2
    assert dataclasses.replace(config, grid=smoke.grid) == smoke


def test_overrides_take_precedence_over_the_user_file(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text("[grid]\nepochs = 2\n")

    config = load_config("smoke", config_file=user, overrides={"grid": {"epochs": 3}})

    assert config.grid.epochs == 3


def test_missing_user_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config("smoke", config_file=missing)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"grid": {"learning_rates": [0.01, -0.001]}}, "grid.learning_rates"),
        ({"grid": {"learning_rates": []}}, "grid.learning_rates"),
        ({"grid": {"weight_decays": []}}, "grid.weight_decays"),
        ({"sweep": {"sizes": [0, 4]}}, "sweep.sizes"),
        ({"sweep": {"sizes": []}}, "sweep.sizes"),
        ({"grid": {"folds": 1}}, "grid.folds"),
        ({"embedding": {"perplexity": 500.0}}, "embedding.perplexity"),
        ({"bogus": 1}, "bogus"),
        ({"grid": {"bogus": 1}}, "grid.bogus"),
        ({"grid": {"epochs": "20"}}, "grid.epochs"),
        ({"grid": {"epochs": 2.5}}, "grid.epochs"),
        ({"grid": {"epochs": True}}, "grid.epochs"),
        ({"grid": {"learning_rates": 0.01}}, "grid.learning_rates"),
        ({"grid": {"learning_rates": ["fast"]}}, "grid.learning_rates[0]"),
        ({"grid": 3}, "grid"),
        ({"seed": "zero"}, "seed"),
        ({"runtime": {"device": "tpu"}}, "runtime.device"),
        ({"runtime": {"gpu_concurrency": 0}}, "runtime.gpu_concurrency"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_value_is_rejected_with_a_config_error_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config("smoke", overrides=overrides)
    assert str(excinfo.value).startswith(f"{field}:"), str(excinfo.value)


def test_invalid_value_in_a_user_file_is_rejected_naming_the_field(tmp_path: Path) -> None:
    user = tmp_path / "bad.toml"
    user.write_text("[grid]\nlearning_rates = [-0.01]\n")

    with pytest.raises(ConfigError, match=r"^grid\.learning_rates:"):
        load_config("smoke", config_file=user)


def test_unknown_profile_is_rejected_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^profile:.*'huge'"):
        load_config("huge")


def test_unknown_profile_in_a_user_file_is_rejected_naming_the_field(tmp_path: Path) -> None:
    user = tmp_path / "bad.toml"
    user.write_text('profile = "huge"\n')

    with pytest.raises(ConfigError, match=r"^profile:"):
        load_config(config_file=user)


def test_config_hash_is_stable() -> None:
    first = load_config("smoke").config_hash()

    assert first == load_config("smoke").config_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", first)


@pytest.mark.parametrize(
    "overrides",
    [{"seed": 1}, {"grid": {"epochs": 2}}, {"grid": {"learning_rates": [1e-2]}}],
)
def test_config_hash_changes_when_a_field_changes(overrides: dict[str, Any]) -> None:
    assert (
        load_config("smoke", overrides=overrides).config_hash()
        != load_config("smoke").config_hash()
    )


def test_config_hash_differs_between_profiles() -> None:
    hashes = {load_config(p).config_hash() for p in PROFILES}
    assert len(hashes) == len(PROFILES)


def test_saved_config_reads_back_equal_with_the_same_hash(tmp_path: Path) -> None:
    config = load_config("smoke", overrides={"grid": {"epochs": 2}})
    path = tmp_path / "config.json"

    save_config(config, path)
    again = read_saved_config(path)

    assert again == config
    assert again.config_hash() == config.config_hash()


def test_reading_a_missing_saved_config_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        read_saved_config(path)
