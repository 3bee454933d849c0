"""The built wheel in a fresh virtualenv, in a project made by `django-admin startproject`.

The project has what real ones have and the test project lacks (issue 16.9): i18n_patterns()
without the default language's prefix, a Django REST framework router and a catch-all route; it
sets DJANGO_SETTINGS_MODULE in wsgi.py only, as startproject writes it. It runs under Gunicorn
with django_leakguard.gunicorn_conf, and the keys leakreport lists are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import servers

pytestmark = pytest.mark.servers

SETTINGS = """
INSTALLED_APPS += ["rest_framework", "django_leakguard"]
MIDDLEWARE = [
    "django_leakguard.middleware.LeakGuardMiddleware",
    *MIDDLEWARE[:2],
    "django.middleware.locale.LocaleMiddleware",
    *MIDDLEWARE[2:],
]
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("fr", "French")]
ALLOWED_HOSTS = ["127.0.0.1"]
REST_FRAMEWORK = {"DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"]}
"""

URLS = """
from django.conf.urls.i18n import i18n_patterns
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.urls import include, path, re_path
from rest_framework import routers, serializers, viewsets


class UserSerializer(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "username"]


class UserViewSet(viewsets.ModelViewSet):
    queryset = User.objects.all()
    serializer_class = UserSerializer


def item(request, pk):
    return HttpResponse(f"item {pk}")


def page(request, path):
    return HttpResponse(f"page {path}")


router = routers.DefaultRouter()
router.register("users", UserViewSet)

urlpatterns = [
    path("api/", include(router.urls)),
    *i18n_patterns(path("items/<int:pk>/", item), prefix_default_language=False),
    re_path(r"^(?P<path>.*)$", page),
]
"""

# Path requested -> the key it is recorded under.
REQUESTS = {
    "/items/1/": "/{lang}/items/<int:pk>/",
    "/fr/items/2/": "/{lang}/items/<int:pk>/",
    "/api/": "/api/",
    "/api/users/": "/api/users/",
    "/api/users/1/": "/api/users/<pk>/",
    "/api/users.json": "/api/users.<format>/?",
    "/about/us/": "/<path>",
    "/fr/nothing/": "/<path>",
}


def run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd=cwd, env=env
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_wheel_in_a_startproject_project_under_gunicorn(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(root)])
    [wheel] = (tmp_path / "dist").glob("django_leakguard-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", f"{wheel}[gunicorn]", "djangorestframework"])
    project = tmp_path / "project"
    project.mkdir()
    run([str(venv / "bin" / "django-admin"), "startproject", "site_app", str(project)])
    with (project / "site_app" / "settings.py").open("a") as settings:
        settings.write(SETTINGS)
    (project / "site_app" / "urls.py").write_text(URLS)
    # The installed package, not this checkout, and no settings module in the environment.
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH") and not name.startswith("COV")
    }
    manage = [python, "manage.py"]
    run([*manage, "migrate", "--noinput", "-v", "0"], cwd=project, env=env)
    run([*manage, "shell", "-c", "from django.contrib.auth.models import User; "
         "User.objects.create(username='alice')"], cwd=project, env=env)  # fmt: skip
    port = servers.free_port()
    command = [
        str(venv / "bin" / "gunicorn"),
        "-c",
        "python:django_leakguard.gunicorn_conf",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "site_app.wsgi",
    ]
    server = servers.start(
        "wheel", command, env=env, log_path=tmp_path / "g.log", cwd=project, port=port
    )
    try:
        server.wait_for_log(r"django-leakguard: worker \d+ recycles after")
        for path in REQUESTS:
            status, _ = servers.get(server.url(path))
            assert status == 200, path
    finally:
        # A graceful stop (SIGTERM): the worker's exit hook writes what it recorded.
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log
    data = json.loads(
        run([*manage, "leakreport", "--format", "json", "--limit", "0"], cwd=project, env=env)
    )
    keys = {row["key"]: row["calls"] for row in data["rows"]}
    expected: dict[str, int] = {}
    for key in REQUESTS.values():
        expected[key] = expected.get(key, 0) + 1
    assert keys == expected
