"""Every process ckd starts ends with its parent.

ckd's worker processes come from `multiprocessing` (FFCV's dataset writer forks workers
that each hold shared-memory buffers). A parent killed with SIGKILL runs no cleanup, so
the kernel must end them: each forked child asks for SIGKILL when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`), installed once for every `multiprocessing` child by
importing `ckd`. Threads (cache prefetch, FFCV loading) end with the process anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux; no-op else)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class _Hook:
    """`register_after_fork` keeps a weak reference to an object: this module holds it."""


_HOOK = _Hook()


def install() -> None:
    """Run `die_with_parent` in every process `multiprocessing` forks from now on."""
    multiprocessing.util.register_after_fork(_HOOK, lambda _: die_with_parent())
