"""Error text for tests of messages."""

from __future__ import annotations

from typing import Any, Callable


def error_text(fn: Callable[[], Any]) -> str:
    """``"Type: message"`` of what ``fn()`` raises; an AssertionError if it raises nothing.
    Catches ``BaseException``: DCP wraps rank errors in its ``CheckpointException``, which is one."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    raise AssertionError("expected an error")
