"""An offline bundle for a GPU node: a wheelhouse of what such a node lacks to run the study.

Compute nodes of GPU clusters are often offline and come with Python, CUDA and torch (with
torchvision, numpy, pandas, pyarrow, scikit-learn and matplotlib) preinstalled. The bundle
holds the rest, built for one Python version and manylinux platform: Prefect, MLflow, their
dependencies and aemnist itself as wheels, an ``install.sh`` and a README.

How the set is found. ``pip download`` cannot leave out a dependency by name, and torch 2.11
and newer have no wheel for manylinux2014, so the preinstalled packages do not take part in
the resolution: each is stood in for by an empty wheel of the version this project is tested
with (``NAME-VERSION+preinstalled-py3-none-any.whl``, pinned by a constraint). Their own
dependencies are then pulled in only where a bundled package asks for them itself (Jinja2,
typing-extensions), so that an old copy on the node can be upgraded from the bundle; the CUDA
libraries, SymPy and the like never are. SciPy is the exception (BROUGHT_ALONG): MLflow asks
for it, but every node with scikit-learn has it. pip evaluates environment markers for the Python it
runs on, not for ``--python-version``, so the bundle is then walked again with the target's
markers: what the target needs and the resolution left out is downloaded (another round of
``pip download``, pinned to what is already there) and what it does not need is removed.

A node's own copy of a preinstalled package can lie outside what the bundled packages ask
(pyarrow 26 beside MLflow 3.17.2, which asks for pyarrow<26). ``install.sh`` checks every one
against those ranges before pip runs, and ``--include NAME`` carries a wheel of that package
at the version this project is tested with, which pip installs only where the node's own
does not fit (into a virtual environment over the node's, beside it).

Every problem (a Python version or platform in an unknown format, an output folder that
cannot be written, pip finding no wheel for the platform) raises ``StackError`` with one line.
"""

from __future__ import annotations

import base64
import email.parser
import hashlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployments.stack import PROJECT_ROOT, StackError

# What a GPU node brings, as the issue lists it; the bundle has none of them.
PREINSTALLED = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "matplotlib",
)
# Dependencies of PREINSTALLED that the bundle's packages ask for too, and that the bundle
# leaves out all the same: scikit-learn cannot be installed without SciPy, and MLflow asks only
# for scipy<2 (no minimum); its wheel alone would be a third of the bundle.
BROUGHT_ALONG = {"scipy": "scikit-learn"}
DEFAULT_PLATFORM = "manylinux2014_x86_64"
STUB_LABEL = "preinstalled"
README_TITLE = "# aemnist offline bundle"
# The legacy manylinux names and the glibc they stand for (PEP 600).
LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
PIP_TIMEOUT_S = 3600


@dataclass
class Target:
    """The interpreter and platform a bundle is for."""

    python: tuple[int, int]
    platform: str  # as given, e.g. manylinux2014_x86_64
    glibc: int  # the minor version of the oldest glibc it runs on (2.glibc)

    @property
    def version(self) -> str:
        return f"{self.python[0]}.{self.python[1]}"

    @property
    def abi(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}"

    def platform_tags(self) -> list[str]:
        """Every manylinux tag a wheel for this platform may carry, newest first (pip itself
        widens only the legacy names, and only to older legacy names)."""
        tags = []
        for minor in range(self.glibc, 4, -1):
            tags.append(f"manylinux_2_{minor}_x86_64")
            tags += [f"{n}_x86_64" for n, m in LEGACY_MANYLINUX.items() if m == minor]
        return tags

    def pip_options(self) -> list[str]:
        options = ["--only-binary=:all:", "--python-version", self.version]
        options += ["--implementation", "cp", "--abi", self.abi]
        for tag in self.platform_tags():
            options += ["--platform", tag]
        return options

    def markers(self) -> list[dict[str, str]]:
        """PEP 508 environment markers of a CPython of this version on Linux x86-64: of its
        first micro release and of a late one (the node's is unknown; a dependency either
        needs is bundled, and pip installs it only where the node's needs it)."""
        return [
            {
                "implementation_name": "cpython",
                "implementation_version": full,
                "os_name": "posix",
                "platform_machine": "x86_64",
                "platform_python_implementation": "CPython",
                "platform_release": "",
                "platform_system": "Linux",
                "platform_version": "",
                "python_full_version": full,
                "python_version": self.version,
                "sys_platform": "linux",
            }
            for full in (f"{self.version}.0", f"{self.version}.99")
        ]


