"""Writing so that a reader never sees anything half-written: a file or a directory is built under a
temporary name beside its destination, then renamed into place at once. Permissions follow the
umask, as for any new file.

* :func:`write_text_atomic`: one file (a temp file in the same directory, then ``os.replace``).
* :func:`staged_directory`: a whole directory (``.<name>.<host>-<pid>-<random>.partial`` beside it).
  A process killed by SIGKILL cannot clean up after itself; its temporary directory names the host
  and the process that wrote it, so that :func:`remove_stale_partials` (which every
  :func:`staged_directory` calls first) removes it once that process is gone, and never a live
  writer's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import string
import tempfile
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

HOST = socket.gethostname()
PARTIAL = ".partial"  # a directory being built
REPLACED = ".replaced"  # the destination's previous contents, on their way out
_SUFFIXES = (PARTIAL, REPLACED)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once (a crash leaves the old file or the new one, and at
    worst a ``.<name>.*.tmp`` beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from the group
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temp_name(name: str, suffix: str) -> str:
    """``.<name>.<host>-<pid>-<random>.<suffix>``: who writes it, and unique within the process."""
    return f".{name}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _writer(entry: str, name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary entry :func:`staged_directory` made for ``name``; None for any
    other entry (including those of another name that merely starts the same way)."""
    prefix = f".{name}."
    suffix = next((s for s in _SUFFIXES if entry.endswith(s)), None)
    if suffix is None or not entry.startswith(prefix):
        return None
    parts = entry[len(prefix) : -len(suffix)].rsplit("-", 2)
    if len(parts) != 3:
        return None
    host, pid, token = parts
    if not host or not pid.isdigit() or not token or any(c not in string.hexdigits for c in token):
        return None
    return host, int(pid)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal exists, too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_partials(parent: str | Path, name: str) -> list[Path]:
    """Remove what earlier :func:`staged_directory` calls for ``parent/name`` left behind when
    their process was killed (SIGKILL, out of memory, a node reboot): the temporary entries written
    on this host by a process that no longer exists. Those of a live process (another writer at
    work), of this process, or written on another host (whose processes cannot be checked from
    here) are left alone. Returns what was removed."""
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        writer = _writer(entry.name, name)
        if writer is None:
            continue
        host, pid = writer
        if host != HOST:
            logger.info("leaving %s: written on host %s, whose processes cannot be checked from here", entry, host)
            continue
        if pid == os.getpid() or process_alive(pid):
            continue
        try:
            _remove(entry)
        except FileNotFoundError:  # another process cleaned it up first
            continue
        except OSError as err:
            logger.warning("cannot remove %s, left by an interrupted run: %s", entry, err.strerror)
            continue
        logger.warning("removed %s, left by an interrupted run (process %d is gone)", entry, pid)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_directory(target: str | Path, *, replace: bool) -> Iterator[Path]:
    """A new, empty directory beside ``target`` to build it in; renamed to ``target`` when the
    block ends without an exception, removed (and ``target`` untouched) when it raises.

    ``replace``: an existing ``target`` is renamed away first, then deleted (a reader sees the old
    contents or the new ones, never a mix). Without it, an empty directory at ``target`` is
    replaced and anything else raises :class:`FileExistsError` (the new directory is removed).
    The directory is made with the umask's mode (``mkdtemp``'s 0700 would hide it from the group);
    leftovers of killed earlier runs for ``target`` are removed first (:func:`remove_stale_partials`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent, target.name)
    while True:
        tmp = target.parent / _temp_name(target.name, PARTIAL)
        try:
            tmp.mkdir()
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        yield tmp
        if replace and os.path.lexists(target):
            old = target.parent / _temp_name(target.name, REPLACED)
            os.replace(target, old)
            os.replace(tmp, target)
            try:
                _remove(old)
            except OSError as err:
                logger.warning("cannot remove %s (the previous %s): %s", old, target, err.strerror)
        else:
            try:
                os.replace(tmp, target)  # an empty directory is replaced, too
            except OSError as err:
                if target.is_dir() and any(target.iterdir()):
                    raise FileExistsError(err.errno, f"{target}: exists and is not empty") from None
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
