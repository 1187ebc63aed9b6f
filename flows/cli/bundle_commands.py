"""`aemnist bundle`: a wheelhouse for an offline GPU node (deployments/bundle.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.bundle import BROUGHT_ALONG, DEFAULT_PLATFORM, PREINSTALLED

if TYPE_CHECKING:
    from flows.cli.options import Commands


def add_bundle(commands: Commands) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="write a wheelhouse that installs aemnist on an offline GPU node",
        description="Write into DIR the wheels an offline GPU node lacks to run the study "
        "(Prefect, MLflow and their dependencies, aemnist itself), built for one Python "
        "version and manylinux platform, with install.sh and a README. What such a node "
        f"brings is left out: {', '.join(PREINSTALLED)} and their CUDA libraries. "
        "Downloads from pip's configured index.",
    )
    bundle.add_argument(
        "--python", required=True, metavar="3.X", help="the node's Python version, e.g. 3.12"
    )
    bundle.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="the folder to write: new, empty or an earlier bundle",
    )
    bundle.add_argument(
        "--platform",
        default=DEFAULT_PLATFORM,
        metavar="TAG",
        help=f"the newest manylinux tag for x86-64 that the node's glibc runs; wheels for it "
        f"or any older tag are taken (default: {DEFAULT_PLATFORM}, glibc 2.17; e.g. "
        f"manylinux_2_28_x86_64)",
    )
    bundle.add_argument(
        "--include",
        action="append",
        default=[],
        choices=[*PREINSTALLED, *BROUGHT_ALONG],
        metavar="NAME",
        help="carry a wheel of one of the packages a node brings too (repeatable), at the "
        "version tested with; pip installs it only where the node's own lies outside the "
        "range the bundle asks (e.g. pyarrow 26 beside MLflow's pyarrow<26)",
    )
    bundle.add_argument(
        "--with-dask",
        action="store_true",
        help="add the Dask task runner (the [dask] extra: prefect-dask, distributed)",
    )
    bundle.set_defaults(handler=_bundle)


def _bundle(args: argparse.Namespace) -> int:
    from deployments.bundle import build_bundle, describe_size

    def log(line: str) -> None:
        print(line, flush=True)

    bundle = build_bundle(
        args.python, args.out, args.platform, args.with_dask, log, include=args.include
    )
    files = bundle.files
    print(
        f"Bundle for Python {bundle.target.version} on {bundle.target.platform}: {bundle.out}\n"
        f"  {len(files)} files ({len(bundle.wheels)} wheels, install.sh, README.md), "
        f"{describe_size(bundle.size)}\n"
        f"On the node: {bundle.out / 'install.sh'} (see {bundle.out / 'README.md'})",
        flush=True,
    )
    return 0
