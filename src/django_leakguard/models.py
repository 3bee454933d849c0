from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _

from django_leakguard import records


class Kind(models.TextChoices):
    REQUEST = records.REQUEST, _("request")
    TASK = records.TASK, _("task")


class Growth(models.Model):
    """Memory growth of one kind and key (URL pattern or task name) during one hour."""

    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    key = models.CharField(_("key"), max_length=records.KEY_MAX_LENGTH)
    hour = models.DateTimeField(_("hour"))
    view = models.CharField(_("view"), max_length=records.VIEW_MAX_LENGTH, blank=True, default="")
    # The growth counters (records.Counts) are added below, one BigIntegerField each.
    # The top TRACE_TOP_SITES allocation sites of the traced calls: a list of
    # tracing.Site.as_dict(), largest first.
    traced_sites = models.JSONField(_("top allocation sites"), default=list, blank=True)

    class Meta:
        verbose_name = _("memory growth")
        verbose_name_plural = _("memory growth")
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "key", "hour"], name="leakguard_growth_kind_key_hour"
            )
        ]
        indexes = [
            models.Index(fields=["hour"], name="leakguard_growth_hour"),
            # The report's ranking sums these counters over every row of its window: with
            # them in the index, the sums read the index in (kind, key) order and no table
            # row (docs/performance). Columns, not INCLUDE: SQLite and MySQL have no INCLUDE.
            models.Index(
                fields=["kind", "key", "hour", *records.RANKING_SUMS, *records.TRACED_SUMS],
                name="leakguard_growth_ranking",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.key} @ {self.hour:%Y-%m-%d %H:00}"


def counter_field(spec: records.Counter) -> models.BigIntegerField[int, int]:
    """The column of one growth counter."""
    return models.BigIntegerField(_(spec.verbose_name), default=0)


for _spec in records.COUNTERS:
    Growth.add_to_class(_spec.name, counter_field(_spec))


class Worker(models.Model):
    """One worker process: its memory at its first and latest recorded call."""

    host = models.CharField(_("host"), max_length=255)
    pid = models.IntegerField(_("process id"))
    started_at = models.DateTimeField(_("started at"))
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices, default=Kind.REQUEST)
    rss_first = models.BigIntegerField(_("RSS at the first call"))
    rss_last = models.BigIntegerField(_("RSS at the latest call"))
    heap_first = models.BigIntegerField(_("heap at the first call"), null=True, blank=True)
    heap_last = models.BigIntegerField(_("heap at the latest call"), null=True, blank=True)
    calls = models.BigIntegerField(_("calls served"), default=0)
    last_seen = models.DateTimeField(_("last seen"))
    # Its boot time is first_call_at - process_started_at (see jitter.py); unknown for rows
    # written before migration 0006_worker_boot_times.
    process_started_at = models.DateTimeField(_("process started at"), null=True, blank=True)
    first_call_at = models.DateTimeField(_("first call at"), null=True, blank=True)

    class Meta:
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        constraints = [
            models.UniqueConstraint(
                fields=["host", "pid", "started_at"], name="leakguard_worker_host_pid_start"
            )
        ]
        indexes = [models.Index(fields=["last_seen"], name="leakguard_worker_last_seen")]

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"
