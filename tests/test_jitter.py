from __future__ import annotations

import datetime as dt
import io

import pytest
from django.core import checks
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from django_leakguard import jitter
from django_leakguard.jitter import CELERY, GUNICORN, TARGET, UWSGI, Fleet
from django_leakguard.models import Growth, Worker

# Two workers of 5 requests/s each that take 5 s to boot: 25 requests go by during a boot.
SLOW_BOOT = Fleet(workers=2, rate=5.0, boot=5.0, boots=6)


def test_without_jitter_every_restart_collides() -> None:
    for rule in (GUNICORN, UWSGI, CELERY):
        assert jitter.apart_share(rule, 200, 0.0, SLOW_BOOT) == 0.0


def test_a_jitter_narrower_than_a_boot_time_keeps_restarts_together() -> None:
    # Gunicorn draws from 0 to 10 extra requests (2 s) while a boot takes 25 requests (5 s).
    assert jitter.apart_share(GUNICORN, 200, 0.05, SLOW_BOOT) < 0.2
    assert jitter.apart_share(GUNICORN, 200, 1.0, SLOW_BOOT) > TARGET


def test_the_narrowest_gunicorn_jitter_is_the_first_that_keeps_most_apart() -> None:
    narrowest = jitter.narrowest_jitter(GUNICORN, 200, SLOW_BOOT)
    assert narrowest is not None
    assert 0.1 < narrowest < 0.8
    assert jitter.apart_share(GUNICORN, 200, narrowest, SLOW_BOOT) >= TARGET
    assert jitter.apart_share(GUNICORN, 200, narrowest - 0.01, SLOW_BOOT) < TARGET


def test_uwsgi_spreads_its_workers_by_their_ids() -> None:
    # uWSGI's rule is deterministic: worker 2 recycles delta requests after worker 1 in each
    # life, so their restarts drift apart by delta / rate seconds per life. A jitter of 0.05
    # is a delta of round(200 x 0.05 / 1) = 10 requests, 2 s: the restarts of the first two
    # lives (2 and 4 s apart) fall within a boot time (5 s), the next 18 do not.
    assert jitter.apart_share(UWSGI, 200, 0.05, SLOW_BOOT) == 18 / 20
    # 0.01: a delta of 2 requests, 0.4 s a life: the first 12 lives restart together.
    assert jitter.apart_share(UWSGI, 200, 0.01, SLOW_BOOT) == 8 / 20
    narrowest = jitter.narrowest_jitter(UWSGI, 200, SLOW_BOOT)
    assert narrowest is not None
    assert jitter.apart_share(UWSGI, 200, narrowest, SLOW_BOOT) >= TARGET
    assert all(
        jitter.apart_share(UWSGI, 200, step / 100, SLOW_BOOT) < TARGET
        for step in range(1, round(narrowest * 100))
    )


def test_uwsgi_recycles_no_worker_younger_than_its_minimum_lifetime() -> None:
    # 200 requests at 100/s last 2 s, but uWSGI keeps a worker 10 s (min-worker-lifetime):
    # every life is 10 s, the workers' restarts never drift apart.
    fast = Fleet(workers=2, rate=100.0, boot=1.0, boots=3)
    assert jitter.apart_share(UWSGI, 200, 0.5, fast) == 0.0
    assert jitter.apart_share(GUNICORN, 200, 0.5, fast) > 0.2  # Gunicorn has no such floor


def test_celery_has_no_jitter_to_recommend() -> None:
    advice = jitter.advise(CELERY, 100, 0.0, SLOW_BOOT)
    assert advice is not None
    assert advice.recommended is None
    assert not advice.too_narrow
    assert advice.lines()[0].startswith("Celery children recycle without jitter: 2 workers")


def test_lives_too_short_for_any_jitter() -> None:
    busy = Fleet(workers=2, rate=40.0, boot=5.0, boots=3)  # a 5 s life for a 5 s boot
    advice = jitter.advise(GUNICORN, 200, 0.05, busy)
    assert advice is not None
    assert advice.recommended is None
    assert not advice.too_narrow
    assert "a worker lives about 5 s for a 5 s boot" in advice.lines()[1]


def test_advice_needs_enough_data() -> None:
    assert jitter.advise(GUNICORN, 200, 0.05, Fleet(2, 5.0, 5.0, boots=2)) is None
    assert jitter.advise(GUNICORN, 200, 0.05, Fleet(1, 5.0, 5.0, boots=6)) is None
    assert jitter.advise(GUNICORN, 0, 0.05, SLOW_BOOT) is None


