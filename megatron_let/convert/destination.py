"""Where a conversion writes: refuse what must not be overwritten, build the result in a temporary
directory beside the destination, give every file the mode the umask asks for, then rename it
into place, so that nothing half-written ever appears at the destination."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from megatron_let.convert.common import ConversionError
from megatron_let.platform.files import current_umask, staged_directory

logger = logging.getLogger(__name__)

# What interrupted checkpoint saves leave behind (megatron_let.checkpoint): not content.
_LEFTOVER_SUFFIXES = (".tmp", ".deleting")
# In an imported checkpoint's config: where it came from (written by megatron_io.import_checkpoint).
SOURCE_KEY = "converted_from"


def apply_umask(root: Path) -> None:
    """Every directory 0777 and every file 0666 less the umask, whatever created them (safetensors
    writes 0600, ``mkdtemp`` makes 0700): the same rule as ``open()`` and ``mkdir``."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def contents(directory: Path) -> list[str]:
    """The entries of ``directory`` that are not leftovers of interrupted saves."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(_LEFTOVER_SUFFIXES))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _plain(out: Path, flag: str) -> Path:
    out = out.expanduser()
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{flag} {out}: exists and is not a directory")
    return out


def _checkpoint_summary(out: Path) -> Optional[dict]:
    """None when ``out`` holds no megatron-let checkpoint; else what it holds: the iteration,
    whether that is the only checkpoint, and the import record if an import wrote it."""
    from megatron_let import checkpoint

    try:
        if not checkpoint.has_checkpoint(out):
            return None
        common = checkpoint.read_common_state(out)
    except Exception as err:  # noqa: BLE001 - something checkpoint-like we cannot read: keep away from it
        return {"iteration": None, "only": False, "record": None, "error": str(err)}
    iterations = checkpoint.saved_iterations(out)
    config = common.get("config") or {}
    return {
        "iteration": common.get("iteration"),
        "only": iterations in ([], [common.get("iteration")]),
        "record": config.get(SOURCE_KEY) if isinstance(config, dict) else None,
        "has_optimizer": bool(common.get("has_optimizer")),
    }


def check_import_destination(out: Path, overwrite: bool) -> Path:
    """An import writes a new checkpoint root. Refused: a directory holding a training checkpoint
    (an import would move its tracker back to iteration 0), or other files; a previous import is
    replaced only with ``overwrite``."""
    out = _plain(out, "--output")
    present = contents(out)
    if not present:
        return out
    summary = _checkpoint_summary(out)
    if summary is None:
        raise ConversionError(
            f"--output {out}: not empty ({_shown(present)}) and not a checkpoint that "
            "`convert import` wrote; refusing to write into it (choose a new or empty directory)"
        )
    previous_import = (
        summary["record"] is not None
        and summary["iteration"] == 0
        and summary["only"]
        and not summary.get("has_optimizer")
    )
    if not previous_import:
        what = (
            "a megatron-let checkpoint that cannot be read"
            if summary["iteration"] is None
            else f"a megatron-let training checkpoint (iteration {summary['iteration']})"
        )
        raise ConversionError(
            f"--output {out}: holds {what}; refusing to import over it (that would move its "
            f"tracker back to iteration 0): choose another --output"
        )
    if not overwrite:
        raise ConversionError(
            f"--output {out}: already holds a checkpoint imported from "
            f"{summary['record'].get('path', '?')}; pass --overwrite to replace it"
        )
    return out


def check_export_destination(out: Path, overwrite: bool, source: Optional[Path] = None) -> Path:
    """An export writes a Hugging Face directory. Refused: a non-empty directory (unless
    ``overwrite``), a megatron-let checkpoint (always), and any directory that contains, or lies
    inside, the checkpoint being exported."""
    out = _plain(out, "--output")
    if source is not None:
        source = Path(source).resolve()
        target = out.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ConversionError(
                f"--output {out}: overlaps the checkpoint being exported ({source}); choose a directory outside it"
            )
    present = contents(out)
    if not present:
        return out
    if _checkpoint_summary(out) is not None:
        raise ConversionError(
            f"--output {out}: holds a megatron-let checkpoint; an export writes a Hugging Face "
            "model: choose another --output"
        )
    if not overwrite:
        raise ConversionError(
            f"--output {out}: not empty ({_shown(present)}); refusing to mix the exported model "
            "with these files: choose an empty directory, or pass --overwrite to replace them"
        )
    return out


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write into (``platform.files.staged_directory``);
    on success its modes follow the umask and it replaces ``out`` (an existing ``out`` is renamed
    away first and then deleted); on failure it is removed and ``out`` is untouched. What a
    conversion killed earlier (SIGKILL) left beside ``out`` is removed first, once its process is
    gone."""
    with staged_directory(out, replace=True) as tmp:
        yield tmp
        apply_umask(tmp)
