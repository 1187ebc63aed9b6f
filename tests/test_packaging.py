"""What the project asks of an environment: Python 3.11 to 3.13, ranges wide enough for a GPU
node's own torch, and the exact versions the tests run with pinned in constraints.txt."""

from __future__ import annotations

import importlib.metadata
import tomllib

from cli_helpers import REPO_ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip()] = version.strip()
    return out


def requirements() -> dict[str, Requirement]:
    listed = list(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        listed += extra
    return {Requirement(r).name: Requirement(r) for r in listed}


def test_every_python_users_run_is_allowed() -> None:
    allowed = SpecifierSet(PROJECT["requires-python"])
    assert all(version in allowed for version in ("3.11", "3.12", "3.13", "3.14"))


def test_gpu_nodes_preinstalled_torch_is_within_range() -> None:
    wanted = requirements()
    assert "2.11.0" in wanted["torch"].specifier
    assert "0.26.0" in wanted["torchvision"].specifier


def test_each_pin_lies_in_its_range_and_is_what_this_environment_runs() -> None:
    wanted = requirements()
    for name, version in pins().items():
        assert version in wanted[name].specifier, (name, version)
        installed = importlib.metadata.version(name).split("+")[0]
        assert installed == version, f"{name} {installed} installed, constraints.txt pins {version}"
    assert {"torch", "torchvision"} <= set(pins())
