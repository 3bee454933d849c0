"""The uWSGI log source: open the logs, parse them (here or in worker processes), give rows.

Rows from a parsed log carry RSS only, as the database source gives them otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import gzip
import io
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from django_leakguard.records import REQUEST
from django_leakguard.reporting import uwsgi_parallel
from django_leakguard.reporting.model import Row, Workers
from django_leakguard.reporting.uwsgi_lines import urlconf_key
from django_leakguard.reporting.uwsgi_log import (
    MAX_GROUPS,
    MAX_LIVE_WORKERS,
    LogParser,
    LogSummary,
)


@contextlib.contextmanager
def open_log(name: str, stdin: BinaryIO | None = None) -> Iterator[BinaryIO]:
    """Open a log for reading bytes: a plain or gzip file, or stdin for "-"."""
    if name == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        head = stream.peek(2)[:2] if isinstance(stream, io.BufferedReader) else b""
        if head == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=stream) as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield stream
        return
    path = Path(name)
    with path.open("rb") as raw:
        # peek(), not read() and seek(): pipes (`<(zcat ...)`, /dev/fd/N) cannot seek.
        head = raw.peek(2)[:2]
        if head == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield raw


def parse_logs(
    names: Iterable[str],
    group_by: str = "auto",
    *,
    stdin: BinaryIO | None = None,
    key_for_urlconf: Callable[[str], str | None] = urlconf_key,
    jobs: int = 1,
    parallel_min_size: int | None = None,
    range_size: int | None = None,
    max_groups: int = MAX_GROUPS,
    max_live_workers: int = MAX_LIVE_WORKERS,
) -> LogSummary:
    """Parse the named logs (in order) into one summary; raise OSError when one is unreadable.

    With jobs above 1, plain files of parallel_min_size bytes or more (PARALLEL_MIN_SIZE) are
    split into ranges of at most range_size bytes (RANGE_SIZE) that jobs worker processes
    parse, where they can be forked; the summary is the same as with jobs=1. A worker killed
    meanwhile (out of memory?) raises concurrent.futures.process.BrokenProcessPool.
    """
    parser = LogParser(
        group_by,
        key_for_urlconf=key_for_urlconf,
        max_groups=max_groups,
        max_live_workers=max_live_workers,
    )
    files = []
    split = jobs > 1 and uwsgi_parallel.can_fork()
    min_size = uwsgi_parallel.PARALLEL_MIN_SIZE if parallel_min_size is None else parallel_min_size
    # findall() creates a tuple per request line, which sets off the cyclic garbage collector
    # every few hundred lines for nothing: parsing makes no reference cycles (everything it
    # drops is freed at once), so the collector is paused meanwhile (about 10 % of the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with uwsgi_parallel.WorkerPool(jobs) as workers:
            for name in names:
                with open_log(name, stdin) as stream:
                    if split and name != "-" and _large_plain_file(stream, min_size):
                        uwsgi_parallel.feed_split(
                            parser, stream, name, workers, range_size or uwsgi_parallel.RANGE_SIZE
                        )
                    else:
                        parser.feed(stream)
                files.append(name)
    finally:
        if collecting:
            gc.enable()
    summary = parser.summary()
    summary.files = files
    return summary


def _large_plain_file(stream: BinaryIO, min_size: int) -> bool:
    """Return whether a stream open_log() opened is a regular file (not gzip) of min_size."""
    if isinstance(stream, gzip.GzipFile):
        return False
    status = os.fstat(stream.fileno())
    return stat.S_ISREG(status.st_mode) and status.st_size >= min_size


def rows_from_log(summary: LogSummary) -> tuple[list[Row], Workers, dict[str, Any]]:
    """Return a parsed uWSGI log as rows (RSS only), worker figures and the log's counts."""
    rows = [
        Row(REQUEST, key, **dataclasses.asdict(group)) for key, group in summary.groups.items()
    ]
    workers = Workers(
        seen=summary.workers,
        calls=summary.worker_calls,
        rss_growth=summary.worker_rss_growth,
        rss_first_total=summary.worker_rss_first_total,
        at_once=summary.workers_at_once,
    )
    log = {
        "files": summary.files,
        "lines": summary.lines,
        "request_lines": summary.request_lines,
        "skipped_lines": summary.skipped_lines,
        "respawns": summary.respawns,
        "group_by": summary.group_by,
        "group_by_reason": summary.group_by_reason,
        "groups_folded_into_other": summary.folded_groups,
        "first_request_at": _epoch_iso(summary.first_date),
        "last_request_at": _epoch_iso(summary.last_date),
    }
    return rows, workers, log


def _epoch_iso(value: float | None) -> str | None:
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value).astimezone().isoformat()
