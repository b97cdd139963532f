#!/usr/bin/env python3
"""Build the router's wheel on the Ansible controller, reproducibly, and only when its source changed.

Run by tasks/install.yml (delegate_to: localhost, run_once). Prints one JSON object:
  {"wheel": "/abs/path/llm_router-X-py3-none-any.whl", "sha256": "...", "source_hash": "...", "built": true|false}

- The files that go into the wheel (pyproject.toml and friends, README/LICENSE, the package directories named in
  [tool.setuptools] packages) are hashed; the wheel is cached under CACHE/<source hash>/ and reused while that hash
  is unchanged, so a second playbook run neither rebuilds nor changes anything.
- The build runs on a copy of exactly those files (no build/ or *.egg-info left in, or read from, the source
  tree; no race with a developer's own builds), with SOURCE_DATE_EPOCH fixed and file modes normalised: the same
  source gives a byte-identical wheel even when the cache is gone (with the same setuptools).
- A lock file serialises concurrent builds (several playbooks or molecule runs in one tree).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

TOP_LEVEL_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
TOP_LEVEL_PREFIXES = ("README", "LICENSE", "LICENCE", "COPYING", "NOTICE")
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")
# 1980-01-01: the earliest time a zip entry can carry.
SOURCE_DATE_EPOCH = "315532800"
KEEP_BUILDS = 3


def package_dirs(source: Path) -> list[str]:
    """Top-level package directories named in pyproject.toml ([tool.setuptools] packages), else every
    top-level directory with an __init__.py."""
    names: set[str] = set()
    pyproject = source / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        packages = data.get("tool", {}).get("setuptools", {}).get("packages")
        if isinstance(packages, list):
            names = {str(p).split(".", 1)[0] for p in packages}
    if not names:
        names = {p.parent.name for p in source.glob("*/__init__.py")}
    return sorted(n for n in names if (source / n).is_dir())


def source_files(source: Path) -> list[Path]:
    """Relative paths of every file that can end up in the wheel, sorted."""
    files: list[Path] = []
    for entry in sorted(source.iterdir()):
        if entry.is_file() and (entry.name in TOP_LEVEL_FILES or entry.name.startswith(TOP_LEVEL_PREFIXES)):
            files.append(entry.relative_to(source))
    for name in package_dirs(source):
        for root, dirs, names in os.walk(source / name):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
            for fname in sorted(names):
                if not fname.endswith(SKIP_SUFFIXES):
                    files.append((Path(root) / fname).relative_to(source))
    return files


def source_hash(source: Path, files: list[Path], build_args: list[str]) -> str:
    digest = hashlib.sha256()
    for rel in files:
        data = (source / rel).read_bytes()
        digest.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    digest.update(json.dumps(build_args).encode())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(source: Path, files: list[Path], out_dir: Path, python: str, build_args: list[str]) -> Path:
    with tempfile.TemporaryDirectory(prefix="llm-router-wheel-") as tmp:
        copy = Path(tmp) / "src"
        for rel in files:
            dest = copy / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, dest)
            os.chmod(dest, 0o644)
            os.utime(dest, (int(SOURCE_DATE_EPOCH), int(SOURCE_DATE_EPOCH)))
        wheel_dir = Path(tmp) / "wheel"
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PYTHONHASHSEED="0")
        cmd = [
            python,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(wheel_dir),
            *build_args,
            str(copy),
        ]
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"building the wheel failed: {' '.join(cmd)}")
        wheels = sorted(wheel_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel from the build, found {[w.name for w in wheels]}")
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copyfile(wheels[0], staging / wheels[0].name)
        staging.rename(out_dir)
    return out_dir / wheels[0].name


def prune(cache: Path, keep: Path) -> None:
    """Keep the newest few builds (other checkouts may still want theirs), drop the rest."""
    builds = sorted(
        (d for d in cache.iterdir() if d.is_dir() and d != keep and not d.name.endswith(".tmp")),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="the project directory (with pyproject.toml)")
    parser.add_argument("--cache", required=True, help="where built wheels are kept")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose pip builds the wheel")
    parser.add_argument("--build-arg", action="append", default=[], help="extra argument for `pip wheel`")
    args = parser.parse_args()

    source = Path(args.source).resolve()
    if not (source / "pyproject.toml").is_file() and not (source / "setup.py").is_file():
        raise SystemExit(f"{source} has no pyproject.toml or setup.py: set llm_router_source_dir or llm_router_wheel")
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    files = source_files(source)
    shash = source_hash(source, files, args.build_arg)
    out_dir = cache / shash[:20]
    built = False
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = sorted(out_dir.glob("*.whl")) if out_dir.is_dir() else []
        if len(wheels) == 1:
            wheel = wheels[0]
            os.utime(out_dir)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            wheel = build(source, files, out_dir, args.python, args.build_arg)
            built = True
        prune(cache, out_dir)
    json.dump({"wheel": str(wheel), "sha256": sha256_file(wheel), "source_hash": shash, "built": built}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
