"""i18n_patterns() with every language prefixed, the default one too (/en/items/1/)."""

from __future__ import annotations

from django.conf.urls.i18n import i18n_patterns
from django.urls import path

from tests.urls_i18n import localized
from tests.urls_i18n_views import view

urlpatterns = [path("api/items/<int:pk>/", view, name="api-item"), *i18n_patterns(*localized)]
