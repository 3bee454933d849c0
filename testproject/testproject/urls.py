from __future__ import annotations

from django.contrib import admin
from django.contrib.staticfiles.views import serve
from django.urls import include, path, re_path

urlpatterns = [
    path("admin/", admin.site.urls),
    # The demo serves its own static files (the admin's, leakguard's) whatever DEBUG says;
    # a real project serves them from its web server or WhiteNoise.
    re_path(r"^static/(?P<path>.*)$", serve, {"insecure": True}),
    path("", include("shop.urls")),
]
