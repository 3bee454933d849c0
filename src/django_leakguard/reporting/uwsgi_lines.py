"""What a uWSGI memory-report request line holds, and how its path becomes a key.

The line's fields are read by regular expressions (one findall() per chunk); a logged path
becomes a key with placeholders for its ids, or through the URLconf as the middleware keys it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable
from itertools import chain
from urllib.parse import unquote, urlsplit

from django_leakguard.records import fit_key, route_key

UNLOGGED = "<path not logged>"

# Only the fields we need (not the method), each bounded by the next literal, so the match
# never backtracks far. Everything after "=> generated" (msecs or micros, "via sendfile()",
# "via offload()") is irrelevant here. One findall() per chunk runs the per-line matching in C.
# The RSS and the request counter are read as ints: at most 20 digits (2**64 has 20), so that a
# corrupt line is skipped rather than stopping int() (Python refuses over 4,300 digits).
REQUEST_LINE = re.compile(
    rb"\{rss usage: (\d{1,20}) bytes/\d+MB\} "
    rb"(?:\{uss usage: \d+ bytes/\d+MB\} \{pss usage: \d+ bytes/\d+MB\} )?"
    rb"\[pid: (\d+)\|app: (-?\d+)\|req: (-?\d{1,20})/\d+\] "
    rb"\S* \(.*?\) \{\d+ vars in \d+ bytes\} "
    rb"\[([^\]\n]*)\] \S+ (\S+) => generated "
)
# The fast path: the same fields for the common line shape (memory-report = 1, digits-only app
# and request counter), built from cheaper steps ([^ ] runs instead of \S, no lazy repeat) and
# capturing the text from the client to the method in place of the date (read from it only
# when a worker is retired). Where it matches, REQUEST_LINE matches the same span with the
# same fields, provided that text and the URI hold no whitespace but spaces (checked for the
# whole chunk at once). The empty alternative makes every "{rss usage: " visited by
# REQUEST_LINE yield a row, so a line the fast path cannot read is seen (empty fields) and the
# chunk is read again with REQUEST_LINE.
FAST_LINE = re.compile(
    rb"\{rss usage: (?:([0-9]{1,20}) bytes/[0-9]+MB\} "
    rb"\[pid: ([0-9]+)\|app: ([0-9]+)\|req: ([0-9]{1,20})/[0-9]+\] "
    rb"([^ ]* \([^)]*\) \{[0-9]+ vars in [0-9]+ bytes\} \[[^\]]*\] [^ ]+) ([^ ]+) => generated )?"
)
# The date in the text FAST_LINE captured (it matches there, as FAST_LINE did).
FAST_DATE = re.compile(rb"[^ ]* \([^)]*\) \{[0-9]+ vars in [0-9]+ bytes\} \[([^\]]*)\] ")
# Whitespace other than the space: where these occur, FAST_LINE and REQUEST_LINE may differ.
_OTHER_WHITESPACE = (b"\t", b"\n", b"\x0b", b"\x0c", b"\r")


def parse_log_date(value: bytes) -> float | None:
    """Return the epoch seconds of a uWSGI ctime() date, or None when it is not one."""
    try:
        return time.mktime(time.strptime(value.decode("ascii"), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, UnicodeDecodeError):
        return None


def plain(*columns: tuple[bytes, ...]) -> bool:
    """Return whether the fields hold no whitespace but spaces."""
    # One copy, then a memchr() per character: half the time of a translate() that deletes.
    text = b"".join(chain.from_iterable(columns))
    return not any(character in text for character in _OTHER_WHITESPACE)


_NUMBER = re.compile(rb"[0-9]+")
_DIGITS = b"0123456789"
_EDGE_BEFORE = rb"(?<![0-9A-Za-z])"
_EDGE_AFTER = rb"(?![0-9A-Za-z])"
# (pattern, placeholder), applied in order to the raw path (bytes, before decoding).
_PLACEHOLDERS = [
    (
        re.compile(
            _EDGE_BEFORE + rb"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
            rb"[0-9a-fA-F]{12}" + _EDGE_AFTER
        ),
        b"<uuid>",
    ),
    (re.compile(_EDGE_BEFORE + rb"(?=[a-fA-F]*[0-9])[0-9a-fA-F]{8,}" + _EDGE_AFTER), b"<hex>"),
    (_NUMBER, b"<int>"),
]
# Every digit run becomes a placeholder, so paths that differ only in their digits have the
# same shape: the caches can key on the path with its digits zeroed.
ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")


def path_shape(path: bytes) -> bytes:
    """Return path with numbers, UUIDs and hex ids replaced by placeholders."""
    for pattern, placeholder in _PLACEHOLDERS:
        if pattern is _NUMBER and len(path.translate(None, _DIGITS)) == len(path):
            # No digit left (the ids held them all): deleting them takes a tenth of a search.
            break
        path = pattern.sub(placeholder, path)
    return path


def pattern_key(path: str) -> str:
    """Return path (decoded) with numbers, UUIDs and hex ids replaced by placeholders."""
    return fit_key(path_shape(path.encode("utf-8", "surrogateescape")).decode("utf-8", "replace"))


# A path converter in a route's text: <int:pk>, <slug>.
_CONVERTER = re.compile(r"<[^>]*>")


def digits_that_matter(urlconf: str | None = None) -> tuple[bytes, ...] | None:
    """Return where digits can change how a path resolves: () nowhere, None anywhere.

    Nowhere when every URL pattern is a path() route with Django's own converters (int, str,
    slug, uuid, path), none of which tells one digit from another, or a re_path() regex that
    tells none apart either (regex_ignores_digits()); i18n_patterns() count when no language
    code has a digit (es-419 has). A route's own text may hold digits (the admin's jsi18n/,
    api/v1/): only a path that holds that text can match it, so those texts are returned with
    their digits zeroed, and only the paths that hold one (digits zeroed) need resolving one by
    one. None: another converter, or a regex that names a digit.
    """
    from django.conf import settings
    from django.urls import URLPattern, URLResolver, converters, get_resolver
    from django.urls.resolvers import LocalePrefixPattern, RegexPattern, RoutePattern

    builtin = tuple(type(c) for c in converters.DEFAULT_CONVERTERS.values())
    digit_languages = any(c.isdigit() for code, _ in settings.LANGUAGES for c in code)
    texts: set[bytes] = set()

    def check(patterns: Iterable[object]) -> bool:
        for entry in patterns:
            if not isinstance(entry, (URLPattern, URLResolver)):
                return False  # pragma: no cover - Django only builds these two
            pattern = entry.pattern
            if isinstance(pattern, LocalePrefixPattern) and not digit_languages:
                if not check(entry.url_patterns):  # type: ignore[union-attr]
                    return False
                continue
            if isinstance(pattern, RegexPattern):
                if not regex_ignores_digits(str(pattern)):
                    return False
            elif isinstance(pattern, RoutePattern) and all(
                type(c) in builtin for c in pattern.converters.values()
            ):
                for text in _CONVERTER.split(str(pattern)):
                    if any(c.isdigit() for c in text):
                        texts.add(text.encode("utf-8", "surrogateescape").translate(ZERO_DIGITS))
            else:
                return False
            if isinstance(entry, URLResolver) and not check(entry.url_patterns):
                return False
        return True

    return tuple(sorted(texts)) if check(get_resolver(urlconf).url_patterns) else None


def urlconf_ignores_digits(urlconf: str | None = None) -> bool:
    """Return whether paths that differ only in their digits always resolve alike."""
    return digits_that_matter(urlconf) == ()


def regex_ignores_digits(regex: str) -> bool:
    """Return whether a URL regex matches a path exactly when it matches the path's digits zeroed.

    So when it names no digit: none written out, in a class, a count or an escape (\\x35,
    \\N{DIGIT FIVE}), and no backreference (which compares two groups' digits). What is left
    (\\d, \\w, ., classes without digits) treats every digit alike: `^static/(?P<path>.*)$`
    does, `^year/(?P<year>[12]\\d{3})/$` does not.
    """
    return not any(c.isdigit() for c in regex) and "\\N{" not in regex and "(?P=" not in regex


def urlconf_key(path: str) -> str | None:
    """Return the middleware's key for path, or None when it does not resolve."""
    from django.urls import Resolver404, resolve

    try:
        with _language_of(path):
            match = resolve(path)
    except Resolver404:
        return None
    return route_key(match)


def _language_of(path: str) -> contextlib.AbstractContextManager[None]:
    """Activate the language LocaleMiddleware would for path, so i18n_patterns() resolve it.

    The language of the path's prefix, else LANGUAGE_CODE (what an unprefixed path of
    i18n_patterns(prefix_default_language=False) is served in).
    """
    from django.conf import settings
    from django.utils import translation

    if not settings.USE_I18N:
        return contextlib.nullcontext()
    language = translation.get_language_from_path(path) or settings.LANGUAGE_CODE
    return translation.override(language)


def raw_path(uri: bytes) -> bytes:
    """Return the path of a logged URI (still percent-encoded), without its query string."""
    path = uri.partition(b"?")[0].partition(b"#")[0]
    if not path.startswith(b"/"):
        # An absolute URI from a proxy-style request line.
        path = urlsplit(path).path or b"/"
    return path


def decode_path(path: bytes) -> str:
    return unquote(path.decode("utf-8", "replace"))
