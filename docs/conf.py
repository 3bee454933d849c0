"""Sphinx configuration for django-leakguard's documentation."""

from __future__ import annotations

project = "django-leakguard"
author = "django-leakguard contributors"
copyright = "2026, django-leakguard contributors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "django-leakguard"
