from __future__ import annotations

from django.urls import path

from shop import views

app_name = "shop"

urlpatterns = [
    path("", views.home, name="home"),
    path("products/<int:pk>/", views.product, name="product"),
    path("search/", views.search, name="search"),
    path("health/", views.health, name="health"),
    path("leak/retain/", views.leak_retain, name="leak-retain"),
    path("leak/cache/<str:key>/", views.leak_cache, name="leak-cache"),
    path("leak/small/", views.leak_small, name="leak-small"),
    path("spike/", views.spike, name="spike"),
    path("boom/", views.boom, name="boom"),
]
