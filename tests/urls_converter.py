"""A URLconf with a custom path converter."""

from __future__ import annotations

from django.urls import include, path, register_converter

from tests.urls_digits import view


class EvenConverter:
    regex = "[0-9]*[02468]"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(EvenConverter, "even")

urlpatterns = [path("n/", include([path("<even:n>/", view)]))]
