"""Stub log lines stamped with the moment they describe.

A stub's log records reach Triton's log through a queue, so one may land after a line the
server wrote later (a warm-up batch after "successfully loaded"). Lines whose order matters
carry their own time, in the format of Triton's log prefix (``MMDD HH:MM:SS.ffffff``, local
time), so that readers of the log (tests) can order them.
"""

from __future__ import annotations

import datetime


def stamped(message: str) -> str:
    """``message`` followed by `` (at MMDD HH:MM:SS.ffffff)``, now."""
    return f"{message} (at {datetime.datetime.now():%m%d %H:%M:%S.%f})"