def test_advice_lines() -> None:
    advice = jitter.advise(GUNICORN, 200, 0.05, SLOW_BOOT)
    assert advice is not None
    assert advice.too_narrow
    assert advice.lines() == [
        f"MAX_REQUESTS_JITTER = 0.05 keeps {advice.apart:.0%} of restarts more than a boot time "
        "apart (2 workers at once, each serving 5 calls/s, booting in 5 s (median of 6); "
        "gunicorn).",
        f"Narrowest MAX_REQUESTS_JITTER that keeps 75% apart: {advice.recommended:g}; widen it "
        "to that.",
    ]
    wide = jitter.advise(GUNICORN, 200, 1.0, SLOW_BOOT)
    assert wide is not None
    assert not wide.too_narrow
    assert wide.lines()[1].endswith("; the configured jitter is enough.")


def test_unknown_rule() -> None:
    with pytest.raises(ValueError, match="rule should be one of gunicorn, uwsgi, celery"):
        jitter.apart_share("waitress", 200, 0.05, SLOW_BOOT)


T0 = dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_fleet_from_worker_rows() -> None:
    rows = [
        # host, last_seen, process started, first call, calls
        ("a", at(104), at(0), at(4), 500),
        ("a", at(205), at(100), at(105), 500),
        ("a", at(106), at(0), at(6), 500),
        ("b", at(107), at(0), at(7), 500),
        ("b", at(50), None, None, 99),  # written before migration 0005
        ("b", at(2000), at(0), at(1000), 10),  # waited for its first request: not a boot
    ]
    fleet = jitter.fleet_from_workers(rows)
    assert fleet.boots == 4
    assert fleet.boot == pytest.approx(5.5)  # median of 4, 5, 6 and 7 s
    assert fleet.workers == 2  # host a: two at once (the second replaced the first)
    assert fleet.rate == pytest.approx(2010 / 1400)


def recorded_workers(boot: float, rate: float, count: int = 6) -> None:
    """Store count workers of 2 at once on one host, each booting in boot s, at rate calls/s."""
    now = timezone.now()
    life = 200 / rate
    for index in range(count):
        started = now - dt.timedelta(seconds=(count - index // 2) * (life + boot))
        first_call = started + dt.timedelta(seconds=boot)
        Worker.objects.create(
            host="web-1",
            pid=1000 + index,
            started_at=started.replace(microsecond=0),
            kind="request",
            rss_first=50 << 20,
            rss_last=60 << 20,
            calls=200,
            last_seen=first_call + dt.timedelta(seconds=life),
            process_started_at=started,
            first_call_at=first_call,
        )


def w013() -> list[checks.CheckMessage]:
    return [m for m in checks.run_checks(tags=["leakguard"]) if m.id == "leakguard.W013"]


@pytest.mark.django_db
@override_settings(LEAKGUARD={"MAX_REQUESTS": 200, "MAX_REQUESTS_JITTER": 0.05})
def test_check_warns_when_the_jitter_is_clearly_too_narrow(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(str(tmp_path))  # no server config around: Gunicorn's rule
    recorded_workers(boot=5.0, rate=5.0)
    (message,) = w013()
    assert message.msg.startswith("MAX_REQUESTS_JITTER 0.05 keeps only ")
    assert "simulation of gunicorn's jitter rule with the recorded workers (2 at once, " in (
        message.msg
    )
    advice = jitter.advise(GUNICORN, 200, 0.05, Fleet(2, 5.0, 5.0, 6))
    assert advice is not None
    assert message.hint == f"Set LEAKGUARD['MAX_REQUESTS_JITTER'] to {advice.recommended:g}."
    with override_settings(LEAKGUARD={"MAX_REQUESTS": 200, "MAX_REQUESTS_JITTER": 1.0}):
        assert w013() == []


@pytest.mark.django_db
@override_settings(LEAKGUARD={"MAX_REQUESTS": 200, "MAX_REQUESTS_JITTER": 0.05})
def test_check_is_silent_without_enough_data(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(str(tmp_path))
    assert w013() == []
    recorded_workers(boot=5.0, rate=5.0, count=2)
    assert w013() == []


@pytest.mark.django_db
@override_settings(LEAKGUARD={"MAX_REQUESTS": 200, "MAX_REQUESTS_JITTER": 0.05})
def test_leakreport_prints_the_jitter_advice(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(str(tmp_path))
    recorded_workers(boot=5.0, rate=5.0, count=12)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    Growth.objects.create(kind="request", key="/a/", hour=hour, calls=2400, rss_growth=1 << 20)
    out = io.StringIO()
    call_command("leakreport", "--min-count", "0", stdout=out)
    text = out.getvalue()
    assert "MAX_REQUESTS_JITTER = 0.05 keeps " in text
    assert "Narrowest MAX_REQUESTS_JITTER that keeps 75% apart: " in text
