"""The options several commands share, each defined once; and what they select."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from aemnist.config import DATASETS, DEVICES, PROFILES, StudyConfig, load_config, run_overrides
from deployments.stack import LOOPBACK

if TYPE_CHECKING:
    from typing import TypeAlias

    # What `add_subparsers` returns: each command module adds its commands to it.
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_WORKDIR = "aemnist-runs"


def add_workdir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(DEFAULT_WORKDIR),
        help=f"the work dir: the study's tables, checkpoints, figures, report and embedded "
        f"MLflow store (default: ./{DEFAULT_WORKDIR})",
    )


def add_host(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--host",
        default=LOOPBACK,
        help=f"address {what} (default: {LOOPBACK}; 0.0.0.0 --auth for clients on other machines)",
    )


def add_auth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require credentials of every client, generated once into "
        "WORKDIR/server/credentials.env (mode 0600); needed to bind anything but loopback",
    )


def add_port(parser: argparse.ArgumentParser, option: str, default: int) -> None:
    parser.add_argument(
        option,
        type=int,
        default=default,
        metavar="PORT",
        help=f"(default: {default}; 0: a free port, shown in the URL printed)",
    )


def add_dataset(parser: argparse.ArgumentParser) -> None:
    # No argparse choices: an unknown name gets the config's one line (naming the field and
    # the known names), as the same value in a config file does.
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help=f"the dataset ({', '.join(DATASETS)}; data.dataset, default mnist): each has its "
        f"own tables and results in the work dir (another than mnist in WORKDIR/NAME)",
    )


def add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="keep the stage tables, cache records, checkpoints, figures and report in an "
        "object store (s3://bucket/prefix; runtime.storage), credentials from the environment "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for another S3 service); "
        "default: the work dir, which keeps its lock and MLflow store either way",
    )


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """The options that pick a study's config (read by ``study_config``), and its work dir:
    `run` and `status` take the same, so that `status` describes what `run` would do."""
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        help="smoke (about a minute, for tests), quick (the default: full data, reduced grid "
        "and epochs) or paper (the seed's study exactly)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="a TOML file overriding any field of the profile (see aemnist/profiles/*.toml)",
    )
    add_workdir(parser)
    add_dataset(parser)
    add_storage(parser)
    parser.add_argument("--seed", type=int, help="the study's seed (default: the profile's, 0)")
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="train the grid, the sweep and the final model with N seeds (grid.repeats and "
        "sweep.repeats, default 1): Tables 1 and 2, the final test MSE and the targets then "
        "show mean ± standard deviation over them, and how often the seeds agree on the bests",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        help="where models train and evaluate: auto (a GPU where torch sees one, else the CPU), "
        "cpu or cuda; default: the config's runtime.device (auto). On a GPU, "
        "runtime.gpu_concurrency tasks share it",
    )


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The config that ``add_config_options``'s flags select: the profile, the TOML file
    over it, then the flags that override single fields."""
    overrides = run_overrides(args.seed, args.device, args.repeats, args.dataset, args.storage)
    return load_config(args.profile, args.config, overrides)