@dataclass
class Bundle:
    """A finished bundle: its folder, its wheels (file names) and what it expects."""

    out: Path
    target: Target
    wheels: list[str]
    # name -> (the version resolved against, what the bundled packages ask of it)
    expected: dict[str, tuple[str, str]] = field(default_factory=dict)
    # preinstalled packages whose wheel the bundle carries all the same: name -> version
    carried: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def parse_target(python: str, platform: str = DEFAULT_PLATFORM) -> Target:
    """The target of ``--python`` and ``--platform``; a StackError for anything else."""
    match = re.fullmatch(r"3\.(\d{1,2})", python.strip())
    if match is None:
        raise StackError(f"--python {python!r}: expected a CPython version such as 3.12")
    minimum = _minimum_python()
    version = (3, int(match.group(1)))
    if version < minimum:
        raise StackError(
            f"--python {python}: aemnist needs Python {minimum[0]}.{minimum[1]} or newer"
        )
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_x86_64", platform)
    modern = re.fullmatch(r"manylinux_2_(\d{1,3})_x86_64", platform)
    if legacy:
        glibc = LEGACY_MANYLINUX[legacy.group(1)]
    elif modern and int(modern.group(1)) >= 5:
        glibc = int(modern.group(1))
    else:
        raise StackError(
            f"--platform {platform!r}: expected a manylinux tag for x86-64, such as "
            f"manylinux2014_x86_64 (glibc 2.17) or manylinux_2_28_x86_64 (glibc 2.28)"
        )
    return Target(version, platform, glibc)


