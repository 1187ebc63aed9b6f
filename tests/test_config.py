"""aemnist.config: profiles, overrides, validation, the config hash."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli
from pydantic import ValidationError

from aemnist.config import (
    DEVICES,
    PROFILES,
    SELECTIONS,
    ConfigError,
    StudyConfig,
    config_json_schema,
    from_dict,
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
    assert config.model_copy(update={"grid": smoke.grid}) == smoke


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
        ({"runtime": {"unknown_thing": 1}}, "runtime.unknown_thing"),
        ({"embedding": {"perplexity": "30"}}, "embedding.perplexity"),
        ({"data": {"train_limit": False}}, "data.train_limit"),
        ({"corruption": {"clip": 1}}, "corruption.clip"),
        ({"corruption": {"occlusion_levels": [0.5, 1.5]}}, "corruption.occlusion_levels"),
        ({"grid": {"weight_decays": [1e-5, 1e-5]}}, "grid.weight_decays"),
        ({"embedding": {"perplexity": float("inf")}}, "embedding.perplexity"),
        ({"seed": 2**32}, "seed"),
        ({"seed": -1}, "seed"),
        ({"embedding": {"seed": 2**32}}, "embedding.seed"),
        ({"data": {"train_limit": 20}}, "data.train_limit"),
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": 2**32}, r"^seed: must be from 0 to 4294967295, got 4294967296$"),
        ({"grid": {"epochs": "20"}}, r"^grid\.epochs: must be an integer, got '20'$"),
        ({"grid": {"epochs": True}}, r"^grid\.epochs: must be an integer, got True$"),
        ({"embedding": {"knn": "5"}}, r"^embedding\.knn: must be an integer, got '5'$"),
        ({"embedding": {"perplexity": "30"}}, r"^embedding\.perplexity: must be a number"),
        (
            {"runtime": {"unknown_thing": 1}},
            r"^runtime\.unknown_thing: unknown config field; runtime has workers, device, ",
        ),
        ({"sweep": {"selection": "train"}}, r"^sweep\.selection: must be one of 'test' or "),
        ({"grid": {"learning_rates": [0.01, -1]}}, r"^grid\.learning_rates: .*item 1 is -1\)$"),
    ],
)
def test_error_message_says_what_is_allowed_without_pydantic_noise(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as excinfo:
        load_config("smoke", overrides=overrides)
    text = str(excinfo.value)
    assert "\n" not in text and "pydantic" not in text and "http" not in text, text


def test_largest_seed_numpy_takes_is_accepted() -> None:
    assert load_config("smoke", overrides={"seed": 2**32 - 1}).seed == 2**32 - 1


def test_types_are_strict_but_an_integer_is_taken_for_a_float() -> None:
    config = load_config(
        "smoke", overrides={"grid": {"weight_decays": [0, 1e-5]}, "embedding": {"perplexity": 25}}
    )

    assert config.grid.weight_decays == (0.0, 1e-5)
    assert all(type(v) is float for v in config.grid.weight_decays)
    assert type(config.embedding.perplexity) is float
    # As the dataclass config wrote it: a float, so the hash does not depend on how it was given.
    assert config.to_dict()["grid"]["weight_decays"] == [0.0, 1e-5]
    assert '"weight_decays":[0.0,1e-05]' in json.dumps(config.to_dict(), separators=(",", ":"))


def test_lists_become_tuples_and_the_config_is_frozen_and_hashable() -> None:
    config = load_config("smoke")

    assert isinstance(config.sweep.sizes, tuple)
    assert hash(config) == hash(load_config("smoke"))
    with pytest.raises(ValidationError):
        config.seed = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.grid.epochs = 3  # type: ignore[misc]


def test_to_dict_is_plain_and_from_dict_reads_it_back() -> None:
    config = load_config("paper", overrides={"seed": 7})
    raw = config.to_dict()

    assert raw["grid"]["learning_rates"] == [5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4]
    assert from_dict(raw) == config
    assert config.flat()["sweep.sizes"] == [2, 4, 6, 8, 10, 12, 15, 20, 25, 30]


def test_with_overrides_changes_one_field_and_validates() -> None:
    config = load_config("smoke")

    changed = config.with_overrides({"runtime": {"device": "cpu"}})

    assert changed.runtime.device == "cpu"
    assert changed.model_copy(update={"runtime": config.runtime}) == config
    with pytest.raises(ConfigError, match=r"^runtime\.device:"):
        config.with_overrides({"runtime": {"device": "tpu"}})


# The hashes the dataclass config gave: the pydantic models must keep them, so that earlier
# work dirs and MLflow runs stay comparable.
DATACLASS_HASHES = {
    "smoke": "7c03923b948dd6e3cf74c97552db2a989a8b8e07b906035e99a2fc8b99ea8048",
    "quick": "7aea93aa4c9a9d5a3a06b91c9d721491a704d548974e47f685dce293a228eda4",
    "paper": "ada315ad7d801ff43789e9ac6079246438a637b4f7103e1109d989cfe71103c9",
}


@pytest.mark.parametrize("profile", PROFILES)
def test_config_hash_is_the_one_the_dataclass_config_gave(profile: str) -> None:
    # The fields added since leave the hash as it was at their defaults; smoke and quick now
    # start their models at the mean intensity (they train differently: a hash of their own).
    before = {"training": {"output_bias_at_mean": False}}
    assert load_config(profile).with_overrides(before).config_hash() == DATACLASS_HASHES[profile]
    changed = load_config(profile).config_hash() != DATACLASS_HASHES[profile]
    assert changed == load_config(profile).training.output_bias_at_mean


def test_json_schema_names_every_section_and_the_allowed_values() -> None:
    schema = config_json_schema()
    json.dumps(schema)  # JSON-able as it is
    defs = schema["$defs"]

    def resolve(prop: dict[str, Any]) -> dict[str, Any]:
        ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("allOf", [])), None)
        return defs[ref.rsplit("/", 1)[-1]] if ref else prop

    props = schema["properties"]
    sections = ("data", "training", "grid", "sweep", "final", "corruption", "embedding")
    assert set(props) == {"profile", "seed", *sections, "runtime"}
    assert schema["additionalProperties"] is False
    assert props["profile"]["enum"] == list(PROFILES)
    assert props["seed"]["minimum"] == 0 and props["seed"]["maximum"] == 2**32 - 1
    runtime = resolve(props["runtime"])
    assert runtime["properties"]["device"]["enum"] == list(DEVICES)
    assert runtime["additionalProperties"] is False
    sweep = resolve(props["sweep"])
    assert sweep["properties"]["selection"]["enum"] == list(SELECTIONS)
    assert sweep["properties"]["sizes"]["type"] == "array"
    assert sweep["properties"]["sizes"]["minItems"] == 1
    assert "last N epochs" in sweep["properties"]["score_last"]["description"]
    for name in (*sections, "runtime"):
        section = resolve(props[name])
        assert section["properties"], name
        for field, prop in section["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"


def test_the_cli_prints_the_json_schema_and_a_resolved_profile(tmp_path: Path) -> None:
    schema = run_cli(["config", "--schema"], home=tmp_path / "home")
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout) == config_json_schema()
    smoke = run_cli(["config", "--profile", "smoke"], home=tmp_path / "home")
    assert json.loads(smoke.stdout) == load_config("smoke").to_dict()
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nfolds = 1\n")
    refused = run_cli(["config", "--config", str(bad)], home=tmp_path / "home")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "aemnist: error: grid.folds: must be 2 or more, got 1"


def test_storage_is_an_object_store_url_without_credentials_and_leaves_the_hash_alone() -> None:
    smoke = load_config("smoke")
    stored = smoke.with_overrides({"runtime": {"storage": "s3://bucket/team/smoke"}})
    assert stored.runtime.storage == "s3://bucket/team/smoke"
    # Where the files lie is not what the study computes: the same hash, as for the work dir.
    assert stored.config_hash() == smoke.config_hash()
    for bad, message in [
        (
            "/data/runs",
            "must be an object store's URL such as s3://bucket/prefix, got '/data/runs'",
        ),
        ("file:///data/runs", "must be an object store's URL"),
        ("s3://", "must be an object store's URL"),
        ("s3://AKIA:hunter2@bucket/x", "must not hold credentials"),
    ]:
        with pytest.raises(ConfigError) as caught:
            smoke.with_overrides({"runtime": {"storage": bad}})
        assert str(caught.value).startswith(f"runtime.storage: {message}"), str(caught.value)
        assert "hunter2" not in str(caught.value)
