"""Pickles that would run code when unpickled (tests/test_pickle_safety.py). The "code" is
harmless: it creates a marker file, so a test can tell whether unpickling ran it."""

from __future__ import annotations

import os


def make_marker(path: str) -> str:
    """What a malicious pickle calls: leaves a file behind."""
    with open(path, "w") as f:
        f.write("the pickle ran code\n")
    return "payload ran"


class Payload:
    """Pickles as a call of :func:`make_marker` (as an exploit would call ``os.system``)."""

    def __init__(self, marker: str):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (make_marker, (self.marker,))