def build_bundle(
    python: str,
    out: Path,
    platform: str = DEFAULT_PLATFORM,
    with_dask: bool = False,
    log: Callable[[str], None] = print,
    include: Sequence[str] = (),
) -> Bundle:
    """Write the bundle for ``python`` on ``platform`` into ``out``, with wheels of the
    preinstalled packages named in ``include`` too; see the module's doc."""
    target = parse_target(python, platform)
    included = _check_include(include)
    out = _check_out(out)
    extras = ["dask"] if with_dask else []
    with tempfile.TemporaryDirectory(prefix="aemnist-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        log("Building the aemnist wheel ...")
        own = _build_own_wheel(tmp)
        stand_ins = _stand_ins(tmp / "stand-ins")
        constraints = [PROJECT_ROOT / "constraints.txt", stand_ins / "constraints.txt"]
        root = f"aemnist{_extras(extras)} @ {own.as_uri()}"
        log(f"Resolving and downloading for Python {target.version} on {platform} ...")
        staged = tmp / "wheels"  # out changes only once the whole set is there
        _pip_download(target, [root], staged, stand_ins, constraints, tmp)
        shutil.copy2(own, staged / own.name)
        expected = _close_for_target(target, staged, extras, stand_ins, constraints, tmp, log)
        carried = {name: expected[name][0] for name in included}
        if carried:
            pins = ", ".join(f"{name} {version}" for name, version in carried.items())
            log(f"Adding, for a node whose own lies outside the ranges: {pins} ...")
            _download_carried(target, carried, staged)
        _clear_earlier_bundle(out)
        for wheel in staged.glob("*.whl"):
            shutil.move(wheel, out / wheel.name)
    wheels = sorted(p.name for p in out.glob("*.whl"))
    bundle = Bundle(out, target, wheels, expected, carried)
    _write_install_script(bundle, extras)
    _write_readme(bundle, extras)
    return bundle


def describe_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _check_include(include: Sequence[str]) -> list[str]:
    """The canonical names of ``--include``, each one of the packages a node brings."""
    allowed = {_canonical(n): n for n in (*PREINSTALLED, *BROUGHT_ALONG)}
    names = []
    for name in include:
        canonical = _canonical(name)
        if canonical not in allowed:
            raise StackError(
                f"--include {name}: the bundle holds every other package already; --include "
                f"takes one of those a node brings: {', '.join(allowed.values())}"
            )
        if allowed[canonical] not in names:
            names.append(allowed[canonical])
    return names


# --- the output folder ----------------------------------------------------------------------


def _check_out(out: Path) -> Path:
    """``out``, created and writable, and empty or holding an earlier bundle."""
    out = out.expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".aemnist-bundle-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StackError(f"cannot write the bundle to {out}: {exc.strerror or exc}") from None
    if any(out.iterdir()) and not _is_bundle(out):
        raise StackError(
            f"{out} is not empty and holds no earlier bundle; give an empty or new folder"
        )
    return out


def _is_bundle(out: Path) -> bool:
    readme = out / "README.md"
    return readme.is_file() and readme.read_text(errors="replace").startswith(README_TITLE)


def _clear_earlier_bundle(out: Path) -> None:
    if not _is_bundle(out):
        return
    for path in out.iterdir():
        if path.is_file() and (path.suffix == ".whl" or path.name in ("install.sh", "README.md")):
            path.unlink()


# --- aemnist's own wheel and the stand-ins for the preinstalled packages ---------------------


def _build_own_wheel(tmp: Path) -> Path:
    """aemnist as a wheel, built from a copy of its sources (setuptools would otherwise write
    build/ and *.egg-info into the checkout, and reuse what an earlier build left there)."""
    pyproject = PROJECT_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        raise StackError(
            f"the bundle builds aemnist's wheel from its sources, and {PROJECT_ROOT} has no "
            f"pyproject.toml; run `aemnist bundle` from a checkout (pip install -e .)"
        )
    project = tomllib.loads(pyproject.read_text())
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", project["project"].get("readme", "README.md")):
        shutil.copy2(PROJECT_ROOT / name, source / name)
    packages = project["tool"]["setuptools"]["packages"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for top in sorted({p.split(".")[0] for p in packages}):
        shutil.copytree(PROJECT_ROOT / top, source / top, ignore=ignore)
    wheels = tmp / "own"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels)]
    if importlib.util.find_spec("setuptools") is not None:
        command.append("--no-build-isolation")  # this environment's setuptools, no download
    _run_pip([*command, str(source)], "build aemnist's wheel")
    (built,) = wheels.glob("aemnist-*.whl")
    return built


def _stand_ins(folder: Path) -> Path:
    """An empty wheel for each preinstalled package, and a constraints file pinning them, so
    that pip resolves around them (the versions: constraints.txt's pins, else this
    environment's, which the tests ran with)."""
    folder.mkdir()
    pins = _pins()
    lines = []
    for name in (*PREINSTALLED, *BROUGHT_ALONG):
        version = pins.get(name) or _installed_version(name)
        stub = f"{version}+{STUB_LABEL}"
        _write_empty_wheel(folder, name, stub)
        lines.append(f"{name}=={stub}")
    (folder / "constraints.txt").write_text("\n".join(lines) + "\n")
    return folder


def _write_empty_wheel(folder: Path, name: str, version: str) -> Path:
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: aemnist bundle\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            data = text.encode()
            wheel.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{member},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def _pins() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].partition("==")
        if sep:
            pins[_canonical(name.strip())] = version.strip()
    return pins


def _installed_version(name: str) -> str:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise StackError(
            f"{name} is not installed here; the bundle is resolved against this environment's "
            f"versions of the packages a GPU node brings (install the project: make run)"
        ) from None
    return version.split("+")[0]


# --- pip --------------------------------------------------------------------------------------


def _pip_download(
    target: Target,
    requirements: list[str],
    out: Path,
    stand_ins: Path,
    constraints: list[Path],
    tmp: Path,
    pinned: dict[str, str] | None = None,
) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--progress-bar", "off"]
    command += [*target.pip_options(), "--find-links", str(stand_ins), "-d", str(out)]
    for path in constraints:
        command += ["-c", str(path)]
    if pinned:
        extra = tmp / "pinned.txt"
        extra.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pinned.items())))
        command += ["-c", str(extra)]
    what = f"bundle for Python {target.version} on {target.platform}"
    _run_pip([*command, *requirements], what, target)
    for stub in stand_ins.glob("*.whl"):  # pip copies the stand-ins it resolved to out
        (out / stub.name).unlink(missing_ok=True)


