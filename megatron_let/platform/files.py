"""Writing a file so that a reader never sees it half-written: a temp file in the same directory,
then one atomic rename. Permissions follow the umask, as for any new file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
