"""Stub log lines stamped with the moment they describe.

A stub's log records reach Triton's log through a queue, so one may land after a line the
server wrote later (a warm-up batch after "successfully loaded"). Lines whose order matters
carry their own time, in the format of Triton's log prefix (``MMDD HH:MM:SS.ffffff``, UTC:
Triton's ``LogMessage`` uses ``gmtime_r``), so that readers of the log (tests) can order them.
"""

from __future__ import annotations

import datetime


def stamped(message: str) -> str:
    """``message`` followed by `` (at MMDD HH:MM:SS.ffffff)``, now in UTC."""
    return f"{message} (at {datetime.datetime.now(datetime.timezone.utc):%m%d %H:%M:%S.%f})"
