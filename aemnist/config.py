"""Study configuration: the one module that owns profiles, validation and the config hash.

A profile is a TOML file in ``aemnist/profiles``; a user file and CLI flags override any
field. Everything is validated before any work starts, and every error names the field.

The sections are frozen pydantic models: the types, ranges and allowed values live on the
fields (so ``config_json_schema`` documents them), the rules that tie fields together in
validators. A pydantic ``ValidationError`` never escapes this module: ``from_dict`` turns its
first error into one ``ConfigError`` that starts with the dotted field name.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from aemnist.datasets import DEFAULT_DATASET
from aemnist.storage import is_remote, put_whole

Profile = Literal["smoke", "quick", "paper"]
Device = Literal["auto", "cpu", "cuda"]
Selection = Literal["test", "validation"]
Dataset = Literal["mnist", "fashion-mnist", "kmnist"]

# The Literal types are the single source of the allowed values; the tuples are for callers
# (argparse choices, messages).
PROFILES: tuple[str, ...] = get_args(Profile)
# The environment variable naming a folder or URL with the four MNIST files.
MIRROR_ENV = "AEMNIST_MNIST_MIRROR"
DEVICES: tuple[str, ...] = get_args(Device)
SELECTIONS: tuple[str, ...] = get_args(Selection)
# The registry's names (aemnist.datasets.DATASET_NAMES): tests/test_config.py checks they agree.
DATASETS: tuple[str, ...] = get_args(Dataset)

MNIST_TRAIN = 60000
MNIST_TEST = 10000
# numpy's and scikit-learn's random_state, and so the folds and t-SNE, take seeds below 2**32;
# a larger one would pass here and fail half a minute into the run.
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is allowed."""


class DeviceError(ConfigError):
    """runtime.device names a device this machine cannot use; the message says what to run."""


def _rule(field: str, message: str) -> PydanticCustomError:
    """A cross-field rule's error. ``field`` is relative to the model whose validator raises it
    (pydantic locates a model validator's error at the model, not at the field it is about)."""
    return PydanticCustomError("config_rule", "{message}", {"field": field, "message": message})


def _as_tuple(value: Any) -> Any:
    # TOML and JSON give arrays as lists and strict mode takes only tuples for a tuple field;
    # anything else (a bare number, a string) is left to fail as "must be a list".
    return tuple(value) if isinstance(value, list) else value


