"""The admin ranking page over 1,000,000 stored Growth rows, with a window covering all of them.

Bulk-creates the rows in a temporary SQLite file (500 keys, one row per key and hour, as
bench_uwsgi_log.py's database report), times the ranking query three times beside the same SQL
made to read the table through the (kind, key, hour) unique index (the plan before the ranking
index of migration 0005: the baseline of the same run), then requests the ranking page through
Django's test client as a staff user, five times, each beside `leakreport --limit 25`, and
prints each time (the goal: under 1 s). Also times the key page of the top key and
`leakreport --format html`.

Run: flock /tmp/leakguard-bench.lock .venv/bin/python bench/bench_admin.py [--rows N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

SCRIPT = textwrap.dedent(
    """
    import datetime as dt, io, os, sys, time
    sys.path[:0] = [{root!r}, {testproject!r}]
    os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    os.environ["DATABASE_URL"] = "sqlite:///" + sys.argv[1]
    import django
    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.utils import timezone
    from django_leakguard.models import Growth
    from django.conf import settings
    from django.test import override_settings
    setup_test_environment()
    # The bench's own requests must not be recorded: a flush would also prune the rows older
    # than RETENTION_DAYS, most of the million.
    override_settings(LEAKGUARD={{**settings.LEAKGUARD, "RECORD": False}}).enable()
    rows, keys = int(sys.argv[2]), 500
    filled = os.path.exists(sys.argv[1])
    call_command("migrate", verbosity=0)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    started = time.perf_counter()
    batch = []
    for n in range(0 if filled else rows):
        batch.append(Growth(kind="request" if n % keys < 400 else "task", key=f"/k{{n % keys}}/",
            hour=hour - dt.timedelta(hours=n // keys), calls=100, rss_growth=n % 977,
            rss_growth_positive=n % 977, rss_grew_calls=3, rss_growth_max=500, heap_calls=100,
            heap_growth=(n % 1013) * 64, heap_growth_max=4096))
        if len(batch) == 20000:
            Growth.objects.bulk_create(batch)
            batch = []
    Growth.objects.bulk_create(batch)
    if not filled:
        print("filled {{:,}} rows in {{:.1f}} s".format(rows, time.perf_counter() - started))
        User.objects.create_superuser("bench", password="bench")
    client = Client()
    client.force_login(User.objects.get())
    days = rows // keys // 24 + 2
    url = "/admin/django_leakguard/growth/?since={{}}d".format(days)
    # The ranking query as leakreport runs it, and the same SQL made to read the table through
    # the (kind, key, hour) unique index, as before the ranking index (migration 0005): the
    # baseline of this run, under the same load.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django_leakguard.reporting import database as report
    since = timezone.now() - dt.timedelta(days=days)
    with CaptureQueriesContext(connection) as queries:
        report.rows_from_database(since, traced=False)
    ranking_sql = next(q["sql"] for q in queries if "GROUP BY" in q["sql"])
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA index_list(django_leakguard_growth)")
        unique = next(row[1] for row in cursor.fetchall() if row[3] == "u")
    table = 'FROM "django_leakguard_growth"'
    assert ranking_sql.count(table) == 1, ranking_sql
    before_sql = ranking_sql.replace(table, table + ' INDEXED BY "' + unique + '"')
    def timed(sql):
        with report.sqlite_mmap(connection), connection.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute(sql)
            found = cursor.fetchall()
        return time.perf_counter() - started, found
    for run in range(3):
        now_s, now_rows = timed(ranking_sql)
        old_s, old_rows = timed(before_sql)
        assert sorted(now_rows) == sorted(old_rows)
        print("ranking query, {{}} keys: {{:.3f}} s (through the unique index alone, as before "
            "0005: {{:.3f}} s)".format(len(now_rows), now_s, old_s))
    # Side by side, so that a busy machine slows both alike: the page and leakreport's table.
    for run in range(5):
        started = time.perf_counter()
        call_command("leakreport", "--since", "{{}}d".format(days), "--limit", "25",
            stdout=io.StringIO())
        table = time.perf_counter() - started
        started = time.perf_counter()
        response = client.get(url)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.status_code
        shown = response.content.count(b'class="leakguard-sparkline"')
        print("ranking page --since {{}}d, {{}} rows shown: {{:.3f}} s (leakreport --limit 25: "
            "{{:.3f}} s)".format(days, shown, elapsed, table))
    started = time.perf_counter()
    response = client.get("/admin/django_leakguard/growth/key/?key=/k0/&since={{}}d".format(days))
    assert response.status_code == 200
    print("key page, {{:,}} hours: {{:.3f}} s".format(rows // keys, time.perf_counter() - started))
    started = time.perf_counter()
    call_command("leakreport", "--since", "{{}}d".format(days), "--format", "html",
        stdout=io.StringIO())
    print("leakreport --format html: {{:.3f}} s".format(time.perf_counter() - started))
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--database", type=Path, help="SQLite file to keep between runs (filled when missing)"
    )
    args = parser.parse_args()
    code = SCRIPT.format(root=str(ROOT), testproject=str(ROOT / "testproject"))
    print(f"Admin ranking page over {args.rows:,} Growth rows (SQLite file, 500 keys)")
    with tempfile.TemporaryDirectory() as tmp:
        database = args.database or Path(tmp) / "bench.sqlite3"
        done = subprocess.run(
            [PYTHON, "-c", code, str(database.resolve()), str(args.rows)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    print(done.stdout, end="")
    if done.returncode:
        print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
