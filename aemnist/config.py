"""Study configuration: the one module that owns profiles, validation and the config hash.

A profile is a TOML file in ``aemnist/profiles``; a user file and CLI flags override any
field. Everything is validated before any work starts, and every error names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES = ("smoke", "quick", "paper")
# The environment variable naming a folder or URL with the four MNIST files.
MIRROR_ENV = "AEMNIST_MNIST_MIRROR"
DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("test", "validation")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is allowed."""


class DeviceError(ConfigError):
    """runtime.device names a device this machine cannot use; the message says what to run."""


@dataclass(frozen=True)
class DataConfig:
    train_limit: int = 0  # 0 = all 60000 training images
    test_limit: int = 0  # 0 = all 10000 test images


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 256
    eval_batch_size: int = 2048


@dataclass(frozen=True)
class GridConfig:
    learning_rates: tuple[float, ...] = (5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4)
    weight_decays: tuple[float, ...] = (5e-4, 1e-4, 5e-5, 1e-5, 5e-6, 1e-6)
    folds: int = 3
    epochs: int = 20
    # The seed does not state the size used in the grid search; the laboratory default is 6.
    size: int = 6


@dataclass(frozen=True)
class SweepConfig:
    sizes: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 15, 20, 25, 30)
    epochs: int = 50
    plateau_patience: int = 5
    score_last: int = 5  # a size's score is the mean loss of its last N epochs
    # Which loss drives the scheduler and ranks the sizes (and the final model's scheduler):
    # "test", as the seed did, or "validation", images held out of the training set, so
    # that the test set gives the final number only.
    selection: str = "test"
    validation_images: int = 10000  # held out when selection = "validation"
    # Seeds the sweep and the final model are trained with: Table 2 and the final test MSE
    # then give mean ± standard deviation over them. Repeat 0 is the study's own seed.
    repeats: int = 1


@dataclass(frozen=True)
class FinalConfig:
    epochs: int = 50
    # The encoding size of the final model: 0 = the sweep's best size. The paper profile
    # fixes the seed's 20, so that its final test MSE compares with the seed's 0.0086.
    size: int = 0


@dataclass(frozen=True)
class CorruptionConfig:
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    occlusion_levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    n_images: int = 0  # 0 = the whole test set
    # Clip noisy pixels to [0, 1]; the seed does not.
    clip: bool = False


@dataclass(frozen=True)
class EmbeddingConfig:
    n_images: int = 2000  # the test images sampled and mapped
    perplexity: float = 30.0
    knn: int = 5  # neighbours of the k-NN separation score
    seed: int = -1  # of the sample and of t-SNE; -1 = the study's seed

    def seed_for(self, study_seed: int) -> int:
        return study_seed if self.seed < 0 else self.seed


@dataclass(frozen=True)
class RuntimeConfig:
    # Parallel task slots for the grid and sweep fan-out on the CPU; 0 = one per CPU core.
    workers: int = 0
    # Where tensors live and models train: auto = cuda where torch sees a GPU, else cpu.
    device: str = "auto"
    # Training tasks sharing one GPU at a time, each on its own CUDA stream (bench/gpu.py).
    gpu_concurrency: int = 8


@dataclass(frozen=True)
class StudyConfig:
    profile: str = "paper"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted field names to values, as logged to MLflow parameters."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    out[f"{key}.{sub}"] = v
            else:
                out[key] = value
        return out

    def config_hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "training": TrainingConfig,
    "grid": GridConfig,
    "sweep": SweepConfig,
    "final": FinalConfig,
    "corruption": CorruptionConfig,
    "embedding": EmbeddingConfig,
    "runtime": RuntimeConfig,
}
_TOP_LEVEL = ("profile", "seed")


def profile_path(name: str) -> Path:
    if name not in PROFILES:
        raise ConfigError(f"profile: unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return Path(__file__).parent / "profiles" / f"{name}.toml"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; check the path given to --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(
    profile: str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> StudyConfig:
    """Resolve profile < user file < overrides into a validated StudyConfig.

    The profile comes from ``profile`` if given, else from the user file's ``profile``
    field, else ``quick`` (the default profile).
    """
    user = read_toml(config_file) if config_file is not None else {}
    name = profile or user.get("profile") or "quick"
    if not isinstance(name, str):
        raise ConfigError(f"profile: must be a string naming one of {', '.join(PROFILES)}")
    raw = read_toml(profile_path(name))
    raw = merge(raw, user)
    raw = merge(raw, overrides or {})
    raw["profile"] = name
    return from_dict(raw)


def run_overrides(
    seed: int | None = None, device: str | None = None, repeats: int | None = None
) -> dict[str, Any]:
    """The overrides of a run's command-line flags (or flow parameters): only those given."""
    out: dict[str, Any] = {}
    if seed is not None:
        out["seed"] = seed
    if device is not None:
        out["runtime"] = {"device": device}
    if repeats is not None:
        out["sweep"] = {"repeats": repeats}
    return out


def from_dict(raw: dict[str, Any]) -> StudyConfig:
    unknown = sorted(set(raw) - set(_TOP_LEVEL) - set(_SECTION_TYPES))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown config field; known top-level fields are "
            f"{', '.join(list(_TOP_LEVEL) + list(_SECTION_TYPES))}"
        )
    sections: dict[str, Any] = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: must be a table of fields, got {values!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"{name}.{key}: unknown config field; {name} has {', '.join(known)}"
                )
        kwargs = {}
        for key, value in values.items():
            default = getattr(cls(), key)
            kwargs[key] = _coerce(f"{name}.{key}", value, default)
        sections[name] = cls(**kwargs)
    profile = raw.get("profile", "quick")
    if profile not in PROFILES:
        raise ConfigError(
            f"profile: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}"
        )
    seed = _coerce("seed", raw.get("seed", 0), 0)
    config = StudyConfig(profile=profile, seed=seed, **sections)
    validate(config)
    return config


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check a value against the type of the field's default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{name}: must be a list, got {value!r}")
        item_default = default[0] if default else 0.0
        return tuple(_coerce(f"{name}[{i}]", v, item_default) for i, v in enumerate(value))
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported value {value!r}")


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {message}")


