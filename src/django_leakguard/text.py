"""Text from outside (client paths, log lines, stored sites, settings) made safe to print."""

from __future__ import annotations

import re
import sys

# C0 and C1 controls and DEL (ESC starts terminal sequences, CR rewrites a line, BEL rings),
# the line and paragraph separators, and the bidirectional overrides and isolates that reorder
# what a terminal shows.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Return text with control characters shown as escapes: ESC as the four characters \\x1b."""
    return _CONTROLS.sub(_escaped, text)


def shown(value: object) -> str:
    """Return repr(value) for a message, shortened when long."""
    try:
        text = repr(value)
    except ValueError:  # an int over sys.get_int_max_str_digits() digits
        text = f"an integer of more than {sys.get_int_max_str_digits():,} digits"
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"
