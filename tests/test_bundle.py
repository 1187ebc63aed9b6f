"""`aemnist bundle`: a wheelhouse that installs aemnist offline on a GPU node.

The end-to-end test is slow and needs PyPI: it builds a bundle for this machine's Python
from pip's configured index, installs it with `--no-index` (and no pip configuration) into a
fresh virtual environment that plays the node, and runs the smoke study there: 2.5 minutes
on two cores shared with other jobs (load 5 to 8): the bundle 25 to 40 s, the install 30 s,
the smoke study 80 s and more. The node's preinstalled packages (torch, torchvision, numpy,
pandas, pyarrow, scikit-learn, matplotlib and all they depend on, the CUDA libraries
included, and pip) are this environment's own, seen through a .pth file: copying torch with
its CUDA libraries (6 GB here) into a fresh environment would take minutes. The other tests
need no network."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cli_helpers import cli_env, run_cli, smoke_run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deployments.bundle import BROUGHT_ALONG, PREINSTALLED, build_bundle, parse_target
from deployments.stack import StackError

# Never in a bundle: what the node brings, what only it needs, and what a run does not need.
LEFT_OUT = {
    *PREINSTALLED,
    *BROUGHT_ALONG,
    "triton",
    "sympy",
    "networkx",
    "joblib",
    "pillow",
    "distributed",
    "dask",
    "prefect-dask",
    "pytest",
    "ruff",
    "playwright",
}


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """These installed distributions and everything they require, here."""
    done: dict[str, set[str]] = {}
    todo = [(canonicalize_name(n), set()) for n in names]
    while todo:
        name, extras = todo.pop()
        if name in done and extras <= done[name]:
            continue
        done.setdefault(name, set()).update(extras)
        for line in importlib.metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in ("", *done[name])
            ):
                todo.append((canonicalize_name(req.name), set(req.extras)))
    return [importlib.metadata.distribution(name) for name in sorted(done)]


def _make_node(root: Path, own: set[str]) -> Path:
    """A fresh virtual environment that sees the preinstalled packages (and pip), and
    nothing else of this one; returns its python. The packages named in ``own`` are left
    for the test to install into the node's preinstalled folder."""
    node = root / "node"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(node)], check=True)
    preinstalled = root / "preinstalled"
    preinstalled.mkdir()
    for dist in _closure((*PREINSTALLED, "pip")):
        if canonicalize_name(dist.metadata["Name"]) in own:
            continue
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            link = preinstalled / top
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(top)).resolve())
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (node / "lib" / version / "site-packages" / "preinstalled.pth").write_text(f"{preinstalled}\n")
    return node / "bin" / "python"


def _node_env(home: Path, python: Path) -> dict[str, str]:
    """A user's shell on the node: no server addresses, no pip settings of this machine
    (its find-links and extra indexes), nothing of this project's environment."""
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("PIP_")}
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = str(python)
    return env


