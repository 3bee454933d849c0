"""leakreport's one function (reporting/run.py), called as the command calls it."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.utils import timezone

from django_leakguard import conf
from django_leakguard.reporting.run import Options, ReportError, leakreport
from tests.test_leakreport import FIXTURE, fill


def test_a_uwsgi_log_gives_the_report() -> None:
    output = leakreport(
        Options(uwsgi_logs=[str(FIXTURE)], format="json", jobs=1),
        conf.get_settings(),
        timezone.now(),
    )
    assert not output.notice
    data = json.loads(output.text)
    assert data["source"] == "uwsgi-log"
    assert data["rows"][0]["key"] == "/leak/retain/"


@pytest.mark.django_db
def test_the_database_gives_the_report() -> None:
    fill()
    output = leakreport(Options(), conf.get_settings(), timezone.now())
    assert not output.notice
    assert "/leak/retain/" in output.text


@pytest.mark.django_db
def test_an_empty_window_is_a_notice_in_a_table_only() -> None:
    now = timezone.now()
    notice = leakreport(Options(), conf.get_settings(), now)
    assert notice.notice
    assert notice.text.startswith("No memory growth recorded since")
    as_json = leakreport(Options(format="json"), conf.get_settings(), now)
    assert not as_json.notice
    assert json.loads(as_json.text)["rows"] == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Options(since="soon"), "--since should be a duration"),
        (Options(uwsgi_logs=["/nonexistent.log"]), "Cannot read the uWSGI log"),
        (Options(uwsgi_logs=[str(FIXTURE)], kind="task"), "--kind task does not apply"),
        (Options(uwsgi_logs=[str(FIXTURE)], format="html", jobs=1), "--format html draws"),
        (Options(detail="/a/", uwsgi_logs=[str(FIXTURE)]), "uWSGI logs have none"),
    ],
)
def test_what_the_user_can_fix_is_one_line(options: Options, message: str) -> None:
    with pytest.raises(ReportError, match=message) as info:
        leakreport(options, conf.get_settings(), dt.datetime.now(dt.timezone.utc))
    assert "\n" not in str(info.value)