def _unique(values: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        raise PydanticCustomError(
            "config_duplicates", "has duplicate values {values}", {"values": list(values)}
        )
    return values


# The list types. Bounds sit on the items, so the JSON schema shows them; an item out of its
# bounds is still reported on the list (see _message), as the list is what the user wrote.
# min_length goes right on the tuple: after a validator it would show as a string's minLength.
_UNIQUE = Field(json_schema_extra={"uniqueItems": True})
PositiveFloats = Annotated[
    tuple[Annotated[float, Field(gt=0)], ...],
    Field(min_length=1),
    BeforeValidator(_as_tuple),
    AfterValidator(_unique),
    _UNIQUE,
]
NonNegativeFloats = Annotated[
    tuple[Annotated[float, Field(ge=0)], ...],
    Field(min_length=1),
    BeforeValidator(_as_tuple),
    AfterValidator(_unique),
    _UNIQUE,
]
PositiveInts = Annotated[
    tuple[Annotated[int, Field(gt=0)], ...],
    Field(min_length=1),
    BeforeValidator(_as_tuple),
    AfterValidator(_unique),
    _UNIQUE,
]
Levels = Annotated[
    tuple[Annotated[float, Field(ge=0)], ...], Field(min_length=1), BeforeValidator(_as_tuple)
]
Fractions = Annotated[
    tuple[Annotated[float, Field(ge=0, le=1)], ...],
    Field(min_length=1),
    BeforeValidator(_as_tuple),
]


class _Section(BaseModel):
    # strict: a bool is not an int, a string is not a number, a float is not an int (an int is
    # still taken for a float, and stored as a float, so that the hash sees 0.0 for a TOML 0).
    # frozen: a config is a value (hashable, the key of cached tasks); extra: typos are errors.
    # No inf or nan: no field means anything with them.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    """The images the study uses: MNIST's, or Fashion-MNIST's or KMNIST's (the same shapes)."""

    dataset: Dataset = Field(
        DEFAULT_DATASET,
        description="the dataset: mnist (the seed's), fashion-mnist or kmnist; each is fetched "
        "and checked against its published checksums, and has its own tables and results in "
        "the work dir",
    )
    train_limit: int = Field(
        0, ge=0, le=MNIST_TRAIN, description="training images used; 0 = all 60000"
    )
    test_limit: int = Field(0, ge=0, le=MNIST_TEST, description="test images used; 0 = all 10000")

    @model_serializer(mode="wrap")
    def _mnist_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # MNIST, the default, is left out of the dump: the saved configs, config hashes and
        # cache keys of MNIST studies stay those written before datasets were a field.
        out = handler(self)
        if out.get("dataset") == DEFAULT_DATASET:
            del out["dataset"]
        return out


class TrainingConfig(_Section):
    """Batch sizes of every training and evaluation, and how a model starts."""

    batch_size: int = Field(256, gt=0, description="training mini-batch size")
    eval_batch_size: int = Field(2048, gt=0, description="batch size of the loss evaluations")
    output_bias_at_mean: bool = Field(
        False,
        description="start every model with its output layer's bias at the logit of the "
        "training images' mean intensity, so that it first outputs the mean brightness, not "
        "0.5 everywhere: this stops the dead starts (a run stuck at an all-black output for its "
        "first epochs; bench/dead_starts.py). Off in the paper profile (the seed's protocol)",
    )


class GridConfig(_Section):
    """The learning rate x weight decay grid search, by k-fold cross-validation."""

    learning_rates: PositiveFloats = Field(
        (5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4), description="Adam learning rates searched"
    )
    weight_decays: NonNegativeFloats = Field(
        (5e-4, 1e-4, 5e-5, 1e-5, 5e-6, 1e-6), description="Adam weight decays searched"
    )
    folds: int = Field(3, ge=2, description="cross-validation folds")
    epochs: int = Field(20, ge=1, description="epochs of each fold's training")
    size: int = Field(
        6,
        ge=1,
        description="encoding size of the grid search's models; the seed does not state it, "
        "the laboratory default is 6",
    )
    repeats: int = Field(
        1,
        ge=1,
        description="seeds the grid is trained with (the same folds, other initial weights "
        "and batches): Table 1 then gives mean ± standard deviation over them of each seed's "
        "mean over folds; repeat 0 is the study's own seed",
    )


class SweepConfig(_Section):
    """The encoding-size sweep (Table 2)."""

    sizes: PositiveInts = Field(
        (2, 4, 6, 8, 10, 12, 15, 20, 25, 30), description="encoding sizes trained"
    )
    epochs: int = Field(50, ge=1, description="epochs of each size's training")
    plateau_patience: int = Field(5, ge=0, description="ReduceLROnPlateau patience, in epochs")
    score_last: int = Field(
        5, ge=1, description="a size's score is the mean loss of its last N epochs"
    )
    selection: Selection = Field(
        "test",
        description="which loss drives the scheduler and ranks the sizes (and the final model's "
        'scheduler): "test", as the seed did, or "validation", images held out of the training '
        "set, so that the test set gives the final number only",
    )
    # Checked against the training images in StudyConfig, and only when it is used.
    validation_images: int = Field(
        10000,
        description='training images held out when selection = "validation": from 10 to half '
        "the training images",
    )
    repeats: int = Field(
        1,
        ge=1,
        description="seeds the sweep and the final model are trained with: Table 2 and the "
        "final test MSE then give mean ± standard deviation over them; repeat 0 is the "
        "study's own seed",
    )


class FinalConfig(_Section):
    """The final model, trained on all the training images and scored on the test set."""

    epochs: int = Field(50, ge=1, description="epochs of the final model's training")
    size: int = Field(
        0,
        ge=0,
        description="encoding size of the final model: 0 = the sweep's best size; the paper "
        "profile fixes the seed's 20, so that its final test MSE compares with the seed's 0.0086",
    )


class CorruptionConfig(_Section):
    """The robustness evaluation on noisy and occluded test images."""

    noise_levels: Levels = Field(
        (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        description="Gaussian noise levels α: x + α·N(0, 1) per pixel",
    )
    occlusion_levels: Fractions = Field(
        (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        description="fractions of each image's pixels occluded (random mask and square patch), "
        "from 0 to 1",
    )
    n_images: int = Field(0, ge=0, description="test images corrupted; 0 = the whole test set")
    clip: bool = Field(False, description="clip noisy pixels to [0, 1]; the seed does not")


class EmbeddingConfig(_Section):
    """The t-SNE map of the final model's codes and its k-NN separation score."""

    n_images: int = Field(2000, ge=10, description="the test images sampled and mapped")
    perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity; below embedding.n_images")
    knn: int = Field(5, ge=1, description="neighbours of the k-NN separation score")
    seed: int = Field(
        -1,
        ge=-1,
        le=SEED_MAX,
        description="seed of the sample and of t-SNE; -1 = the study's seed",
    )

    def seed_for(self, study_seed: int) -> int:
        return study_seed if self.seed < 0 else self.seed

    @model_validator(mode="after")
    def _perplexity_below_images(self) -> EmbeddingConfig:
        # t-SNE needs more points than the perplexity (its effective number of neighbours).
        if self.perplexity >= self.n_images:
            raise _rule("perplexity", f"must be below embedding.n_images ({self.n_images})")
        return self


def _storage_url(value: str) -> str:
    """runtime.storage: empty (the work dir) or an object store's URL, ``scheme://...``. The
    message never repeats a value that holds credentials."""
    scheme, _, rest = value.partition("://")
    if value and "@" in rest.split("/", 1)[0]:
        raise PydanticCustomError(
            "config_plain",
            "must not hold credentials (user:secret@...); give them through the store's "
            "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)",
        )
    if value and (scheme in ("", "file", "local") or not rest.strip("/")):
        message = (
            f"must be an object store's URL such as s3://bucket/prefix, got {value!r}; leave "
            f"it empty to keep the study's files in the work dir"
        )
        raise PydanticCustomError("config_plain", "{message}", {"message": message})
    return value


class RuntimeConfig(_Section):
    """Where and how parallel the compute runs. None of it changes the study's arithmetic;
    the device and stacked cells change its float rounding (other kernels)."""

    workers: int = Field(
        0,
        ge=0,
        description="parallel task slots for the grid and sweep fan-out on the CPU; "
        "0 = one per CPU core",
    )
    device: Device = Field(
        "auto",
        description="where tensors live and models train: auto = cuda where torch sees a GPU, "
        "else cpu",
    )
    gpu_concurrency: int = Field(
        8,
        ge=1,
        description="training tasks sharing one GPU at a time, each on its own CUDA stream",
    )
    stacked_cells: int = Field(
        1,
        ge=1,
        description="training runs trained at once as one batched model, in one task "
        "(aemnist.stacked): grid cells of one fold, and the sweep's sizes and seeds (the "
        "narrower codes padded to the widest); on a GPU N runs cost about the kernel launches "
        "of one; each run keeps its own MLflow run, table and learning-rate schedule; 1 = "
        "every run its own task",
    )
    storage: Annotated[str, AfterValidator(_storage_url)] = Field(
        "",
        description="where the stages' tables, cache records, checkpoints, figures and report "
        "lie: empty = the work dir, or an object store's URL (s3://bucket/prefix) whose "
        "credentials come from the environment; the work dir keeps its lock and MLflow store",
    )


class StudyConfig(_Section):
    """The whole study: a profile with a user file and flags over it (aemnist/profiles)."""

    profile: Profile = Field("paper", description="the profile the config starts from")
    seed: int = Field(
        0,
        ge=0,
        le=SEED_MAX,
        description="the study's seed (folds, initial weights, batches, samples); "
        "numpy and torch take 0 to 2**32 - 1",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    final: FinalConfig = Field(default_factory=FinalConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _enough_training_images(self) -> StudyConfig:
        n_train = self.data.train_limit or MNIST_TRAIN
        if n_train < self.grid.folds * 10:
            raise _rule(
                "data.train_limit",
                f"too few training images ({n_train}) for {self.grid.folds} folds",
            )
        # validation_images means nothing under selection = "test", so it is only checked
        # when it is used (a profile may leave its default there).
        sweep = self.sweep
        if sweep.selection == "validation" and not 10 <= sweep.validation_images <= n_train // 2:
            raise _rule(
                "sweep.validation_images",
                f"must be from 10 to half the training images ({n_train // 2}), "
                f"got {sweep.validation_images}",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        # Python mode, then tuples to lists: the JSON mode would write inf/nan as null and is
        # not what the saved configs and the hash were made from.
        return _plain(self.model_dump())

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
        # Over plain lists, ints and floats, in sorted keys: the same digest as the dataclass
        # config gave, so earlier work dirs and MLflow runs keep their hash. A field added
        # since is left out at its default (LATER_FIELDS), for the same reason.
        raw = self.to_dict()
        # Where the files lie is not what the study computes (as the work dir is not).
        del raw["runtime"]["storage"]
        for (section, name), default in LATER_FIELDS.items():
            if raw[section][name] == default:
                del raw[section][name]
        text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def with_overrides(self, overrides: dict[str, Any]) -> StudyConfig:
        """This config with ``overrides`` (nested like a TOML file) merged over it, validated
        again. The frozen models' ``model_copy(update=...)`` would skip validation and replace
        a whole section by a nested dict."""
        return from_dict(merge(self.to_dict(), overrides))


# Fields added after config hashes were first recorded, with the default that leaves a study
# as it was before them: left out of the hash at that default.
LATER_FIELDS: dict[tuple[str, str], Any] = {
    ("grid", "repeats"): 1,
    ("training", "output_bias_at_mean"): False,
    ("runtime", "stacked_cells"): 1,
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of a study config (a profile or a user file), field docs included."""
    return StudyConfig.model_json_schema()


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
    except IsADirectoryError:
        raise ConfigError(
            f"config file {path} is a folder, not a TOML file; give --config the .toml file's path"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files "
            f"are UTF-8: save it as UTF-8 or give --config another file"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(
            f"config file {path} cannot be read ({exc.strerror}); check its permissions or "
            f"give --config another file"
        ) from None


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
    seed: int | None = None,
    device: str | None = None,
    repeats: int | None = None,
    dataset: str | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """The overrides of a run's command-line flags (or flow parameters): only those given."""
    out: dict[str, Any] = {}
    if storage is not None:
        out["runtime"] = {"storage": storage}
    if dataset is not None:
        out["data"] = {"dataset": dataset}
    if seed is not None:
        out["seed"] = seed
    if device is not None:
        out.setdefault("runtime", {})["device"] = device
    if repeats is not None:  # --repeats N: every training stage with N seeds
        out["grid"] = {"repeats": repeats}
        out["sweep"] = {"repeats": repeats}
    return out


def from_dict(raw: dict[str, Any]) -> StudyConfig:
    """A validated StudyConfig from nested plain values (a merged TOML, a saved JSON).

    A dict without ``profile`` is of the default profile, quick (StudyConfig() is paper's)."""
    if isinstance(raw, dict):
        raw = {"profile": "quick", **raw}
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        # One error, the first, named by its field: the CLI prints it as is.
        raise ConfigError(_message(exc.errors(include_url=False)[0])) from None


# How the errors of a field's type read; the value given follows.
_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "model_type": "must be a table of fields",
    "dict_type": "must be a table of fields",
}
_BOUNDS = ("ge", "gt", "le", "lt")


def _message(error: ErrorDetails) -> str:
    """``<dotted field>: <what is wrong and what is allowed>`` for one pydantic error."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    value = error.get("input")
    name = _dotted(loc) or "config"
    if kind == "config_rule":
        field = ctx["field"]
        return f"{_dotted(loc)}.{field}: {ctx['message']}" if loc else f"{field}: {ctx['message']}"
    if kind in ("config_duplicates", "config_plain"):  # the message says it all
        return f"{name}: {error['msg']}"
    if kind == "extra_forbidden":
        return f"{name}: unknown config field; {_known_fields(loc[:-1])}"
    if kind in _TYPE_MESSAGES:
        return f"{name}: {_TYPE_MESSAGES[kind]}, got {value!r}"
    if kind == "literal_error" and tuple(loc) == ("data", "dataset"):
        return (
            f"{name}: unknown dataset {value!r}; choose one of {', '.join(DATASETS)} "
            f"(--dataset or data.dataset in the config file)"
        )
    if kind == "literal_error":
        return f"{name}: must be one of {ctx['expected']}, got {value!r}"
    if kind == "too_short":
        return f"{name}: must not be empty"
    if any(bound in ctx for bound in _BOUNDS):
        if loc and isinstance(loc[-1], int):
            # An item of a list: reported on the list, with the item's place.
            return (
                f"{_dotted(loc[:-1])}: every value must be {_bounds_text(ctx)} "
                f"(item {loc[-1]} is {value!r})"
            )
        # Every bound of the field (the error carries only the one it broke).
        info = _field_at(loc)
        bounds = _field_bounds(info) if info is not None else ctx
        return f"{name}: must be {_bounds_text(bounds)}, got {value!r}"
    return f"{name}: {error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}"


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class a location inside StudyConfig names (``()`` is StudyConfig)."""
    model: type[BaseModel] = StudyConfig
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _field_at(loc: tuple[int | str, ...]) -> FieldInfo | None:
    model = _model_at(loc[:-1])
    return model.model_fields.get(str(loc[-1])) if model is not None and loc else None


def _field_bounds(info: FieldInfo) -> dict[str, Any]:
    # Field(ge=...) lands in the metadata as annotated_types.Ge(ge=...) and the like.
    return {b: getattr(m, b) for m in info.metadata for b in _BOUNDS if hasattr(m, b)}


def _bounds_text(bounds: Mapping[str, Any]) -> str:
    if "ge" in bounds and "le" in bounds:
        return f"from {bounds['ge']} to {bounds['le']}"
    parts = []
    if "ge" in bounds:
        parts.append(f"{bounds['ge']} or more")
    if "gt" in bounds:
        parts.append("positive" if bounds["gt"] == 0 else f"above {bounds['gt']}")
    if "le" in bounds:
        parts.append(f"at most {bounds['le']}")
    if "lt" in bounds:
        parts.append(f"below {bounds['lt']}")
    return " and ".join(parts)


def _known_fields(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc)
    if model is None:
        return "it has no fields"
    known = ", ".join(model.model_fields)
    return f"{_dotted(loc)} has {known}" if loc else f"known top-level fields are {known}"


def save_config(config: StudyConfig, path: Path) -> None:
    """Write the config as JSON, atomically: to a temporary file beside ``path``, then renamed
    over it, so that an interrupted write (a kill, a full disk) leaves the previous file or
    none, never half of one."""
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    if is_remote(path):  # in an object store: one whole object (aemnist.storage)
        put_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return
    # A plain open ("x": a name no one else has) keeps the umask's permissions, as before.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None:
            # Named by the file it is about, not by the temporary one.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def read_saved_config(path: Path) -> StudyConfig:
    rerun = "run `aemnist run` again with the same options to rewrite it"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: no study has run in this work dir yet; run `aemnist run` first"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path} is a folder, not the saved config; remove it and {rerun}"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is not a valid saved config ({exc}); it was cut short or edited: {rerun}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path} cannot be read ({exc.strerror}); check its permissions"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} is not a valid saved config (a JSON {type(raw).__name__}, not an object): "
            f"{rerun}"
        )
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; {rerun}") from None
