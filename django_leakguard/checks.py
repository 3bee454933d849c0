"""System checks (leakguard.E001, leakguard.W001...); see docs/checks."""

from __future__ import annotations

from typing import Any

from django.core import checks

from django_leakguard import conf


@checks.register("leakguard")
def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.E001: the LEAKGUARD setting is invalid."""
    return [
        checks.Error(message, hint=hint, id="leakguard.E001")
        for message, hint in conf.validate(conf.raw_setting())
    ]
