from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import psutil
import pytest

from django_leakguard import memory


def test_rss_matches_psutil() -> None:
    ours = memory.rss()
    theirs = psutil.Process().memory_info().rss
    assert abs(ours - theirs) < 8 * 1024 * 1024


def test_rss_grows_with_touched_memory() -> None:
    before = memory.rss()
    block = os.urandom(32 * 1024 * 1024)
    after = memory.rss()
    assert after - before >= 24 * 1024 * 1024
    del block


def test_heap_counts_large_allocations() -> None:
    if not memory.heap_available():
        pytest.skip("glibc mallinfo2 is not available here")
    gc.collect()
    gc.disable()  # garbage freed between the readings would lower the difference
    try:
        before = memory.heap()
        block = os.urandom(4 * 1024 * 1024)
        after = memory.heap()
    finally:
        gc.enable()
    assert before is not None
    assert after is not None
    # Other objects may be freed meanwhile (a few KiB), never 4 MiB.
    assert after - before >= 4 * 1024 * 1024 - 64 * 1024
    del block


def test_held_signals_are_blocked_only_while_the_heap_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Where a server's signal handler exits from C (uWSGI), a stop inside mallinfo2(), which
    # holds the allocator's lock, hung the exit (tests/test_uwsgi.py shows it on a real
    # worker). What the thread's mask is inside the C call cannot be seen from Python: a
    # stand-in reads it in mallinfo2()'s place, then returns the real figures.
    real = memory._mallinfo2
    assert real is not None
    masks: list[set[signal.Signals]] = []

    def reading_the_mask() -> memory._Mallinfo2:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return real()

    monkeypatch.setattr(memory, "_mallinfo2", reading_the_mask)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGTERM not in before
    assert memory.heap() is not None
    assert signal.SIGTERM not in masks[-1]  # nothing held unless a server asks
    memory.hold_signals_in_heap_readings((signal.SIGINT, signal.SIGTERM))
    try:
        heap = memory.heap()
    finally:
        memory.hold_signals_in_heap_readings(())
    assert heap is not None
    assert heap > 0
    assert {signal.SIGINT, signal.SIGTERM} <= masks[-1]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # given back


def test_rss_reopens_after_fork() -> None:
    memory.rss()  # opens the descriptor in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            block = os.urandom(64 * 1024 * 1024)
            child = memory.rss()
            own = psutil.Process().memory_info().rss
            os.write(write, f"{child} {own} {len(block)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    data = os.read(read, 100).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    child, own = int(data[0]), int(data[1])
    assert abs(child - own) < 4 * 1024 * 1024
    assert child > memory.rss() + 32 * 1024 * 1024


def _tree(tmp_path: Path, files: dict[str, str], cgroup: str = "0::/\n") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(cgroup)
    return root, proc


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    root, proc = _tree(
        tmp_path, {"app/memory.max": "536870912\n", "memory.max": "max\n"}, "0::/app\n"
    )
    assert memory.cgroup_limit(root, proc) == 512 * 1024**2
    assert memory.available_memory(root, proc) == 512 * 1024**2


def test_cgroup_v2_parent_limit_is_smaller(tmp_path: Path) -> None:
    root, proc = _tree(
        tmp_path,
        {"a/b/memory.max": "max\n", "a/memory.max": "1048576\n"},
        "0::/a/b\n",
    )
    assert memory.cgroup_limit(root, proc) == 1024**2


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    root, proc = _tree(tmp_path, {"memory.max": "max\n"})
    assert memory.cgroup_limit(root, proc) is None
    assert memory.available_memory(root, proc) == psutil.virtual_memory().total


def test_cgroup_v1_limit_and_sentinel(tmp_path: Path) -> None:
    root, proc = _tree(tmp_path, {"memory/memory.limit_in_bytes": "268435456\n"}, "")
    assert memory.cgroup_limit(root, proc) == 256 * 1024**2
    root2, proc2 = _tree(
        tmp_path / "x", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, ""
    )
    assert memory.cgroup_limit(root2, proc2) is None


def test_cgroup_garbage_and_missing(tmp_path: Path) -> None:
    root, proc = _tree(tmp_path, {"memory.max": "banana\n"})
    assert memory.cgroup_limit(root, proc) is None
    assert memory.cgroup_limit(tmp_path / "nowhere", tmp_path / "nothing") is None


def test_limit_above_host_memory_is_capped(tmp_path: Path) -> None:
    huge = psutil.virtual_memory().total * 4
    root, proc = _tree(tmp_path, {"memory.max": f"{huge}\n"})
    assert memory.available_memory(root, proc) == psutil.virtual_memory().total
