"""platform/files.py (a directory built beside its place and renamed in; what killed writers left
behind) and the cache built on it (platform/resources.py ``cached``); no megatron, no network."""

import os
import subprocess

import pytest

from megatron_let.platform import files, resources
from megatron_let.platform.files import HOST, remove_stale_partials, staged_directory


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _beside(target) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_a_staged_directory_appears_whole_with_the_umask_mode(tmp_path):
    target = tmp_path / "sub" / "out"
    old = os.umask(0o027)
    try:
        with staged_directory(target, replace=False) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(f".out.{HOST}-{os.getpid()}-")
            assert tmp.name.endswith(".partial") and not target.exists()
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert (target / "a.txt").read_text() == "a"
    assert target.stat().st_mode & 0o777 == 0o750
    assert _beside(target) == []


def test_a_failed_block_leaves_nothing_and_the_target_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_directory(target, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert _beside(target) == []


def test_replace_or_refuse_an_existing_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        with staged_directory(target, replace=False) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"] and _beside(target) == []
    with staged_directory(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and _beside(target) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_directory(empty, replace=False) as tmp:  # an empty directory is replaced
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in empty.iterdir()) == ["new.txt"]


def test_only_the_leftovers_of_gone_processes_on_this_host_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    assert not files.process_alive(dead) and files.process_alive(live)
    names = {
        "dead": f".out.{HOST}-{dead}-0a1b2c3d.partial",
        "dead_replaced": f".out.{HOST}-{dead}-0a1b2c3e.replaced",
        "live": f".out.{HOST}-{live}-0a1b2c3d.partial",
        "mine": f".out.{HOST}-{os.getpid()}-0a1b2c3d.partial",
        "other_host": f".out.some-other-host-{dead}-0a1b2c3d.partial",
        "other_name": f".out2.{HOST}-{dead}-0a1b2c3d.partial",
        "not_ours": ".out.notes.partial",
        "checkpoint_tmp": f".out.{HOST}-{dead}-0a1b2c3d.tmp",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    (tmp_path / f".out.{HOST}-{dead}-0a1b2c3f.partial").write_text("a file, too")
    removed = remove_stale_partials(tmp_path, "out")
    assert sorted(p.name for p in removed) == sorted(
        [names["dead"], names["dead_replaced"], f".out.{HOST}-{dead}-0a1b2c3f.partial"]
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(v for k, v in names.items() if k not in ("dead", "dead_replaced"))
    assert remove_stale_partials(tmp_path / "missing", "out") == []


def test_a_staged_directory_removes_dead_leftovers_first(tmp_path):
    target = tmp_path / "out"
    leftover = tmp_path / f".out.{HOST}-{_dead_pid()}-deadbeef.partial"
    leftover.mkdir()
    with staged_directory(target, replace=False):
        assert not leftover.exists()
    assert _beside(target) == []


# ---------------------------------------------------------------------------------------------
# The cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_LET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_cache_entry_is_built_once(cache):
    calls = []

    def build(directory):
        calls.append(directory)
        (directory / "data.txt").write_text("data")

    first = resources.cached("kind", "name==1.0", build)
    assert first == cache / "kind" / "name-1.0"
    assert (first / "data.txt").read_text() == "data"
    assert (first / resources.COMPLETE).read_text() == "name==1.0\n"
    assert resources.cached("kind", "name==1.0", build) == first and len(calls) == 1
    assert resources.cached("kind", "@scope/pkg@2", lambda d: None) == cache / "kind" / "-scope_pkg-2"


def test_a_failed_build_leaves_no_entry_and_an_incomplete_one_is_rebuilt(cache):
    def broken(directory):
        (directory / "half.txt").write_text("half")
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError, match="download failed"):
        resources.cached("kind", "x", broken)
    assert os.listdir(cache / "kind") == []
    stale = cache / "kind" / "x"  # a directory without the marker (not made by cached)
    stale.mkdir()
    (stale / "junk").write_text("junk")
    entry = resources.cached("kind", "x", lambda d: (d / "good").write_text("good"))
    assert sorted(p.name for p in entry.iterdir()) == [resources.COMPLETE, "good"]


def test_a_concurrent_builder_that_finishes_first_wins(cache):
    def build(directory):
        (directory / "mine").write_text("mine")
        other = cache / "kind" / "x"  # another process renames its complete copy into place meanwhile
        other.mkdir(parents=True)
        (other / "theirs").write_text("theirs")
        (other / resources.COMPLETE).write_text("x\n")

    entry = resources.cached("kind", "x", build)
    assert sorted(p.name for p in entry.iterdir()) == [resources.COMPLETE, "theirs"]
    assert os.listdir(cache / "kind") == ["x"]


def test_progress_is_drawn_by_the_first_process_on_a_terminal_only(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert resources.progress(range(3)).disable
    monkeypatch.setenv("RANK", "0")
    assert resources.progress(range(3)).disable  # pytest's stderr is not a terminal
