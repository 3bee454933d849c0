"""Where projects keep their server configs, and the server commands in Procfiles and Dockerfiles.

The checks read what this finds when LEAKGUARD names no config (docs/checks): config files by
their usual names in the current directory, BASE_DIR and BASE_DIR's parent, and in the etc/,
deploy/, config/, conf/ and docker/ directories of those; and the gunicorn and uwsgi commands of
the Procfiles and Dockerfiles (CMD and ENTRYPOINT lines) there. A path a Dockerfile's command
names is the image's; where it does not exist here, the project's copy of it is used
(Command.locate).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CONFIG_DIRS = ("", "etc", "deploy", "config", "conf", "docker")
GUNICORN_FILES = ("gunicorn.conf.py", "gunicorn_conf.py", "gunicorn_config.py", "gunicorn.py")
UWSGI_FILES = ("uwsgi.ini",)
SERVERS = ("gunicorn", "uwsgi")
# Where a shell command line ends and another begins.
_SEPARATORS = {"&&", "||", ";", "|", "&"}
_DOCKER_COMMAND = re.compile(r"^\s*(CMD|ENTRYPOINT)\s+(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    """A gunicorn or uwsgi command line found in a Procfile or a Dockerfile."""

    server: str  # "gunicorn" or "uwsgi"
    args: tuple[str, ...]  # what follows the program's name
    source: str  # "the gunicorn command in /srv/app/Procfile (web)"
    directory: Path  # where it runs: relative paths in args are taken from here
    # A Dockerfile's command runs in the image; where to look for the project's copy of a path
    # it names (see locate).
    image_roots: tuple[Path, ...] = ()

    @property
    def in_image(self) -> bool:
        return bool(self.image_roots)

    def locate(self, name: str) -> Path:
        """Return where a file the command names is on this machine.

        A relative path is taken from the command's directory. A Dockerfile's command runs in
        the image, where the project was copied (`COPY . /opt/app/`): a path there (absolute,
        or relative to its WORKDIR) that does not exist here is looked for in the project by
        its trailing parts, longest first (/opt/app/docker/uwsgi.ini is docker/uwsgi.ini of the
        build context), under the Dockerfile's directory, its parent, BASE_DIR and BASE_DIR's
        parent. When no copy is found, the path as named.
        """
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = self.directory / path
        if self.in_image and not path.exists():
            return project_copy(name, self.image_roots) or path
        return path


def project_copy(name: str, roots: Sequence[Path]) -> Path | None:
    """Return the file under one of roots at the longest trailing part of name, if any."""
    parts = [part for part in PurePosixPath(name).parts if part not in ("/", ".")]
    if ".." in parts:
        return None  # where it leads in the image is not known
    for start in range(len(parts)):
        tail = Path(*parts[start:])
        for root in roots:
            if (root / tail).is_file():
                return root / tail
    return None


def _image_roots(dockerfile: Path, base_dir: Path | None) -> tuple[Path, ...]:
    """Where a Dockerfile's build context may be: its directory, its parent, BASE_DIR and
    BASE_DIR's parent; never / (where an image path would find the system's files)."""
    candidates = [dockerfile.parent, dockerfile.parent.parent]
    if base_dir is not None:
        candidates += [base_dir, base_dir.parent]
    roots: list[Path] = []
    for root in candidates:
        if root.parent != root and root not in roots:
            roots.append(root)
    return tuple(roots)


def search_dirs(base_dir: Path | None) -> list[Path]:
    """Return the existing directories to look in: the current one, BASE_DIR and its parent,
    each with its etc/, deploy/, config/, conf/ and docker/ subdirectories; never /."""
    roots = [Path.cwd()]
    if base_dir is not None:
        roots += [base_dir, base_dir.parent]
    found: list[Path] = []
    seen: set[Path] = set()
    for root in roots:
        if root.parent == root:
            # The filesystem's root (BASE_DIR = /app in a container): its etc/ is the system's.
            continue
        for name in CONFIG_DIRS:
            directory = root / name if name else root
            key = directory.resolve()
            if key in seen or not directory.is_dir():
                continue
            seen.add(key)
            found.append(directory)
    return found


def find_files(names: tuple[str, ...], base_dir: Path | None) -> list[Path]:
    """Return the files with one of names in the search directories, in search order."""
    return [
        directory / name
        for directory in search_dirs(base_dir)
        for name in names
        if (directory / name).is_file()
    ]


def find_commands(base_dir: Path | None, server: str) -> list[Command]:
    """Return the server's commands in the Procfiles and Dockerfiles of the search directories."""
    commands: list[Command] = []
    for directory in search_dirs(base_dir):
        procfile = directory / "Procfile"
        if procfile.is_file():
            for name, line in _procfile_lines(procfile):
                commands += _commands(shlex_split(line), server, f"{procfile} ({name})", directory)
        dockerfile = directory / "Dockerfile"
        if dockerfile.is_file():
            roots = _image_roots(dockerfile, base_dir)
            for instruction, argv in _docker_commands(dockerfile):
                where = f"{dockerfile} ({instruction})"
                commands += _commands(argv, server, where, directory, roots)
    return commands


def shlex_split(line: str) -> list[str]:
    """Split a shell command line into words; an unbalanced quote ends it."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words: list[str] = []
    try:
        for word in lexer:
            words.append(word)
    except ValueError:
        pass
    return words


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _procfile_lines(path: Path) -> list[tuple[str, str]]:
    lines = []
    for line in _read(path).splitlines():
        name, colon, command = line.partition(":")
        if colon and name.strip() and not name.lstrip().startswith("#"):
            lines.append((name.strip(), command))
    return lines


def _docker_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Return the CMD and ENTRYPOINT instructions of a Dockerfile, as argument lists."""
    # Continuation lines end with a backslash.
    text = re.sub(r"\\\r?\n", " ", _read(path))
    found = []
    for line in text.splitlines():
        match = _DOCKER_COMMAND.match(line)
        if match is None:
            continue
        instruction, rest = match.group(1).upper(), match.group(2).strip()
        argv: object = None
        if rest.startswith("["):
            try:
                argv = json.loads(rest)
            except ValueError:
                argv = None
        if not (isinstance(argv, list) and all(isinstance(word, str) for word in argv)):
            argv = shlex_split(rest)
        assert isinstance(argv, list)
        found.append((instruction, argv))
    return found


def _commands(
    argv: list[str], server: str, where: str, directory: Path, image_roots: tuple[Path, ...] = ()
) -> list[Command]:
    """Return the server's commands in a command line (sh -c "..." included)."""
    commands: list[Command] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in ("-c",) and index > 0 and os.path.basename(argv[index - 1]) in ("sh", "bash"):
            script = " ".join(argv[index + 1 : index + 2])
            commands += _commands(shlex_split(script), server, where, directory, image_roots)
            index += 2
            continue
        program = os.path.basename(word)
        if program == server or (
            program == "-m" and index + 1 < len(argv) and argv[index + 1] == server
        ):
            start = index + (2 if program == "-m" else 1)
            end = start
            while end < len(argv) and argv[end] not in _SEPARATORS:
                end += 1
            source = f"the {server} command in {where}"
            args = tuple(argv[start:end])
            commands.append(Command(server, args, source, directory, image_roots))
            index = end
            continue
        index += 1
    return commands


def nothing_found(base_dir: Path | None) -> bool:
    """Return whether no Gunicorn or uWSGI config file and no such command was found."""
    return not find_files(GUNICORN_FILES + UWSGI_FILES, base_dir) and not any(
        find_commands(base_dir, server) for server in SERVERS
    )
