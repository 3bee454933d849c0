"""Where the checks look for server configs and commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from django_leakguard import discovery
from django_leakguard.discovery import Command


@pytest.fixture(autouse=True)
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_search_dirs_are_cwd_base_dir_its_parent_and_their_config_dirs(
    tmp_path: Path, cwd: Path
) -> None:
    base_dir = tmp_path / "repo" / "src"
    for directory in (base_dir, tmp_path / "repo" / "deploy", base_dir / "etc", cwd / "docker"):
        directory.mkdir(parents=True)
    (tmp_path / "repo" / "conf").write_text("a file, not a directory")
    assert discovery.search_dirs(base_dir) == [
        cwd,
        cwd / "docker",
        base_dir,
        base_dir / "etc",
        tmp_path / "repo",
        tmp_path / "repo" / "deploy",
    ]
    assert discovery.search_dirs(None) == [cwd, cwd / "docker"]
    assert discovery.search_dirs(cwd) == [cwd, cwd / "docker", tmp_path]
    # BASE_DIR = /app in a container: / and the system's /etc are not searched.
    assert discovery.search_dirs(Path("/app")) == [cwd, cwd / "docker"]


def test_find_files(tmp_path: Path, cwd: Path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "gunicorn.py").write_text("")
    (cwd / "uwsgi.ini").write_text("")
    assert discovery.find_files(discovery.GUNICORN_FILES, cwd) == [tmp_path / "deploy/gunicorn.py"]
    assert discovery.find_files(discovery.UWSGI_FILES, cwd) == [cwd / "uwsgi.ini"]
    assert not discovery.nothing_found(cwd)
    assert discovery.nothing_found(None) is False
    (cwd / "uwsgi.ini").unlink()
    assert discovery.nothing_found(None)


def test_procfile_commands(cwd: Path) -> None:
    (cwd / "Procfile").write_text(
        "# processes\n"
        "release: python manage.py migrate\n"
        "web: python manage.py collectstatic --no-input && gunicorn -c deploy/g.py site.wsgi\n"
        "alt: sh -c 'exec python -m gunicorn site.wsgi --max-requests 5; echo done'\n"
        "uw: newrelic-admin run-program /venv/bin/uwsgi --ini deploy/uwsgi.ini -p 4\n"
        "broken: gunicorn 'unbalanced\n"
        "no colon here\n"
    )
    where = f"the gunicorn command in {cwd / 'Procfile'}"
    assert discovery.find_commands(None, "gunicorn") == [
        Command("gunicorn", ("-c", "deploy/g.py", "site.wsgi"), f"{where} (web)", cwd),
        Command("gunicorn", ("site.wsgi", "--max-requests", "5"), f"{where} (alt)", cwd),
        Command("gunicorn", (), f"{where} (broken)", cwd),
    ]
    [uwsgi] = discovery.find_commands(None, "uwsgi")
    assert uwsgi.args == ("--ini", "deploy/uwsgi.ini", "-p", "4")


def test_dockerfile_commands(cwd: Path) -> None:
    (cwd / "docker").mkdir()
    (cwd / "docker" / "Dockerfile").write_text(
        "FROM python:3.12\n"
        'CMD ["gunicorn", "-c", "python:django_leakguard.gunicorn_conf", "site.wsgi"]\n'
        "cmd gunicorn site.wsgi \\\n    --max-requests 100\n"
        'ENTRYPOINT ["/bin/sh", "-c", "uwsgi --ini uwsgi.ini"]\n'
        "CMD [not json\n"
        "RUN gunicorn --version\n"
    )
    gunicorn = discovery.find_commands(None, "gunicorn")
    assert [command.args for command in gunicorn] == [
        ("-c", "python:django_leakguard.gunicorn_conf", "site.wsgi"),
        ("site.wsgi", "--max-requests", "100"),
    ]
    assert gunicorn[0].source.endswith("docker/Dockerfile (CMD)")
    assert gunicorn[0].directory == cwd / "docker"
    [uwsgi] = discovery.find_commands(None, "uwsgi")
    assert (uwsgi.args, uwsgi.source[-12:]) == (("--ini", "uwsgi.ini"), "(ENTRYPOINT)")


def test_a_dockerfile_commands_paths_are_the_images(tmp_path: Path, cwd: Path) -> None:
    # healthchecks: docker/Dockerfile copies the repository to /opt/healthchecks/ and runs
    # `uwsgi /opt/healthchecks/docker/uwsgi.ini`; the file is docker/uwsgi.ini here.
    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    (repo / "docker" / "uwsgi.ini").write_text("[uwsgi]\n")
    (repo / "uwsgi.ini").write_text("[uwsgi]\n")  # a shorter tail must not win
    (repo / "docker" / "Dockerfile").write_text(
        "COPY . /opt/healthchecks/\nWORKDIR /opt/healthchecks\n"
        'CMD ["uwsgi", "/opt/healthchecks/docker/uwsgi.ini"]\n'
    )
    [command] = discovery.find_commands(repo / "app", "uwsgi")
    assert command.in_image
    assert command.image_roots == (repo / "docker", repo, repo / "app")
    assert command.locate("/opt/healthchecks/docker/uwsgi.ini") == repo / "docker" / "uwsgi.ini"
    # Relative to WORKDIR in the image, which is not the Dockerfile's directory here.
    assert command.locate("docker/uwsgi.ini") == repo / "docker" / "uwsgi.ini"
    assert command.locate("uwsgi.ini") == repo / "docker" / "uwsgi.ini"  # its own directory first
    # Nothing of the project: the path as named; a path that climbs out is not guessed.
    assert command.locate("/etc/uwsgi/app.ini") == Path("/etc/uwsgi/app.ini")
    assert command.locate("../uwsgi.ini") == repo / "docker" / "../uwsgi.ini"
    # A Procfile's command runs here: its paths are never looked for elsewhere.
    (repo / "Procfile").write_text("web: uwsgi docker/missing.ini\n")
    procfile = discovery.find_commands(repo, "uwsgi")[0]
    assert not procfile.in_image
    assert procfile.locate("/opt/healthchecks/docker/uwsgi.ini") == Path(
        "/opt/healthchecks/docker/uwsgi.ini"
    )


def test_unreadable_files_count_as_empty(cwd: Path) -> None:
    (cwd / "Procfile").mkdir()  # a directory: is_file() is False
    (cwd / "Dockerfile").write_bytes(b"CMD gunicorn \xff.wsgi\n")
    assert [c.args for c in discovery.find_commands(None, "gunicorn")] == [("\ufffd.wsgi",)]
    assert discovery._read(cwd / "missing") == ""
