"""URL patterns: neutral names, so that nothing but memory tells a leak from a non-leak."""

from __future__ import annotations

from accuracysite import views
from django.urls import path

urlpatterns = [
    path("orders/import/", views.import_rows),
    path("tenants/<int:tenant>/log/", views.tenant_log),
    path("hooks/subscribe/", views.subscribe),
    path("images/thumbnail/", views.thumbnail),
    path("api/events/", views.events),
    path("db/export/", views.db_export),
    path("users/<int:user>/profile/", views.profile),
    path("", views.home),
    path("plain/<int:n>/", views.plain),
    path("api/ping/", views.ping),
    path("db/items/", views.items),
    path("db/items/<int:pk>/", views.item),
    path("reports/export/", views.report),
    path("fragments/<int:n>/", views.fragment),
    path("activity/", views.activity),
    path("api/items/", views.ApiItems.as_view()),
    path("api/items/<int:pk>/", views.ApiItem.as_view()),
]
