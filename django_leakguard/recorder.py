"""Per-process attribution and bounded aggregation (placeholder until issue 3 lands)."""

from __future__ import annotations


class Recorder:
    def flush(self) -> bool:
        return True


_recorder = Recorder()


def get_recorder() -> Recorder:
    return _recorder
