"""Imported (preloaded) by the fork server of :class:`dcp_ext.testing.RankPool`, and nowhere else.

Importing it asks Linux to kill *this* process when its parent dies: the fork server then dies
with the process that owns the rank pools, even if that one is killed with ``kill -9``, instead
of lingering with its forked ranks. Never import it in a process that should outlive its parent.
"""

from __future__ import annotations

import os
import signal


def _arm() -> None:
    try:
        import ctypes

        parent = os.getppid()
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before we asked
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: nothing to arm
        pass


_arm()
