from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery
from django.test import override_settings

from django_leakguard import celery as leakguard_celery
from django_leakguard import memory
from django_leakguard.celery import (
    WORKER_LOGGER,
    apply_limits,
    configure,
    is_configured,
    pool_size,
)
from django_leakguard.recycling import celery_memory_per_child_kib
from tests import servers

# Unit tests of apply_limits use a stand-in for Celery's WorkController (an attribute bag with
# the attributes Celery's Pool step reads); the real-worker tests below start real workers.


class FakeWorker:
    def __init__(self, app: Celery, concurrency: int = 2, **attrs: Any) -> None:
        self.app = app
        self.concurrency = concurrency
        self.max_concurrency: int | None = None
        self.max_tasks_per_child: int | None = None
        self.max_memory_per_child: int | None = None
        for name, value in attrs.items():
            setattr(self, name, value)


@pytest.fixture
def app() -> Celery:
    return Celery("tests", set_as_current=False)


def test_configure_marks_the_app_and_is_idempotent(app: Celery) -> None:
    assert not is_configured(app)
    configure(app)
    configure(app)
    assert is_configured(app)
    assert leakguard_celery.LeakGuardStep in app.steps["worker"]
    assert not is_configured(Celery("other", set_as_current=False))


def test_apply_limits_fills_in_both_limits(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    worker = FakeWorker(app, concurrency=3)
    with caplog.at_level("INFO", logger=WORKER_LOGGER):
        apply_limits(worker)
    expected = celery_memory_per_child_kib(memory.available_memory(), 0.75, 3)
    assert worker.max_tasks_per_child == 100
    assert worker.max_memory_per_child == expected
    assert app.conf.worker_max_tasks_per_child == 100
    assert app.conf.worker_max_memory_per_child == expected
    assert f"after 100 tasks (LEAKGUARD) and past {expected} KiB of peak RSS" in caplog.text
    assert "x 0.75 / 3 children" in caplog.text


def test_the_limits_line_follows_celerys_worker_logging(
    app: Celery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 16.8: a project's LOGGING for django_leakguard (here: disabled by
    # disable_existing_loggers) does not decide where it goes; the worker's --loglevel and
    # --logfile, set on Celery's loggers, do.
    monkeypatch.setattr(logging.getLogger("django_leakguard"), "disabled", True)
    monkeypatch.setattr(logging.getLogger("django_leakguard.celery"), "disabled", True)
    with caplog.at_level("INFO", logger="celery"):
        apply_limits(FakeWorker(app, concurrency=1))
    assert [record.name for record in caplog.records] == [WORKER_LOGGER]
    assert logging.getLogger(WORKER_LOGGER).parent is logging.getLogger("celery.worker")


def test_explicit_values_win(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    worker = FakeWorker(app, max_tasks_per_child=7, max_memory_per_child=5000)
    with caplog.at_level("INFO", logger=WORKER_LOGGER):
        apply_limits(worker)
    assert (worker.max_tasks_per_child, worker.max_memory_per_child) == (7, 5000)
    assert "after 7 tasks (explicit) and past 5000 KiB of peak RSS (explicit)" in caplog.text


@override_settings(LEAKGUARD={"CELERY_MAX_TASKS_PER_CHILD": 0, "CELERY_MEMORY_FRACTION": None})
def test_limits_can_be_disabled(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    worker = FakeWorker(app)
    with caplog.at_level("INFO", logger=WORKER_LOGGER):
        apply_limits(worker)
    assert (worker.max_tasks_per_child, worker.max_memory_per_child) == (None, None)
    assert "after unlimited tasks (no limit) and past no limit" in caplog.text


def test_autoscale_max_sizes_the_share(app: Celery) -> None:
    assert pool_size(FakeWorker(app, concurrency=2, max_concurrency=8)) == 8
    assert pool_size(FakeWorker(app, concurrency=2)) == 2


@override_settings(LEAKGUARD={"CELERY_MEMORY_FRACTION": 1.5, "CELERY_MAX_TASK_PER_CHILD": 5})
def test_bad_settings_log_one_line_each_and_use_the_defaults(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    worker = FakeWorker(app)
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        apply_limits(worker)
    assert worker.max_tasks_per_child == 100
    assert worker.max_memory_per_child == celery_memory_per_child_kib(
        memory.available_memory(), 0.75, pool_size(worker)
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "CELERY_MEMORY_FRACTION" in warnings[0]
    assert "Using the default 0.75 until then." in warnings[0]
    assert "Did you mean 'CELERY_MAX_TASKS_PER_CHILD'?" in warnings[1]


# Celery's Django fixup runs Django's checks at worker start; Django 6 checks the database too.
@pytest.mark.django_db
def test_the_step_applies_limits_before_the_pool_is_created(app: Celery) -> None:
    # Celery's worker blueprint: every step's __init__ runs before any step's create().
    configure(app)
    worker = app.WorkController(concurrency=2, pool_cls="solo", without_heartbeat=True)
    try:
        assert worker.max_tasks_per_child == 100
        assert worker.max_memory_per_child == celery_memory_per_child_kib(
            memory.available_memory(), 0.75, 2
        )
    finally:
        worker.stop(in_sighandler=False)


# Task recording. Celery's eager mode runs a task in this process with the same signals.


def test_tasks_are_recorded_under_their_name(app: Celery) -> None:
    from django_leakguard.recorder_process import get_recorder

    configure(app)
    app.conf.task_always_eager = True

    @app.task(name="tests.keep")
    def keep() -> int:
        return 1

    recorder = get_recorder()
    recorder.discard()
    keep.delay()
    keep.delay()
    pending = recorder.pending()
    calls = {
        key: aggregate.calls for bucket in pending.values() for key, aggregate in bucket.items()
    }
    assert calls[("task", "tests.keep")] == 2
    assert leakguard_celery._calls == {}
    recorder.discard()


@override_settings(LEAKGUARD={"RECORD": False})
def test_nothing_is_recorded_when_record_is_off(app: Celery) -> None:
    from django_leakguard.recorder_process import get_recorder

    configure(app)
    app.conf.task_always_eager = True

    @app.task(name="tests.quiet")
    def quiet() -> int:
        return 1

    recorder = get_recorder()
    recorder.discard()
    quiet.delay()
    assert not any(("task", "tests.quiet") in bucket for bucket in recorder.pending().values())


def test_in_flight_calls_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    class Task:
        name = "tests.bounded"

    monkeypatch.setattr(leakguard_celery, "_MAX_IN_FLIGHT", 3)
    monkeypatch.setattr(leakguard_celery, "_calls", {})
    for number in range(5):
        leakguard_celery._task_prerun(task_id=str(number), task=Task())
    assert list(leakguard_celery._calls) == ["2", "3", "4"]
    leakguard_celery._task_postrun(task_id="9", task=Task())  # unknown: ignored
    leakguard_celery._task_postrun(task_id=None, task=Task())
    leakguard_celery._task_prerun(task_id=None, task=Task())
    assert len(leakguard_celery._calls) == 3


@override_settings(LEAKGUARD={"RECORD": "yes"})
def test_a_bad_setting_never_fails_a_task() -> None:
    from django_leakguard.recorder_process import recording

    assert recording() is True  # the default stands in
    leakguard_celery._task_prerun(task_id="t-1", task=object())
    assert "t-1" in leakguard_celery._calls
    leakguard_celery._calls.pop("t-1")


# Real Celery workers.


def _broker(tmp_path: Path) -> dict[str, str]:
    url = os.environ.get("LEAKGUARD_TEST_REDIS_URL", "")
    if url:
        # A database of its own, so other Celery tests on the same Redis do not collide.
        return {"CELERY_BROKER_URL": re.sub(r"/\d*$", "", url) + "/14"}
    return {"TESTPROJECT_BROKER_DIR": str(tmp_path / "broker")}


def _send(env: dict[str, str], calls: str) -> None:
    """Send tasks through the test project's app, in a process of its own."""
    script = (
        "import django; django.setup()\n"
        "from testproject.celery import app\n"
        "from shop import tasks\n"
        f"{calls}\n"
    )
    subprocess.run(
        [servers.PYTHON, "-c", script],
        env=env,
        cwd=servers.TESTPROJECT,
        check=True,
        timeout=60,
        capture_output=True,
    )


def _pids(note: Path, count: int, server: servers.Server, timeout: float = 40) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(line) for line in note.read_text().split()] if note.exists() else []
        if len(pids) >= count:
            return pids
        if time.monotonic() > deadline or not server.running():
            raise AssertionError(f"{len(pids)} of {count} tasks ran:\n{server.log()}")
        time.sleep(0.2)


def _worker(tmp_path: Path, env: dict[str, str], *extra: str) -> Any:
    return servers.running(
        "celery",
        servers.celery_worker_command(concurrency=2, extra=extra),
        env=env,
        log_path=tmp_path / "celery.log",
        ready=lambda server: server.wait_for_log(r"celery@\S+ ready", timeout=40),
    )


@pytest.mark.servers
def test_children_recycle_after_max_tasks_and_rows_reach_storage(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite3"
    env = servers.project_env(
        database,
        LEAKGUARD_CELERY_MAX_TASKS_PER_CHILD=3,
        LEAKGUARD_FLUSH_INTERVAL=3600,  # rows are written when a child exits
        **_broker(tmp_path),
    )
    servers.migrate(env)
    note = tmp_path / "pids"
    # worker_concurrency 4 in the app's config: the -c 2 of the command line wins.
    env["CELERY_WORKER_CONCURRENCY"] = "4"
    with _worker(tmp_path, env) as server:
        log = server.log()
        kib = celery_memory_per_child_kib(memory.available_memory(), 0.75, 2)
        assert f"recycle after 3 tasks (LEAKGUARD) and past {kib} KiB of peak RSS" in log
        assert "x 0.75 / 2 children" in log
        _send(env, f"for i in range(12): tasks.add.delay(i, i, note={str(note)!r})")
        pids = _pids(note, 12, server)
        # Let the last children exit after their third task, and flush.
        time.sleep(2)
    counts = servers.runs(pids)
    assert len(counts) >= 4
    assert max(counts.values()) <= 3
    assert (
        servers.manage(
            env,
            "shell",
            "-c",
            "from django_leakguard.models import Growth;"
            "print(sum(Growth.objects.filter(kind='task', key='shop.tasks.add')"
            ".values_list('calls', flat=True)))",
        )
        .strip()
        .splitlines()[-1]
        == "12"
    )


@pytest.mark.servers
def test_a_child_over_the_memory_limit_is_replaced(tmp_path: Path) -> None:
    # A limit of about 250 MiB per child for -c 2, whatever memory this machine has.
    fraction = 2 * 250 * 1024 * 1024 / memory.available_memory()
    env = servers.project_env(
        tmp_path / "db.sqlite3",
        LEAKGUARD_CELERY_MAX_TASKS_PER_CHILD=0,
        LEAKGUARD_CELERY_MEMORY_FRACTION=f"{fraction:.12f}",
        **_broker(tmp_path),
    )
    servers.migrate(env)
    note = tmp_path / "pids"
    with _worker(tmp_path, env) as server:
        kib = celery_memory_per_child_kib(memory.available_memory(), float(f"{fraction:.12f}"), 2)
        server.wait_for_log(f"past {kib} KiB of peak RSS")
        _send(env, f"tasks.leak_retain.delay(300, note={str(note)!r})")
        (leaker,) = _pids(note, 1, server)
        deadline = time.monotonic() + 20
        while psutil.pid_exists(leaker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not psutil.pid_exists(leaker) or psutil.Process(leaker).status() == "zombie"
        # The pool replaced it: ordinary tasks still run, in other children.
        _send(env, f"for i in range(4): tasks.add.delay(i, i, note={str(note)!r})")
        pids = _pids(note, 5, server)
    assert leaker not in pids[1:]


# What a task keeps, per call, in pymalloc blocks (the heap readings' second signal).
def _blocks_per_call(app: Celery, task: Any, calls: int) -> float:
    from django_leakguard.recorder_process import get_recorder

    recorder = get_recorder()
    recorder.discard()
    for _ in range(calls):
        task.delay()
    aggregate = next(
        aggregate
        for bucket in recorder.pending().values()
        for key, aggregate in bucket.items()
        if key == ("task", task.name)
    )
    recorder.discard()
    assert aggregate.heap_calls >= calls - 2  # the first call is warm-up
    return aggregate.blocks_growth / aggregate.heap_calls


_kept: list[object] = []


@pytest.mark.skipif(not memory.heap_available(), reason="no heap signal (glibc mallinfo2)")
def test_a_returned_value_celery_frees_is_not_kept_and_a_kept_one_is(app: Celery) -> None:
    # Celery's tracer still holds a task's return value at task_postrun and frees it right
    # after: a task returning a fresh dict of 40 strings keeps nothing; one that also appends
    # what it returns to a module-level list keeps it all (tasks run by Celery's own tracer,
    # eagerly, in this process).
    configure(app)
    app.conf.task_always_eager = True

    @app.task(name="tests.fresh")
    def fresh() -> dict[str, str]:
        return {f"key {n}": f"value {n} " * 3 for n in range(40)}

    @app.task(name="tests.keeps")
    def keeps() -> dict[str, str]:
        value = {f"key {n}": f"value {n} " * 3 for n in range(40)}
        _kept.append(value)
        return value

    try:
        fresh_blocks = _blocks_per_call(app, fresh, 30)
        kept_blocks = _blocks_per_call(app, keeps, 30)
    finally:
        _kept.clear()
    # 8 blocks a call here (6 before the heap readings deferred the collector's middle
    # generation); 15 before the value was taken off.
    assert fresh_blocks < 12
    assert kept_blocks > 75  # 80 strings and the dict's table


def test_the_return_value_is_taken_off_only_with_the_known_tracer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Called directly: fewer references than Celery's tracer holds mean another tracer, whose
    # count is not known, and the value is never taken off again in this process.
    monkeypatch.setattr(leakguard_celery, "_retval_refs_ok", True)
    unkept = leakguard_celery._unkept_refs()
    assert 3 <= unkept <= 10  # two locals and the dispatch's, as many as this Python holds
    monkeypatch.setattr(leakguard_celery, "_unkept", unkept)
    assert leakguard_celery._returned({}) == ()
    value = ["made here"]
    holders = [value] * (unkept - 3)  # with value and the dict: one fewer than Celery's
    assert leakguard_celery._returned({"retval": value}) == ()
    assert not leakguard_celery._retval_refs_ok
    holders.append(value)  # as many as Celery's
    assert leakguard_celery._returned({"retval": value}) == ()  # turned off
    monkeypatch.setattr(leakguard_celery, "_retval_refs_ok", True)
    assert leakguard_celery._returned({"retval": value}) == (value,)
    holders.append(value)
    assert leakguard_celery._returned({"retval": value}) == ()  # something else keeps it
