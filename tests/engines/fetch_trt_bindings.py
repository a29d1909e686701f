"""Fetch the two TensorRT bindings wheels that ``test_trt_api_names.py`` reads (about 1.3 MB each).

    python tests/engines/fetch_trt_bindings.py [DIR]      # default: $RTD_TRT_BINDINGS or
                                                          # ~/.cache/rtdiffusion/trt-bindings

``test_trt_api_names.py`` calls ``fetch`` once when a wheel is missing (PyPI only) and skips, saying why, when
they cannot be had; run this script to fetch them ahead of time. The wheels are fixed (version, Python tag, platform) and checked against their sha256,
so every machine reads the same bytes; the x86-64 Linux build is read whatever this machine is (nothing is
imported or run). Exit status 0 when both wheels are in DIR, 1 otherwise.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# (requirement, file name, sha256 of the file on PyPI)
WHEELS = {
    "10": ("tensorrt-cu12-bindings==10.16.1.11",
           "tensorrt_cu12_bindings-10.16.1.11-cp311-none-manylinux_2_28_x86_64.whl",
           "150ef2b672487e29a8ea916353467c3e199994fb33589167e3641a928e243aa7"),
    "11": ("tensorrt-cu13-bindings==11.4.0.106",
           "tensorrt_cu13_bindings-11.4.0.106-cp311-none-manylinux_2_28_x86_64.whl",
           "d072ac2a095e2be749fefc847adfb25d5ebe70303401df62ede8fe67a59f27fc"),
}
TAGS = ["--python-version", "3.11", "--implementation", "cp", "--abi", "none",
        "--platform", "manylinux_2_28_x86_64"]


def wheel_dir() -> Path:
    return Path(os.environ.get("RTD_TRT_BINDINGS", "~/.cache/rtdiffusion/trt-bindings")).expanduser()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wheel_path(major: str, folder: Path | None = None) -> Path | None:
    """The verified wheel for TensorRT ``major`` in ``folder``, or None when it is missing or altered."""
    _, name, digest = WHEELS[major]
    path = (folder or wheel_dir()) / name
    return path if path.is_file() and sha256(path) == digest else None


def fetch(folder: Path) -> list[str]:
    """Download what is missing; returns the problems (empty when both wheels are there)."""
    folder.mkdir(parents=True, exist_ok=True)
    problems = []
    for major, (req, name, digest) in WHEELS.items():
        if wheel_path(major, folder):
            continue
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *TAGS,
               "--dest", str(folder), req]
        try:
            subprocess.run(cmd, check=True, timeout=180, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            problems.append(f"{req}: pip download failed: {exc.stderr.strip().splitlines()[-1:]}")
            continue
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{req}: {exc}")
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{req}: pip did not write {name}")
        elif sha256(path) != digest:
            path.unlink()
            problems.append(f"{req}: {name} does not have the expected sha256 {digest} (removed)")
    return problems


def main(argv: list[str]) -> int:
    folder = Path(argv[0]).expanduser() if argv else wheel_dir()
    problems = fetch(folder)
    for p in problems:
        sys.stderr.write(f"fetch_trt_bindings: {p}\n")
    if not problems:
        sys.stdout.write(f"TensorRT bindings wheels in {folder}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
