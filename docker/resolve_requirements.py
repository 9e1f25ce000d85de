"""Resolve the server image's pip requirements for the image's interpreter, without installing.

The image (nvcr.io/nvidia/tritonserver:25.07-py3) runs CPython 3.12 on x86_64 with glibc 2.39;
this machine may run another Python. ``pip install --dry-run --only-binary=:all:`` with the
image's tags resolves the same set the image's ``pip install`` would, from the package index,
and reports what it would download::

    python docker/resolve_requirements.py            # table of the largest wheels and the total
    python docker/resolve_requirements.py --json     # the whole resolution

pip's own configuration on this machine (local wheel folders, constraints) is ignored: the
image builds from the public index. ``PIP_INDEX_URL`` and ``PIP_CERT`` are kept (a mirror, a
proxy's certificate).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

DOCKER = pathlib.Path(__file__).resolve().parent
REQUIREMENT_FILES = (DOCKER / "requirements-server.txt", DOCKER / "requirements-export.txt")
PYTHON_VERSION = "3.12"
GLIBC_MINOR = 39  # Ubuntu 24.04, the base of tritonserver:25.07
DEFAULT_INDEX = "https://pypi.org/simple/"
KEPT_PIP_VARIABLES = ("PIP_INDEX_URL", "PIP_CERT", "PIP_DEFAULT_TIMEOUT")
# CUDA major in a distribution's name: nvidia-cudnn-cu13, cucim-cu13, cupy-cuda13x.
CUDA_MAJOR_IN_NAME = re.compile(r"(?:-cu|-cuda)(\d+)x?$")


class IndexUnreachable(RuntimeError):
    """The package index cannot be reached from this machine."""


@dataclasses.dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    url: str
    size_bytes: int | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def platform_tags(glibc_minor: int = GLIBC_MINOR) -> list[str]:
    """Every manylinux tag a glibc-2.<minor> x86_64 system accepts (pip does not expand them)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX)


def check_index_reachable(timeout_s: float = 15.0) -> None:
    """Raise IndexUnreachable (with the reason) when the index does not answer."""
    try:
        with urllib.request.urlopen(urllib.request.Request(index_url(), method="HEAD"), timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as error:
        raise IndexUnreachable(f"package index {index_url()} unreachable: {error}") from error


def pip_environment(home: pathlib.Path) -> dict[str, str]:
    """This process's environment without pip settings, except the index and certificate."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update({key: os.environ[key] for key in KEPT_PIP_VARIABLES if key in os.environ})
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": str(home)})
    return env


def resolve(requirement_files=REQUIREMENT_FILES, python_version: str = PYTHON_VERSION) -> list[Wheel]:
    """The wheels ``pip install -r ...`` would install into the image, in pip's order.

    Raises RuntimeError with pip's error (a conflict, a missing wheel) when it does not resolve.
    """
    with tempfile.TemporaryDirectory(prefix="resolve-image-") as scratch:
        scratch = pathlib.Path(scratch)
        report = scratch / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--only-binary=:all:", f"--python-version={python_version}", "--implementation=cp",
                   f"--abi=cp{python_version.replace('.', '')}", "--abi=abi3", "--abi=none",
                   *(f"--platform={tag}" for tag in platform_tags()), "--platform=any",
                   f"--target={scratch / 'target'}", f"--report={report}"]
        for path in requirement_files:
            command += ["-r", str(path)]
        result = subprocess.run(command, env=pip_environment(scratch), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the image's requirements do not resolve for CPython {python_version}:\n"
                               + (result.stderr or result.stdout)[-4000:])
        installs = json.loads(report.read_text())["install"]
    return [Wheel(i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["url"]) for i in installs]


def with_sizes(wheels: list[Wheel], timeout_s: float = 30.0) -> list[Wheel]:
    """The wheels with their download sizes (HEAD requests, Content-Length)."""

    def size(wheel: Wheel) -> Wheel:
        request = urllib.request.Request(wheel.url, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return dataclasses.replace(wheel, size_bytes=int(response.headers["Content-Length"]))

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(size, wheels))


def cuda_majors(wheels: list[Wheel]) -> dict[str, set[str]]:
    """CUDA major -> the distributions built for it (by name, and cuda-toolkit by version)."""
    majors: dict[str, set[str]] = {}
    for wheel in wheels:
        name = wheel.name.lower().replace("_", "-")
        match = CUDA_MAJOR_IN_NAME.search(name)
        major = match.group(1) if match else (wheel.version.split(".")[0] if name in ("cuda-toolkit", "cuda-bindings") else None)
        if major is not None:
            majors.setdefault(major, set()).add(name)
    return majors


def summary(wheels: list[Wheel], largest: int = 12) -> str:
    """A table of the largest downloads and the total."""
    total = sum(w.size_bytes or 0 for w in wheels)
    lines = [f"{len(wheels)} wheels for CPython {PYTHON_VERSION} x86_64, {total / 1e9:.2f} GB to download:"]
    for wheel in sorted(wheels, key=lambda w: -(w.size_bytes or 0))[:largest]:
        lines.append(f"  {(wheel.size_bytes or 0) / 1e6:8.1f} MB  {wheel.name}=={wheel.version}")
    rest = wheels and sorted(wheels, key=lambda w: -(w.size_bytes or 0))[largest:]
    if rest:
        lines.append(f"  {sum(w.size_bytes or 0 for w in rest) / 1e6:8.1f} MB  {len(rest)} others")
    lines.append("CUDA majors: " + ", ".join(f"{major} ({len(names)} packages)" for major, names in sorted(cuda_majors(wheels).items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docker/resolve_requirements.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print every wheel as JSON")
    args = parser.parse_args(argv)
    try:
        check_index_reachable()
        wheels = with_sizes(resolve())
    except (IndexUnreachable, RuntimeError) as error:
        print(f"resolve_requirements: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps([dataclasses.asdict(w) for w in wheels], indent=1) if args.json else summary(wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