def _download_carried(target: Target, carried: dict[str, str], out: Path) -> None:
    """The wheels of ``--include``, alone: their own dependencies are the node's (they came
    with its copy), and the stand-ins' constraints would refuse the real versions."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--progress-bar", "off"]
    command += [*target.pip_options(), "--no-deps", "-d", str(out)]
    requirements = [f"{name}=={version}" for name, version in carried.items()]
    what = f"download {', '.join(requirements)} for Python {target.version}"
    _run_pip([*command, *requirements], what, target)


def _run_pip(command: list[str], what: str, target: Target | None = None) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StackError(f"pip could not {what} within {PIP_TIMEOUT_S} s") from None
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    for line in errors:
        unmet = re.match(r"Could not find a version that satisfies the requirement (.*)", line)
        if unmet and target is not None:
            wanted = re.sub(r" \(from versions:[^)]*\)", "", unmet.group(1))
            raise StackError(
                f"pip found no wheel of {wanted} for Python {target.version} on "
                f"{target.platform}; a newer --platform (or another --python) may have one"
            )
    detail = errors[0] if errors else lines[-1] if lines else f"exit code {proc.returncode}"
    raise StackError(f"pip could not {what}: {detail}")


# --- the bundle walked with the target's markers --------------------------------------------


@dataclass
class _Wheel:
    name: str
    version: str
    requires: list[str]
    path: Path


def _close_for_target(
    target: Target,
    out: Path,
    extras: list[str],
    stand_ins: Path,
    constraints: list[Path],
    tmp: Path,
    log: Callable[[str], None],
) -> dict[str, tuple[str, str]]:
    """Make the bundle exactly what ``aemnist[extras]`` needs on the target: download what
    the target's markers ask for and pip left out, drop what they do not ask for. Returns
    what the bundle expects of each preinstalled package."""
    preinstalled = {_canonical(n): v for n, v in _stand_in_versions(stand_ins).items()}
    for _ in range(5):
        wheels = _read_wheels(out)
        needed, missing, conflicts, asked = _walk(target, wheels, extras, set(preinstalled))
        if conflicts:
            raise StackError(f"the bundle is inconsistent for Python {target.version}: "
                             f"{conflicts[0]}")  # fmt: skip
        if not missing:
            for name, wheel in wheels.items():
                if name not in needed:
                    wheel.path.unlink()
            return {
                name: (version, ",".join(sorted(asked.get(name, ()), key=_lower_first)) or "any")
                for name, version in preinstalled.items()
            }
        log(f"Adding what Python {target.version} needs besides: {', '.join(missing)} ...")
        pinned = {w.name: w.version for w in wheels.values() if w.name != "aemnist"}
        _pip_download(target, missing, out, stand_ins, constraints, tmp, pinned)
    raise StackError(f"the bundle for Python {target.version} did not settle after 5 rounds")


def _stand_in_versions(stand_ins: Path) -> dict[str, str]:
    versions = {}
    for line in (stand_ins / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        versions[name] = version.removesuffix(f"+{STUB_LABEL}")
    return versions


def _read_wheels(out: Path) -> dict[str, _Wheel]:
    wheels = {}
    for path in sorted(out.glob("*.whl")):
        with zipfile.ZipFile(path) as archive:
            member = next(
                n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)
            )
            metadata = email.parser.HeaderParser().parsestr(archive.read(member).decode())
        name = _canonical(metadata["Name"])
        wheels[name] = _Wheel(
            name, metadata["Version"], metadata.get_all("Requires-Dist") or [], path
        )
    return wheels


def _walk(
    target: Target, wheels: dict[str, _Wheel], extras: list[str], preinstalled: set[str]
) -> tuple[set[str], list[str], list[str], dict[str, set[str]]]:
    """From aemnist[extras] through the bundle's wheels, under the target's markers: the
    names reached, requirements that no wheel meets (missing), requirements that the wheel
    present does not satisfy (conflicts), and the specifiers asked of preinstalled names."""
    from packaging.requirements import Requirement  # a dependency of Prefect and MLflow

    markers = target.markers()
    done: dict[str, set[str]] = {}
    todo = [("aemnist", set(extras))]
    missing: dict[str, Requirement] = {}
    conflicts: list[str] = []
    asked: dict[str, set[str]] = {}
    while todo:
        name, wanted = todo.pop()
        if name in done and wanted <= done[name]:
            continue
        done.setdefault(name, set()).update(wanted)
        for line in wheels[name].requires:
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": extra})
                for env in markers
                for extra in ("", *wanted)
            ):
                continue
            dep = _canonical(req.name)
            if dep in preinstalled:
                asked.setdefault(dep, set()).update(str(s) for s in req.specifier)
            elif dep not in wheels:
                req.marker = None
                missing.setdefault(dep, req)
            elif not req.specifier.contains(wheels[dep].version, prereleases=True):
                conflicts.append(f"{name} needs {req}, the bundle has {dep} {wheels[dep].version}")
            else:
                todo.append((dep, {_canonical(e) for e in req.extras}))
    return set(done), [str(r) for r in missing.values()], conflicts, asked


def _lower_first(specifier: str) -> tuple[bool, str]:
    return (not specifier.startswith(">"), specifier)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extras(extras: list[str]) -> str:
    return f"[{','.join(extras)}]" if extras else ""


def _minimum_python() -> tuple[int, int]:
    pyproject = PROJECT_ROOT / "pyproject.toml"
    if pyproject.is_file():
        spec = tomllib.loads(pyproject.read_text())["project"].get("requires-python", "")
        match = re.search(r">=\s*3\.(\d+)", spec)
        if match:
            return (3, int(match.group(1)))
    return (3, 11)


# --- install.sh and README.md ---------------------------------------------------------------


def _expectations(bundle: Bundle) -> list[str]:
    lines = []
    for name, (version, asked) in bundle.expected.items():
        why = f", with {BROUGHT_ALONG[name]}" if name in BROUGHT_ALONG else ""
        lines.append(f"{name} ({asked}; resolved against {version}{why})")
    return lines


def _write_install_script(bundle: Bundle, extras: list[str]) -> None:
    version = bundle.target.version
    asked = {name: "" if spec == "any" else spec for name, (_, spec) in bundle.expected.items()}
    expected = "".join(f'echo "  {line}"\n' for line in _expectations(bundle))
    script = f"""#!/bin/sh
