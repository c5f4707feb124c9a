"""Download here the wheels an offline GPU machine needs to run moesaic (and ``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_wheels.py [--dest .whl] [--python 3.12] [--have torch triton numpy ...]

GPU nodes often have a CUDA PyTorch image and no network. This walks the required dependencies of the
moesaic installed here (``pip install -e .``) and theirs, at the versions installed here (the ones the
test suite runs with); leaves out the packages the target already has (``--have``, with their
dependencies unless something else needs them); and downloads each remaining one pinned, as a wheel for
the target's Python on manylinux x86-64, without letting pip resolve anything (one version of each, so
the install cannot pull a second). A package published only as source (DeepSpeed) is built here into a
wheel; with its ops left to JIT that wheel is pure Python. On the target:

    pip install --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site

which ``WHEELS=DEST bash benchmarks/gpu_check.sh`` does itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# What a CUDA PyTorch image has: never carried by default (torch and triton must be the image's own builds).
IMAGE = ["torch", "triton", "numpy", "numba", "llvmlite", "pyarrow", "pandas", "sympy", "networkx", "setuptools",
         "jinja2", "markupsafe", "filelock", "fsspec", "typing-extensions", "mpmath", "matplotlib", "pillow",
         "safetensors", "tokenizers", "huggingface-hub", "hf-xet", "tqdm", "pyyaml", "packaging", "pytest"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], have: set[str]) -> dict[str, str]:
    """Installed versions of ``roots`` and everything they need, stopping at the packages in ``have``."""
    found: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in have:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            sys.exit(f"gpu_wheels: {name} is needed but not installed here; install the project first")
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return found


def download(name: str, version: str, dest: Path, python: str) -> None:
    """The target's wheel of ``name==version``; a source-only package is built here into a pure-Python one."""
    binary = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
              python, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest),
              f"{name}=={version}"]
    if subprocess.run(binary, capture_output=True).returncode == 0:
        return
    before = set(dest.glob("*.whl"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest),
                            f"{name}=={version}"], capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"gpu_wheels: no wheel of {name}=={version} for Python {python}: {built.stderr.strip()[-300:]}")
    for wheel in set(dest.glob("*.whl")) - before:
        if not wheel.name.endswith("-none-any.whl"):  # this host's build, not the target's
            wheel.unlink()
            sys.exit(f"gpu_wheels: {name}=={version} has no wheel for Python {python} on manylinux x86-64, and "
                     f"building one here gave {wheel.name}, which only fits this machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=".whl", help="folder for the wheels")
    parser.add_argument("--python", default="3.12", help="the target's Python version")
    parser.add_argument("--have", nargs="*", default=IMAGE, help="packages the target already has")
    parser.add_argument("--extra", nargs="*", default=[], help="more packages to carry, at their versions here")
    args = parser.parse_args()
    wheels = closure(["moesaic", *args.extra], {canonical(h) for h in args.have})
    del wheels["moesaic"]  # the repository itself travels as source
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(wheels.items()):
        download(name, version, dest, args.python)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(wheels)} wheels in {dest} ({size / 2**20:.1f} MiB): {' '.join(sorted(wheels))}")


if __name__ == "__main__":
    main()
