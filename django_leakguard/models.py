from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class Kind(models.TextChoices):
    REQUEST = "request", _("request")
    TASK = "task", _("task")


class Growth(models.Model):
    """Memory growth of one kind and key (URL pattern or task name) during one hour."""

    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    key = models.CharField(_("key"), max_length=255)
    hour = models.DateTimeField(_("hour"))
    view = models.CharField(_("view"), max_length=255, blank=True, default="")
    calls = models.BigIntegerField(_("calls"), default=0)
    rss_growth = models.BigIntegerField(_("net RSS growth"), default=0)
    rss_growth_positive = models.BigIntegerField(_("positive RSS growth"), default=0)
    rss_grew_calls = models.BigIntegerField(_("calls that grew RSS"), default=0)
    rss_growth_max = models.BigIntegerField(_("largest RSS growth of one call"), default=0)
    heap_calls = models.BigIntegerField(_("calls with a heap reading"), default=0)
    heap_growth = models.BigIntegerField(_("net heap growth"), default=0)
    heap_growth_max = models.BigIntegerField(_("largest heap growth of one call"), default=0)
    traced_calls = models.BigIntegerField(_("calls traced with tracemalloc"), default=0)
    traced_retained = models.BigIntegerField(
        _("bytes the traced calls allocated and kept"), default=0
    )
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
        indexes = [models.Index(fields=["hour"], name="leakguard_growth_hour")]

    def __str__(self) -> str:
        return f"{self.kind} {self.key} @ {self.hour:%Y-%m-%d %H:00}"


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
