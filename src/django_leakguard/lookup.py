"""What --detail accepts: a key as leakreport lists it, a URL name or a view's dotted name."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django_leakguard.records import route_key


def keys_named(
    name: str, since: dt.datetime, kind: str = "all", using: str = "default"
) -> list[str]:
    """Return the keys name stands for: itself when rows have it as their key, else the keys of
    the rows whose view's dotted name it is, else the keys of the URL patterns so named
    (namespace:name) with their keys refined by REFINE_KEY; else [name]."""
    from django_leakguard.models import Growth
    from django_leakguard.reporting.model import floor_hour

    rows = Growth.objects.using(using).filter(hour__gte=floor_hour(since))
    if kind != "all":
        rows = rows.filter(kind=kind)
    if rows.filter(key=name).exists():
        return [name]
    by_view = list(rows.filter(view=name).order_by("key").values_list("key", flat=True).distinct())
    if by_view:
        return by_view
    patterns = url_name_keys(name)
    if not patterns:
        return [name]
    # A pattern's keys refined by REFINE_KEY ("/<arg1> [blog.BlogPage]") stand for it too.
    keys: list[str] = []
    for pattern in patterns:
        refined = rows.filter(key__startswith=pattern + " [").order_by("key")
        keys += [pattern, *refined.values_list("key", flat=True).distinct()]
    return keys


def url_name_keys(name: str, urlconf: str | None = None) -> list[str]:
    """Return the keys of the URL patterns named name ("name", or "namespace:name")."""
    from django.urls import ResolverMatch, URLPattern, URLResolver, get_resolver

    namespace, _, url_name = name.rpartition(":")
    wanted = namespace.split(":") if namespace else []
    keys: list[str] = []

    def walk(patterns: Iterable[object], chain: list[object], namespaces: list[str]) -> None:
        for entry in patterns:
            if isinstance(entry, URLResolver):
                inner = [*namespaces, entry.namespace] if entry.namespace else namespaces
                walk(entry.url_patterns, [*chain, entry], inner)
            elif isinstance(entry, URLPattern) and entry.name == url_name and namespaces == wanted:
                # The match a request to this pattern would give, for route_key().
                match = ResolverMatch(entry.callback, (), {}, url_name, tried=[[*chain, entry]])
                key = route_key(match)
                if key not in keys:
                    keys.append(key)

    walk(get_resolver(urlconf).url_patterns, [], [])
    return keys