def _positive_list(name: str, values: tuple, *, unique: bool = True) -> None:
    _require(len(values) > 0, name, "must not be empty")
    for i, v in enumerate(values):
        _require(v > 0, name, f"every value must be positive (item {i} is {v!r})")
    if unique:
        _require(len(set(values)) == len(values), name, f"has duplicate values {list(values)}")


def validate(c: StudyConfig) -> None:
    _require(c.seed >= 0, "seed", f"must be 0 or more, got {c.seed}")
    _require(c.data.train_limit >= 0, "data.train_limit", "must be 0 (all) or a positive count")
    _require(c.data.test_limit >= 0, "data.test_limit", "must be 0 (all) or a positive count")
    _require(c.data.train_limit <= 60000, "data.train_limit", "MNIST has 60000 training images")
    _require(c.data.test_limit <= 10000, "data.test_limit", "MNIST has 10000 test images")
    _require(c.training.batch_size > 0, "training.batch_size", "must be positive")
    _require(c.training.eval_batch_size > 0, "training.eval_batch_size", "must be positive")
    _positive_list("grid.learning_rates", c.grid.learning_rates)
    for i, v in enumerate(c.grid.weight_decays):
        _require(v >= 0, "grid.weight_decays", f"every value must be 0 or more (item {i} is {v})")
    _require(len(c.grid.weight_decays) > 0, "grid.weight_decays", "must not be empty")
    _require(
        len(set(c.grid.weight_decays)) == len(c.grid.weight_decays),
        "grid.weight_decays",
        "has duplicate values",
    )
    _require(c.grid.folds >= 2, "grid.folds", f"must be 2 or more, got {c.grid.folds}")
    _require(c.grid.epochs >= 1, "grid.epochs", f"must be 1 or more, got {c.grid.epochs}")
    _require(c.grid.size >= 1, "grid.size", f"must be 1 or more, got {c.grid.size}")
    _positive_list("sweep.sizes", c.sweep.sizes)
    _require(c.sweep.epochs >= 1, "sweep.epochs", f"must be 1 or more, got {c.sweep.epochs}")
    _require(c.sweep.plateau_patience >= 0, "sweep.plateau_patience", "must be 0 or more")
    _require(c.sweep.score_last >= 1, "sweep.score_last", "must be 1 or more")
    _require(c.sweep.repeats >= 1, "sweep.repeats", f"must be 1 or more, got {c.sweep.repeats}")
    _require(
        c.sweep.selection in SELECTIONS,
        "sweep.selection",
        f"must be one of {', '.join(SELECTIONS)}, got {c.sweep.selection!r}",
    )
    _require(c.final.epochs >= 1, "final.epochs", f"must be 1 or more, got {c.final.epochs}")
    _require(c.final.size >= 0, "final.size", "must be 0 (the sweep's best size) or positive")
    for name, levels in (
        ("corruption.noise_levels", c.corruption.noise_levels),
        ("corruption.occlusion_levels", c.corruption.occlusion_levels),
    ):
        _require(len(levels) > 0, name, "must not be empty")
        for v in levels:
            _require(v >= 0, name, f"levels must be 0 or more, got {v}")
    for v in c.corruption.occlusion_levels:
        _require(v <= 1, "corruption.occlusion_levels", f"a fraction of pixels, at most 1, got {v}")
    _require(c.corruption.n_images >= 0, "corruption.n_images", "must be 0 (all) or positive")
    _require(c.embedding.n_images >= 10, "embedding.n_images", "must be 10 or more")
    _require(c.embedding.perplexity > 0, "embedding.perplexity", "must be positive")
    _require(
        c.embedding.perplexity < c.embedding.n_images,
        "embedding.perplexity",
        f"must be below embedding.n_images ({c.embedding.n_images})",
    )
    _require(c.embedding.knn >= 1, "embedding.knn", "must be 1 or more")
    _require(c.embedding.seed >= -1, "embedding.seed", "must be -1 (the study's seed) or more")
    _require(c.runtime.workers >= 0, "runtime.workers", "must be 0 (one per core) or positive")
    _require(
        c.runtime.device in DEVICES,
        "runtime.device",
        f"must be one of {', '.join(DEVICES)}, got {c.runtime.device!r}",
    )
    _require(c.runtime.gpu_concurrency >= 1, "runtime.gpu_concurrency", "must be 1 or more")
    n_train = c.data.train_limit or 60000
    _require(
        n_train >= c.grid.folds * 10,
        "data.train_limit",
        f"too few training images ({n_train}) for {c.grid.folds} folds",
    )
    if c.sweep.selection == "validation":
        _require(
            10 <= c.sweep.validation_images <= n_train // 2,
            "sweep.validation_images",
            f"must be from 10 to half the training images ({n_train // 2}), "
            f"got {c.sweep.validation_images}",
        )


def save_config(config: StudyConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def read_saved_config(path: Path) -> StudyConfig:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: no study has run in this work dir yet; run `aemnist run` first"
        ) from None
    return from_dict(raw)
