"""Error text for tests of messages."""

from __future__ import annotations

import logging
from typing import Any, Callable

from dcp_ext.torch_compat import stock_load_hides_reader_errors


class _Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def error_text(fn: Callable[[], Any]) -> str:
    """``"Type: message"`` of what ``fn()`` raises; an AssertionError if it raises nothing.
    Catches ``BaseException``: DCP wraps rank errors in its ``CheckpointException``, which is one.

    Where stock ``dcp.load`` hides the reader's error (torch 2.9: a bare ``AssertionError``),
    dcp_ext logs it at ERROR instead: those lines follow the message, each after ``(logged)``,
    so a test of the message checks what the user sees on that torch too.
    """
    logged = _Logged()
    log = logging.getLogger("dcp_ext")
    if stock_load_hides_reader_errors():
        log.addHandler(logged)
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return "\n(logged) ".join([f"{type(e).__name__}: {e}", *logged.lines])
    finally:
        log.removeHandler(logged)
    raise AssertionError("expected an error")