def _version_in(python: Path, name: str, cwd: Path) -> str | None:
    """The version of ``name`` that ``python`` imports metadata for, or None."""
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: print('')"
    )
    out = subprocess.run(
        [str(python), "-c", code, name], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()
    return out or None


def _wheel_names(folder: Path) -> set[str]:
    return {canonicalize_name(p.name.split("-")[0]) for p in folder.glob("*.whl")}


@pytest.mark.e2e
def test_bundle_installs_offline_on_a_node_and_runs_the_study(
    tmp_path: Path, mnist_mirror: Path
) -> None:
    # The node's pyarrow is newer than MLflow allows (a GPU image's pyarrow 26 beside MLflow
    # 3.17.2's pyarrow<26): install.sh names it, and a bundle that carries pyarrow
    # (--include; its wheels need glibc 2.28) installs its own in its place.
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    bundle = tmp_path / "bundle"
    built = run_cli(
        ["bundle", "--python", python, "--platform", "manylinux_2_28_x86_64",
         "--include", "pyarrow", "--out", str(bundle)],
        tmp_path / "home",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    summary = re.search(
        r"(\d+) files \((\d+) wheels, install.sh, README.md\), ([\d.]+) MB", built.stdout
    )
    assert summary, built.stdout
    files = sorted(p for p in bundle.iterdir())
    assert int(summary.group(1)) == len(files)
    assert float(summary.group(3)) == pytest.approx(
        sum(p.stat().st_size for p in files) / 1e6, abs=0.06
    )
    names = _wheel_names(bundle)
    assert {"aemnist", "prefect", "mlflow", "pydantic", "pyarrow"} <= names
    left_out = {canonicalize_name(n) for n in LEFT_OUT} - {"pyarrow"}
    assert not names & left_out, names & left_out
    assert not [n for n in names if n.startswith(("nvidia", "cuda"))]
    readme = (bundle / "README.md").read_text()
    assert f"{summary.group(2)} wheels, " in readme and " MB" in readme
    assert all(name in readme for name in PREINSTALLED)
    carried = importlib.metadata.version("pyarrow")
    assert f"This folder carries pyarrow {carried} too" in readme
    asked = re.search(r"^- pyarrow \(([^;]*<(\d+)[^;]*);", readme, re.MULTILINE)
    assert asked, "MLflow caps pyarrow no more: test --include with another capped package"
    allowed, cap = asked.groups()

    node_python = _make_node(tmp_path, own={"pyarrow"})
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
         "--target", str(tmp_path / "preinstalled"), f"pyarrow>={cap}"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    newer = _version_in(node_python, "pyarrow", tmp_path)
    assert int(newer.split(".")[0]) >= int(cap)
    env = _node_env(tmp_path / "home", node_python)

    def install(folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(folder / "install.sh"), "--no-compile"],  # 1.5 min less here
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    without = tmp_path / "without-pyarrow"
    without.mkdir()
    for path in bundle.iterdir():
        if not path.name.startswith("pyarrow-"):
            (without / path.name).symlink_to(path)
    refused = install(without)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"install.sh: in {node_python}, pyarrow {newer} is outside {allowed} (what "
        f"the bundle's packages ask): install a version in range there, or rebuild the bundle "
        f"with `aemnist bundle --python {python} --include pyarrow ...` to carry one"
    ]
    assert _version_in(node_python, "aemnist", tmp_path) is None  # pip never ran

    installed = install(bundle)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "found torch" in installed.stdout
    assert (
        f"found pyarrow {newer}, outside {allowed}: this folder's pyarrow "
        f"{carried} will be installed in its place" in installed.stdout
    )
    assert _version_in(node_python, "pyarrow", tmp_path) == carried
    site = node_python.parents[1] / "lib" / f"python{python}" / "site-packages"
    where = subprocess.run(
        [str(node_python), "-c", "import aemnist, mlflow, prefect, torch;"
         "print(aemnist.__file__, mlflow.__file__, prefect.__file__, torch.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=300,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(site) for p in where[:3]), where
    assert Path(where[3]).is_relative_to(tmp_path / "preinstalled"), where
    assert not (site / "torch").exists() and not (site / "numpy").exists()

    workdir = tmp_path / "runs"
    run = subprocess.run(
        [str(node_python.parent / "aemnist"), *smoke_run(workdir, mnist_mirror)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (workdir / "report.md").is_file()


@pytest.mark.parametrize(
    ("python", "platform", "message"),
    [
        ("py3.12", "manylinux2014_x86_64", "expected a CPython version such as 3.12"),
        ("3.12.1", "manylinux2014_x86_64", "expected a CPython version such as 3.12"),
        ("3.10", "manylinux2014_x86_64", "aemnist needs Python 3.11 or newer"),
        ("3.12", "linux_x86_64", "expected a manylinux tag for x86-64"),
        ("3.12", "manylinux2014_aarch64", "expected a manylinux tag for x86-64"),
    ],
)
def test_unknown_python_or_platform_is_one_line(python: str, platform: str, message: str) -> None:
    with pytest.raises(StackError, match=re.escape(message)):
        parse_target(python, platform)


def test_platform_takes_every_older_manylinux_tag() -> None:
    tags = parse_target("3.12").platform_tags()
    assert tags[:2] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert {"manylinux2010_x86_64", "manylinux_2_12_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_18_x86_64" not in tags
    newer = parse_target("3.13", "manylinux_2_28_x86_64")
    assert newer.glibc == 28 and "manylinux2014_x86_64" in newer.platform_tags()
    assert newer.pip_options()[:5] == ["--only-binary=:all:", "--python-version", "3.13",
                                       "--implementation", "cp"]  # fmt: skip


def test_unwritable_or_foreign_out_dir_is_one_line_before_any_download(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli(["bundle", "--python", "3.12", "--out", str(blocker / "dir")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"aemnist: error: cannot write the bundle to {blocker / 'dir'}: Not a directory"
    ]
    with pytest.raises(StackError, match="is not empty and holds no earlier bundle"):
        build_bundle("3.12", tmp_path, log=lambda line: None)


@pytest.mark.e2e
def test_no_wheel_for_the_platform_is_one_line(tmp_path: Path) -> None:
    """Needs PyPI (10 s): no release of cryptography that MLflow accepts has a wheel for
    manylinux1 (glibc 2.5). The output folder stays empty."""
    out = tmp_path / "bundle"
    args = ["bundle", "--python", "3.12", "--platform", "manylinux1_x86_64", "--out", str(out)]
    result = run_cli(args, tmp_path / "home")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(
        r"aemnist: error: pip found no wheel of cryptography\S* \(from mlflow\) for Python "
        r"3\.12 on manylinux1_x86_64; a newer --platform \(or another --python\) may have one",
        line,
    ), line
    assert list(out.iterdir()) == []


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", metadata)


def test_the_bundle_is_walked_with_the_target_pythons_markers(tmp_path: Path) -> None:
    """pip evaluates markers for the Python it runs on; the walk, for the target's."""
    from deployments.bundle import _read_wheels, _walk

    _fake_wheel(tmp_path, "aemnist", "0.1.0", [
        "torch>=2.11", "prefect>=3", 'distributed; extra == "dask"',
        'backport; python_version < "3.12"', 'newer; python_version >= "3.13"',
    ])  # fmt: skip
    _fake_wheel(tmp_path, "prefect", "3.9.1", ["pydantic>=2", "numpy<3"])
    _fake_wheel(tmp_path, "pydantic", "1.10", [])
    _fake_wheel(tmp_path, "backport", "1.0", ['early; python_full_version < "3.11.3"'])
    wheels = _read_wheels(tmp_path)
    preinstalled = {"torch", "numpy"}

    needed, missing, conflicts, asked = _walk(parse_target("3.11"), wheels, [], preinstalled)
    assert needed == {"aemnist", "prefect", "backport"}
    assert missing == ["early"]  # needed on 3.11.0 to 3.11.2
    assert conflicts == ["prefect needs pydantic>=2, the bundle has pydantic 1.10"]
    assert asked == {"torch": {">=2.11"}, "numpy": {"<3"}}

    needed, missing, _, _ = _walk(parse_target("3.13"), wheels, ["dask"], preinstalled)
    assert "backport" not in needed
    assert sorted(missing) == ["distributed", "newer"]


def test_include_takes_only_what_a_node_brings_before_any_download(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(StackError, match=r"--include prefect: the bundle holds every other"):
        build_bundle("3.12", out, include=["prefect"], log=lambda line: None)
    assert not out.exists()
    result = run_cli(["bundle", "--python", "3.12", "--include", "dask", "--out", str(out)],
                     tmp_path / "home")  # fmt: skip
    assert result.returncode == 2
    assert "argument --include: invalid choice: 'dask'" in result.stderr
