"""Outage notices for `segment-dataset`, whose requests run on Dask workers: each worker
process reports its dataset client's outage (``client.stream.Outage``) as Dask events, and the
command folds them into one outage for the run, told of by ``client.outage_notices`` as the
other commands tell of their own client's.

Worker side: while a task of a run is running (``running``), a daemon thread of the process
(one for all its runs) looks at the outage of the client the patience is measured on (the
job's URL list, the last of ``client.datasets.worker_clients``) every ``CHECK_EVERY_S`` and
logs an event under ``TOPIC``: every check while that client is failing, else only when
what it says changes (a task costs a lock and a counter, nothing per item). A task's report
carries the same state as of its end (``state``), so the last recovery is known even when the
run ends before the thread's next event arrives.

Command side (``ClusterOutage``): the run's outage began when the first process reported one
that was still running a task; it ends once no process running a task is failing, and one of
them was seen to recover (a success reset its client's outage). A process with no task
running is left out (its client keeps the outage of the task that gave up on it, and it may
get no further task), but its silence proves nothing either: a run whose servers are gone for
good says no "answers again". A busy process that stops reporting (the worker was lost) is
left out after ``STALE_S``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from client.outage_notices import CHECK_EVERY_S, REASON_CHARS

TOPIC = "segserve-dataset-outage"
STALE_S = 30.0  # a busy process's failing report not refreshed for this long no longer counts

# --- worker side ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Watched:
    """One run's tasks in this process: the outage they are patient on, and how many run."""

    outage: object  # client.stream.Outage
    worker: object  # distributed.Worker, whose log_event sends the reports
    running: int = 0
    told: tuple | None = None  # what the last event said (failing, busy, reason)
    idle_since: float | None = None


_lock = threading.Lock()
_watched: dict[str, _Watched] = {}
_thread_pid: int | None = None  # the process whose thread watches (a forked child starts its own)
FORGET_IDLE_S = 120.0  # a run with no task here for this long is forgotten (it ended, or left this worker)


def process_name() -> str:
    """Who reports: the process, whose clients (and so outage clocks) all its workers share."""
    return f"{socket.gethostname()}/{os.getpid()}"


def state(run: str, outage, busy: bool) -> dict:
    """The report of ``outage`` for ``run`` (msgpack-serializable, as Dask events must be)."""
    lasted_s = outage.lasted_s()
    reason = outage.last_reason if lasted_s is not None else None
    return {"run": run, "process": process_name(), "t": time.monotonic(), "lasted_s": lasted_s, "busy": busy,
            "reason": reason[:REASON_CHARS * 2] if reason else None}


@contextlib.contextmanager
def running(run: str | None, outage) -> Iterator[Callable[[], dict | None]]:
    """While a task of ``run`` runs here: its process's outage is watched and reported. Yields
    a function giving the state now (None where nothing reports: no run id, not on a worker)."""
    worker = _current_worker() if run else None
    if worker is None:
        yield lambda: None
        return
    global _thread_pid
    with _lock:
        if _thread_pid != os.getpid():  # first task here, or a process forked from one that watched
            _watched.clear()
            _thread_pid = os.getpid()
            threading.Thread(target=_watch, daemon=True, name="dataset-outage-reports").start()
        entry = _watched.get(run)
        if entry is None or entry.outage is not outage:
            entry = _watched[run] = _Watched(outage, worker)
        entry.running += 1
        entry.idle_since = None
    try:
        yield lambda: state(run, outage, True)
    finally:
        with _lock:
            entry.running -= 1
            if entry.running == 0:
                entry.idle_since = time.monotonic()


def _current_worker():
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not in a Dask task (a direct call)
        return None


def _watch() -> None:
    pid = os.getpid()
    while _thread_pid == pid:
        time.sleep(CHECK_EVERY_S)
        report_changes()


def report_changes() -> None:
    """One check of every watched run: an event where its client is failing while a task
    runs, or where what it says has changed."""
    with _lock:
        entries = list(_watched.items())
    for run, entry in entries:
        with _lock:
            busy = entry.running > 0
            if not busy and time.monotonic() - entry.idle_since > FORGET_IDLE_S:
                _watched.pop(run, None)
                continue
        message = state(run, entry.outage, busy)
        failing = message["lasted_s"] is not None
        told = (failing, busy, message["reason"])
        if (failing and busy) or told != entry.told:
            try:
                entry.worker.log_event(TOPIC, message)
            except Exception:  # noqa: BLE001 - a closing worker: the report is only a notice
                continue
            entry.told = told


# --- command side --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Process:
    t: float  # the process's clock at its report (orders its reports)
    received: float  # ours
    since: float | None  # ours: when its outage began; None: not failing
    busy: bool


class ClusterOutage:
    """One run's outage over all its worker processes' reports (``update``), with the
    ``lasted_s()`` and ``last_reason`` of a ``client.stream.Outage``, on this process's clock."""

    def __init__(self, run: str, clock: Callable[[], float] = time.monotonic, stale_s: float = STALE_S):
        self.run, self.clock, self.stale_s = run, clock, stale_s
        self._processes: dict[str, _Process] = {}
        self._since: float | None = None
        self._recovered = False  # a process was seen to recover during the outage
        self._last_reason: str | None = None
        self._lock = threading.Lock()

    def update(self, message: dict | None) -> None:
        """A process's report (``state``); another run's, an older one or None is ignored."""
        if not message or message.get("run") != self.run:
            return
        with self._lock:
            now = self.clock()
            previous = self._processes.get(message["process"])
            if previous is not None and message["t"] <= previous.t:
                return
            lasted_s = message["lasted_s"]
            since = None if lasted_s is None else now - lasted_s
            self._processes[message["process"]] = _Process(message["t"], now, since, bool(message["busy"]))
            if since is None and previous is not None and previous.since is not None:
                self._recovered = True
            if lasted_s is not None and message.get("reason"):
                self._last_reason = message["reason"]
            self._settle(now)

    def _settle(self, now: float) -> None:
        failing = [p.since for p in self._processes.values()
                   if p.since is not None and p.busy and now - p.received <= self.stale_s]
        if failing:
            if self._since is None:
                self._since, self._recovered = min(failing), False
            else:
                self._since = min(self._since, *failing)
        elif self._since is not None and self._recovered:
            self._since = None

    def handle_event(self, event: tuple) -> None:
        """A ``Client.subscribe_topic`` handler: ``event`` is (scheduler time, message)."""
        self.update(event[1])

    @property
    def last_reason(self) -> str | None:
        with self._lock:
            return self._last_reason

    def lasted_s(self) -> float | None:
        with self._lock:
            now = self.clock()
            self._settle(now)
            return None if self._since is None else now - self._since


@contextlib.contextmanager
def subscribed(dask_client, outage: ClusterOutage) -> Iterator[ClusterOutage]:
    """``outage`` fed with the cluster's reports while the block runs (subscribe before the
    tasks are submitted: events logged earlier are not sent)."""
    dask_client.subscribe_topic(TOPIC, outage.handle_event)
    try:
        yield outage
    finally:
        with contextlib.suppress(Exception):  # a lost scheduler: nothing to unsubscribe from
            dask_client.unsubscribe_topic(TOPIC)
