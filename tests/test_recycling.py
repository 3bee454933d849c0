from __future__ import annotations

from pathlib import Path

import pytest

from django_leakguard import conf, memory, recycling


def settings(**raw: object) -> conf.Settings:
    return conf.build_settings(raw)


@pytest.mark.parametrize(
    ("max_requests", "jitter", "processes", "delta"),
    [(1000, 0.05, 4, 17), (1000, 0.1, 2, 100), (1000, 0.1, 1, 100), (500, 0.0, 8, 0)],
)
def test_max_requests_delta(max_requests: int, jitter: float, processes: int, delta: int) -> None:
    assert recycling.max_requests_delta(max_requests, jitter, processes) == delta


def test_parse_version() -> None:
    assert recycling.parse_version("2.0.31-dev") == (2, 0, 31)
    with pytest.raises(ValueError, match="version"):
        recycling.parse_version("latest")


def test_render_uwsgi_with_delta_and_memory() -> None:
    text = recycling.render_uwsgi(
        settings(MAX_REQUESTS=1000, MAX_REQUESTS_JITTER=0.05, WORKER_MAX_MEMORY="500MB"),
        4,
        "2.0.31",
    )
    assert "max-requests = 1000\n" in text
    assert "max-requests-delta = 17\n" in text
    assert "reload-on-rss = 476\n" in text  # 500 MB rounded down to MiB
    assert "spooler-max-tasks = 500\n" in text
    assert text.startswith("[uwsgi]\n")


def test_render_uwsgi_before_2_0_29_leaves_delta_out() -> None:
    text = recycling.render_uwsgi(settings(), 4, "2.0.28")
    assert "max-requests-delta =" not in text
    assert "uWSGI 2.0.28 predates it" in text


def test_render_uwsgi_unknown_version() -> None:
    for version in (None, "unknown"):
        text = recycling.render_uwsgi(settings(), 4, version)
        assert "max-requests-delta =" not in text
        assert "--uwsgi-version" in text


def test_render_uwsgi_disabled_limits() -> None:
    text = recycling.render_uwsgi(settings(MAX_REQUESTS=0, SPOOLER_MAX_TASKS=0), 2, "2.0.31")
    assert "max-requests" not in text.replace("MAX_REQUESTS is 0", "")
    assert "spooler-max-tasks" not in text
    assert "no request-count recycling" in text
    no_jitter = recycling.render_uwsgi(settings(MAX_REQUESTS_JITTER=0), 2, "2.0.31")
    assert "max-requests-delta" not in no_jitter


def test_reload_on_rss_is_at_least_one_mib() -> None:
    assert recycling.reload_on_rss_mib(1000) == 1


def test_installed_uwsgi_version() -> None:
    version = recycling.installed_uwsgi_version()
    assert version is not None
    assert recycling.parse_version(version) >= (2, 0)


def test_installed_uwsgi_version_from_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the distribution metadata is missing: the binary answers --version.
    import importlib.metadata

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    version = recycling.installed_uwsgi_version()
    assert version is not None
    assert recycling.parse_version(version) >= (2, 0)
    monkeypatch.setattr(recycling, "_uwsgi_binary", lambda: None)
    assert recycling.installed_uwsgi_version() is None
    monkeypatch.setattr(recycling, "_uwsgi_binary", lambda: "/nonexistent/uwsgi")
    assert recycling.installed_uwsgi_version() is None


def test_uwsgi_binary_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/uwsgi")
    assert recycling._uwsgi_binary() == "/usr/bin/uwsgi"


def test_gunicorn_limits_and_render() -> None:
    limits = recycling.gunicorn_limits(settings(MAX_REQUESTS=400, MAX_REQUESTS_JITTER=0.1))
    assert limits == recycling.GunicornLimits(400, 40, None)
    text = recycling.render_gunicorn(settings(WORKER_MAX_MEMORY="512MiB"))
    assert "max_requests = 1000\nmax_requests_jitter = 50\n" in text
    assert "536870912  # 512.0 MiB" in text
    assert "0: no request-count recycling" in recycling.render_gunicorn(settings(MAX_REQUESTS=0))


@pytest.mark.parametrize(
    ("available", "fraction", "concurrency", "kib"),
    [
        (8 * 1024**3, 0.75, 4, 1572864),  # 8 GiB x 0.75 / 4 = 1.5 GiB
        (1000 * 1024**2, 0.5, 3, 170666),
        (1024, 0.5, 4, 1),  # never 0, which Celery reads as "no limit"
    ],
)
def test_celery_memory_per_child(
    available: int, fraction: float, concurrency: int, kib: int
) -> None:
    assert recycling.celery_memory_per_child_kib(available, fraction, concurrency) == kib


def test_celery_memory_disabled() -> None:
    assert recycling.celery_memory_per_child_kib(1 << 30, None, 2) is None


def _cgroup(tmp_path: Path, files: dict[str, str], cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(cgroup)
    return root, proc


@pytest.mark.parametrize(
    ("files", "cgroup"),
    [
        ({"app/memory.max": f"{2 * 1024**3}\n", "memory.max": "max\n"}, "0::/app\n"),
        ({"memory/memory.limit_in_bytes": f"{2 * 1024**3}\n"}, "4:memory:/\n"),
    ],
    ids=["cgroup-v2", "cgroup-v1"],
)
def test_celery_limit_follows_the_container(
    tmp_path: Path, files: dict[str, str], cgroup: str
) -> None:
    root, proc = _cgroup(tmp_path, files, cgroup)
    available = memory.available_memory(root, proc)
    assert available == min(2 * 1024**3, memory.available_memory(tmp_path / "none", proc))
    limits = recycling.celery_limits(settings(CELERY_MEMORY_FRACTION=0.5), 2, available)
    assert limits.max_memory_per_child == available // 4 // 1024
    assert limits.max_tasks_per_child == 100
    text = recycling.render_celery(settings(CELERY_MEMORY_FRACTION=0.5), 2, available)
    assert f"worker_max_memory_per_child = {limits.max_memory_per_child}  # KiB" in text


def test_render_celery_disabled() -> None:
    text = recycling.render_celery(
        settings(CELERY_MAX_TASKS_PER_CHILD=0, CELERY_MEMORY_FRACTION=None), 2, 1 << 30
    )
    assert "worker_max_tasks_per_child = None  # CELERY_MAX_TASKS_PER_CHILD is 0" in text
    assert "worker_max_memory_per_child = None" in text