# Installs aemnist from this folder without any index: Prefect, MLflow and their dependencies
# come from here; torch and the packages below must already be installed in the Python that
# runs this (PYTHON=/path/to/python, default python3), in the ranges shown, unless this folder
# carries a wheel of one (aemnist bundle --include NAME). Options are passed on to pip
# (e.g. --user). Python {version}, {bundle.target.platform}.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
python=${{PYTHON:-python3}}
echo "Installing aemnist{_extras(extras)} for Python {version} from $here (offline)."
echo "Expected preinstalled in $python:"
{expected}"$python" - "$here" <<'EOF'
import importlib.metadata, pathlib, re, sys
try:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip's own copy, where packaging is not installed
    from pip._vendor.packaging.specifiers import InvalidSpecifier, SpecifierSet
    from pip._vendor.packaging.version import InvalidVersion, Version
if sys.version_info[:2] != {bundle.target.python}:
    sys.exit(f"install.sh: this bundle is for Python {version}; {{sys.executable}} is "
             f"{{sys.version.split()[0]}} (set PYTHON to a Python {version})")
asked = {asked!r}
carried = {{}}  # of those, what this folder has a wheel of: name -> version
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    name = re.sub(r"[-_.]+", "-", name).lower()
    if name in asked:
        carried[name] = version
