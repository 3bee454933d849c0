"""The same kinds as Celery tasks (keys: accuracysite.tasks.<name>)."""

from __future__ import annotations

import asyncio

from accuracysite import leaks
from accuracysite.models import Item
from asgiref.sync import async_to_sync
from celery import shared_task, signals
from django.template.loader import render_to_string

# Leaks -----------------------------------------------------------------------------------------


@shared_task
def import_rows() -> int:
    return leaks.keep_rows(leaks.size_of("tuples"))


@shared_task
def tenant_log(tenant: int) -> int:
    return leaks.keep_loggers(tenant, leaks.size_of("loggers"))


@shared_task
def subscribe() -> None:
    leaks.keep_receiver(signals.task_postrun.connect, leaks.size_of("receivers"))


@shared_task
def thumbnail() -> None:
    leaks.keep_native(leaks.size_of("native"))


@shared_task
def events() -> int:
    return async_to_sync(leaks.keep_event)(leaks.size_of("async"))


@shared_task
def db_export() -> int:
    rows = list(Item.objects.order_by("pk").values_list("pk", "name", "price")[:20])
    leaks.keep_export(rows, leaks.size_of("db"))
    return len(rows)


@shared_task
def profile(user: int) -> None:
    leaks.keep_profile(user, leaks.size_of("dict"))


# Non-leaks -------------------------------------------------------------------------------------


@shared_task
def plain(n: int) -> dict[str, object]:
    return {"n": n, "name": f"Thing {n}", "tags": [f"t{n % 7}", f"u{n % 5}"]}


async def _ping() -> bool:
    await asyncio.sleep(0)
    return True


@shared_task
def ping() -> bool:
    return async_to_sync(_ping)()


@shared_task
def items() -> int:
    return len(
        render_to_string("accuracysite/items.html", {"items": Item.objects.order_by("pk")[:20]})
    )


@shared_task
def item(pk: int) -> int:
    return len(render_to_string("accuracysite/item.html", {"item": Item.objects.get(pk=pk)}))


@shared_task
def report() -> int:
    return leaks.transient_export()


@shared_task
def fragment(n: int) -> int:
    return len(leaks.cached_fragment(n))


@shared_task
def activity() -> int:
    return leaks.remember_recent()


@shared_task
def api_item(pk: int) -> int:
    from accuracysite.views import ItemSerializer
    from rest_framework.renderers import JSONRenderer

    return len(JSONRenderer().render(ItemSerializer(Item.objects.get(pk=pk)).data))


@shared_task
def api_items() -> int:
    from accuracysite.views import ItemSerializer
    from rest_framework.renderers import JSONRenderer

    rows = Item.objects.order_by("pk")[:20]
    return len(JSONRenderer().render(ItemSerializer(rows, many=True).data))
