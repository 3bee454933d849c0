"""Views of the accuracy project: leaks, and non-leaks that look like them to a careless eye."""

from __future__ import annotations

import asyncio

from accuracysite import leaks
from accuracysite.models import Item
from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from rest_framework import generics, serializers

# Leaks -----------------------------------------------------------------------------------------


def import_rows(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"{leaks.keep_rows(leaks.size_of('tuples'))} rows imported")


def tenant_log(request: HttpRequest, tenant: int) -> HttpResponse:
    return HttpResponse(f"{leaks.keep_loggers(tenant, leaks.size_of('loggers'))} loggers")


def subscribe(request: HttpRequest) -> HttpResponse:
    leaks.keep_receiver(request_finished.connect, leaks.size_of("receivers"))
    return HttpResponse("subscribed")


def thumbnail(request: HttpRequest) -> HttpResponse:
    leaks.keep_native(leaks.size_of("native"))
    return HttpResponse("thumbnail made")


async def events(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"{await leaks.keep_event(leaks.size_of('async'))} events")


def db_export(request: HttpRequest) -> HttpResponse:
    rows = list(Item.objects.order_by("pk").values_list("pk", "name", "price")[:20])
    leaks.keep_export(rows, leaks.size_of("db"))
    return HttpResponse(f"exported {len(rows)} rows")


def profile(request: HttpRequest, user: int) -> HttpResponse:
    leaks.keep_profile(user, leaks.size_of("dict"))
    return HttpResponse("profile cached")


# Non-leaks -------------------------------------------------------------------------------------


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<h1>Accuracy</h1>")


def plain(request: HttpRequest, n: int) -> JsonResponse:
    return JsonResponse({"n": n, "name": f"Thing {n}", "tags": [f"t{n % 7}", f"u{n % 5}"]})


async def ping(request: HttpRequest) -> JsonResponse:
    await asyncio.sleep(0)
    return JsonResponse({"ok": True})


def items(request: HttpRequest) -> HttpResponse:
    return render(request, "accuracysite/items.html", {"items": Item.objects.order_by("pk")[:20]})


def item(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "accuracysite/item.html", {"item": get_object_or_404(Item, pk=pk)})


def report(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"{leaks.transient_export()} bytes exported")


def fragment(request: HttpRequest, n: int) -> HttpResponse:
    return HttpResponse(f"{len(leaks.cached_fragment(n))} bytes")


def activity(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"{leaks.remember_recent()} recent entries")


class ItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = Item
        fields = ["id", "name", "price", "description"]


class ApiItem(generics.RetrieveAPIView):
    """A REST framework detail view: its response, view and request refer to each other."""

    queryset = Item.objects.all()
    serializer_class = ItemSerializer


class ApiItems(generics.ListAPIView):
    queryset = Item.objects.order_by("pk")[:20]
    serializer_class = ItemSerializer