missing, outside = [], []
for name, spec in asked.items():
    try:
        found = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name in carried:
            print(f"  no {{name}}: this folder's {{name}} {{carried[name]}} will be installed")
        else:
            missing.append(name)
        continue
    try:
        fits = SpecifierSet(spec).contains(Version(found), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        fits = False
    if fits:
        print(f"  found {{name}} {{found}}")
    elif name in carried:
        print(f"  found {{name}} {{found}}, outside {{spec}}: this folder's {{name}} "
              f"{{carried[name]}} will be installed in its place")
    else:
        outside.append((name, found, spec))
if missing:
    sys.exit("install.sh: not installed in " + sys.executable + ": " + ", ".join(missing)
             + " (the bundle leaves them to the node)")
if outside:
    found = "; ".join(f"{{n}} {{v}} is outside {{s}}" for n, v, s in outside)
    include = " ".join(f"--include {{n}}" for n, _, _ in outside)
    sys.exit(f"install.sh: in {{sys.executable}}, {{found}} (what the bundle's packages "
             f"ask): install a version in range there, or rebuild the bundle with "
             f"`aemnist bundle --python {version} {{include}} ...` to carry one")
EOF
exec "$python" -m pip install --no-index --find-links "$here" "$@" "aemnist{_extras(extras)}"
"""
    path = bundle.out / "install.sh"
    path.write_text(script)
    path.chmod(0o755)


def _write_readme(bundle: Bundle, extras: list[str]) -> None:
    target = bundle.target
    wheels = _read_wheels(bundle.out)
    size = sum((bundle.out / w).stat().st_size for w in bundle.wheels)
    expected = "".join(f"- {line}\n" for line in _expectations(bundle))
    contents = "".join(f"- {w.name} {w.version}\n" for w in wheels.values())
    dask = (
        "The Dask task runner (`--task-runner dask`) is in (`--with-dask`)."
        if extras
        else "The Dask task runner is not in; `aemnist bundle --with-dask` adds it."
    )
    flags = "".join(f" --include {name}" for name in bundle.carried)
    if bundle.carried:
        pins = ", ".join(f"{name} {version}" for name, version in bundle.carried.items())
        carried = (
            f"This folder carries {pins} too (`--include`): pip installs it only where the "
            f"node's own lies outside its range above."
        )
    else:
        carried = (
            "`install.sh` stops, naming the package, where the node's own lies outside one "
            "of these ranges; `aemnist bundle --include NAME` carries a wheel of it."
        )
    text = f"""{README_TITLE}

aemnist{_extras(extras)} and what it needs besides what a GPU node brings, as wheels for
CPython {target.version} on {target.platform} (x86-64, glibc 2.{target.glibc} or newer):
{len(bundle.wheels)} wheels, {describe_size(size)}, written by
`aemnist bundle --python {target.version} --platform {target.platform}{flags} --out DIR`.
{dask}

## What the node must have

In the Python that will run aemnist (the versions are what this bundle was resolved
against and tested with; the ranges are what its packages ask for):

{expected}
Their own dependencies (the CUDA libraries among them) come with them and are not here.
{carried}

## Install, offline

```sh
./install.sh            # PYTHON=/path/to/python ./install.sh for another interpreter
```

It checks the Python version and the packages above, then runs
`python -m pip install --no-index --find-links DIR aemnist{_extras(extras)}`; options given
to it go to pip (`--user`). To keep the node's environment as it is, install into a virtual
environment that sees it: `python -m venv --system-site-packages ENV`, then
`PYTHON=ENV/bin/python ./install.sh`. Where that Python is itself a virtual environment (a
CUDA image's `/opt/torch/.venv`, say), ENV sees its base interpreter's packages instead of
that environment's, and install.sh finds no torch: add them to ENV with a `.pth` file in its
site-packages holding the line
`import site; site.addsitedir('/that/venv/lib/python{target.version}/site-packages')`.

## Run

```sh
aemnist run --profile quick --mnist-mirror /path/to/mnist --workdir DIR
```

An offline node needs MNIST from a folder (`--mnist-mirror` or `AEMNIST_MNIST_MIRROR`; the
four files, `.gz` or raw). `aemnist run` starts its own temporary Prefect API and logs to an
MLflow store in the work dir, so nothing else needs to be reachable.

## Contents

{contents}"""
    (bundle.out / "README.md").write_text(text)
