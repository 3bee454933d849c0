"""URLconfs with i18n_patterns(): language prefixes, with and without the default language's."""

from __future__ import annotations

from django.conf.urls.i18n import i18n_patterns
from django.urls import include, path, re_path
from django.utils.translation import gettext_lazy as _

from tests.urls_i18n_views import view

localized = [
    path("items/<int:pk>/", view, name="item"),
    path(_("about/"), view, name="about"),
    re_path(r"^archive/(?P<year>[12]\d{3})/$", view, name="archive"),
    path("shop/", include(([path("<slug:slug>/", view, name="product")], "shop"))),
]

# LANGUAGE_CODE's pages unprefixed (/items/1/), the others prefixed (/fr/items/1/).
urlpatterns = [
    path("api/items/<int:pk>/", view, name="api-item"),
    *i18n_patterns(*localized, prefix_default_language=False),
]
