"""Preloaded by the fork server of :class:`dcp_ext.testing.RankPool`: makes the fork server die
with the process that owns the rank pools (even after ``kill -9``), instead of lingering with
its forked ranks.

Importing it arms ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` **only** in a process whose parent put
its own pid in the ``_DCP_EXT_PDEATHSIG_PARENT`` environment variable before starting it, which
the harness does just for its fork server. Anywhere else (a docs builder or ``walk_packages``
importing every module) the import does nothing.
"""

from __future__ import annotations

import os
import signal

#: the harness sets this to its own pid before its fork server starts
ENV_VAR = "_DCP_EXT_PDEATHSIG_PARENT"


def arm() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; exit at once if the parent is
    already gone. Returns whether the request was made (False off Linux)."""
    try:
        import ctypes

        parent = os.getppid()
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before we asked
            os._exit(1)
        return True
    except (OSError, AttributeError):  # not Linux: nothing to arm
        return False


if os.environ.get(ENV_VAR) == str(os.getppid()):
    arm()
