"""Tell the user of a command when its servers stop answering mid-run, and when they answer
again: the frames wait for them (``--patience``), and without a word the progress bar looks hung."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from client.stream import Outage

# An outage shorter than this passes unsaid (a model reload takes seconds).
NOTICE_AFTER_S = 5.0
CHECK_EVERY_S = 1.0
REASON_CHARS = 200


def retry_rule(patience_s: float, retries: int | None, lasted_s: float, item: str = "frame") -> str:
    """What happens to the ``item``s (frames, chunks, requests) that fail, ``lasted_s`` into an
    outage, under ``--patience`` and ``--retries`` (``client.stream.RetryPolicy``)."""
    if retries == 0:
        return f"{item}s that fail are not tried again (--retries 0)"
    if lasted_s >= patience_s:
        return f"--patience {patience_s:g} s is spent, so each further {item} is tried once"
    at_most = f"at most {retries} more time(s) each, " if retries is not None else ""
    return f"{item}s are tried again ({at_most}until it has failed for {patience_s:g} s, --patience)"


class OutageNotices:
    """Says, through ``say``, once an outage of ``outage`` has lasted ``after_s``: its latest
    error and what happens to the frames that fail (``retry_rule``); then, once it ends, that
    ``where`` (the servers) answers again. ``check()`` decides, on the outage's clock;
    ``watching`` calls it every ``CHECK_EVERY_S`` in a thread."""

    def __init__(self, outage: Outage, where: str, patience_s: float, say: Callable[[str], None],
                 after_s: float = NOTICE_AFTER_S, retries: int | None = None, item: str = "frame"):
        self.outage, self.where, self.patience_s, self.say, self.after_s = outage, where, patience_s, say, after_s
        self.retries, self.item = retries, item
        self._told_lasted_s: float | None = None  # the outage told of: how long it had lasted at the last check

    def check(self) -> None:
        lasted_s = self.outage.lasted_s()
        if lasted_s is None:
            if self._told_lasted_s is not None:
                self.say(f"client: {self.where} answers again, after about {self._told_lasted_s:.0f} s without")
                self._told_lasted_s = None
        elif self._told_lasted_s is not None or lasted_s >= self.after_s:
            if self._told_lasted_s is None:
                self.say(f"client: no answer from {self.where} for {lasted_s:.0f} s ({self._reason()}); "
                         f"{retry_rule(self.patience_s, self.retries, lasted_s, self.item)}")
            self._told_lasted_s = lasted_s

    def _reason(self) -> str:
        """The first line of the latest failure's error, cut to ``REASON_CHARS``."""
        lines = (self.outage.last_reason or "").strip().splitlines()
        return lines[0][:REASON_CHARS] if lines else "no error given"


@contextlib.contextmanager
def watching(outage: Outage, where: str, patience_s: float, say: Callable[[str], None],
             every_s: float = CHECK_EVERY_S, retries: int | None = None, item: str = "frame") -> Iterator[OutageNotices]:
    """``OutageNotices`` checked every ``every_s`` in a daemon thread while the block runs."""
    notices = OutageNotices(outage, where, patience_s, say, retries=retries, item=item)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            notices.check()

    thread = threading.Thread(target=watch, daemon=True, name="outage-notices")
    thread.start()
    try:
        yield notices
    finally:
        stop.set()
        thread.join()
        notices.check()  # an outage that ended since the last check is told of still
