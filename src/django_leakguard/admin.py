"""Admin pages: the ranking, one key's hourly charts, and the workers, for staff who may view.

Growth and Worker are registered read-only; their change lists are the ranking and the
workers pages, so the app's section on the admin index leads to them.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.db.models import Model
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_leakguard import conf, records
from django_leakguard.models import Growth, Worker
from django_leakguard.reporting import pages
from django_leakguard.reporting.model import KINDS, SORTS
from django_leakguard.units import parse_since

PAGE_LIMIT_MAX = 500

if TYPE_CHECKING:
    ModelAdmin = admin.ModelAdmin[Any]
else:  # generic for the type checker only (django-stubs)
    ModelAdmin = admin.ModelAdmin


class RankingFilters(forms.Form):
    """The ranking page's filters: leakreport's --since, --kind, --sort, --min-count, --limit."""

    since = forms.CharField(initial="24h", help_text=_("30m, 24h, 7d, 2w or an ISO date"))
    kind = forms.ChoiceField(choices=[(kind, kind) for kind in KINDS], initial="all")
    sort = forms.ChoiceField(choices=[(sort, sort) for sort in SORTS], initial="heap")
    min_count = forms.IntegerField(label=_("Minimum calls"), min_value=0, initial=0)
    limit = forms.IntegerField(label=_("Rows"), min_value=1, max_value=PAGE_LIMIT_MAX, initial=25)

    def __init__(self, data: Any, now: dt.datetime) -> None:
        initial = {name: form_field.initial for name, form_field in self.base_fields.items()}
        super().__init__({**initial, **{k: v for k, v in data.items() if v != ""}})
        self.now = now

    def clean_since(self) -> dt.datetime:
        try:
            return parse_since(self.cleaned_data["since"], self.now)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


class ReadOnlyAdmin(ModelAdmin):
    """Rows are written by the recorder only: viewing, never adding, changing or deleting."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def page(
        self, request: HttpRequest, template: str, title: str, context: dict[str, Any]
    ) -> TemplateResponse:
        """Render one of the pages in the admin's frame, for users who may view the rows."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        return TemplateResponse(
            request,
            f"admin/django_leakguard/{template}",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": title,
                **context,
            },
        )


def _since(request: HttpRequest, now: dt.datetime) -> dict[str, Any]:
    """The window of the key and workers pages; 24h, and why, when ?since= is not one."""
    text = request.GET.get("since") or "24h"
    try:
        return {"since": parse_since(text, now), "since_text": text}
    except ValueError as exc:
        return {"since": parse_since("24h", now), "since_text": "24h", "error": str(exc)}


def _unreadable(exc: DatabaseError) -> str:
    using = conf.get_settings().DATABASE
    return (
        f"Cannot read the leakguard tables in database {using!r} ({exc}). "
        f"Run `{conf.migrate_command(using)}`."
    )


@admin.register(Growth)
class GrowthAdmin(ReadOnlyAdmin):
    def get_urls(self) -> list[URLPattern]:
        key = path(
            "key/",
            self.admin_site.admin_view(self.key_view),
            name="django_leakguard_growth_key",
        )
        return [key, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The ranking: leakreport's rows with their filters and hourly sparklines."""
        now = timezone.now()
        form = RankingFilters(request.GET, now)
        context: dict[str, Any] = {"form": form, "now": now}
        if form.is_valid():
            options = form.cleaned_data
            try:
                ranking = pages.ranking_report(
                    options["since"],
                    now,
                    kind=options["kind"],
                    sort=options["sort"],
                    limit=options["limit"],
                    min_count=options["min_count"],
                )
                context["page"] = pages.ranking_page(ranking, options["since"], now)
            except DatabaseError as exc:
                context["error"] = _unreadable(exc)
            context["since"] = options["since"]
            context["since_text"] = form.data["since"]
        return self.page(request, "ranking.html", str(_("Memory growth ranking")), context)

    def key_view(self, request: HttpRequest) -> HttpResponse:
        """One key: hourly charts, figures, readings, traced allocation sites."""
        context = _since(request, timezone.now())
        kind = request.GET.get("kind", records.REQUEST)
        key = request.GET.get("key", "")
        if kind not in records.KINDS:
            kind = records.REQUEST
        try:
            context["page"] = pages.key_page(kind, key, context["since"])
        except DatabaseError as exc:
            context["error"] = _unreadable(exc)
        return self.page(request, "key.html", f"{kind} {key}", context)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The workers: RSS over each one's life, recycling, and the recommended limits."""
        context = _since(request, timezone.now())
        kind = request.GET.get("kind", "all")
        if kind not in KINDS:
            kind = "all"
        context["kind"] = kind
        try:
            context["page"] = pages.workers_page(context["since"], kind)
        except DatabaseError as exc:
            context["error"] = _unreadable(exc)
        return self.page(request, "workers.html", str(_("Workers")), context)
