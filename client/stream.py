"""Keep several frames in flight and hand results back in input order.

``ordered_stream`` is transport-agnostic: it takes items whose frame is loaded on demand and a
``process(worker, frame)`` function run by ``inflight`` worker threads (worker ``w`` always uses
slot ``w``, so each slot's connection and shared-memory regions serve one request at a time).
Failures become outcomes, never exceptions, so no frame is dropped silently; retries with
backoff are applied to errors marked retryable, for as long as the policy's patience. The
patience is measured on an ``Outage`` shared by every frame (one per client): how long the
servers have been failing, not how long one frame has, so a server gone for good costs a run
about one patience, not one per frame.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from client.connection import SegmentationError

# Results kept waiting for an earlier, slower frame: at most this many times `inflight`.
REORDER_WINDOW_FACTOR = 2
# How long an interrupted stream waits for requests already sent before letting go of them.
STOP_GRACE_S = 10.0


# How long the servers may keep failing for passing reasons before frames are given up: covers
# a whole server restart with every model on a busy 2-core machine (docs/recovery.md), with room.
DEFAULT_PATIENCE_S = 600.0
# An attempt started this long after an outage's last failure, with nothing failing between,
# starts a new outage (``Outage``): far above the longest backoff (5 s) an ongoing outage has.
QUIET_S = 30.0


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Attempts again after a retryable error while the outage (``Outage``: from the first
    retryable failure after the last success) has lasted at most ``patience_s`` seconds (and
    at most ``retries`` more times when given): ``backoff_s`` first, doubling, at most
    ``max_backoff_s`` apart. Time, not a count of attempts, is what rides out a restart: the
    client waits for the server to be back, however long that takes on a busy machine."""

    retries: int | None = None
    backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    patience_s: float = DEFAULT_PATIENCE_S

    def __post_init__(self):
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")
        if self.patience_s < 0:
            raise ValueError(f"patience_s must be >= 0, got {self.patience_s}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)

    def gives_up(self, attempt: int, failing_for_s: float) -> bool:
        """True when failed attempt ``attempt``, ``failing_for_s`` seconds into the outage, is
        the last: retries spent, or the next try would come past the patience."""
        if self.retries is not None and attempt > self.retries:
            return True
        return failing_for_s + self.delay(attempt) > self.patience_s


@dataclasses.dataclass
class Outcome:
    """What became of one item: ``result`` on success, else ``error`` (one line).

    ``index`` is the caller's label of the item (e.g. its frame number in the stack);
    ``attempts`` is 0 when the frame could not even be loaded.
    """

    index: int
    result: object = None
    error: str | None = None
    attempts: int = 0
    retryable: bool = False  # the error was a passing one (a later try may succeed)

    @property
    def ok(self) -> bool:
        return self.error is None


def wait_for_recovery(longest_s: float, is_ready: Callable[[], bool], step_s: float = 0.25,
                      sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic) -> None:
    """Wait before a retry: ``longest_s`` at most, less when the server comes back. Looks at
    ``is_ready()`` every ``step_s`` and returns once it turns True after having been False (a
    reload or restart that ends within the backoff is used at once, not at the next attempt);
    a server that stays ready (the failure was not about readiness) gets the whole wait."""
    deadline = clock() + longest_s
    seen_unready = False
    while (left := deadline - clock()) > 0:
        sleep(min(step_s, left))
        ready = is_ready()
        if ready and seen_unready:
            return
        seen_unready = seen_unready or not ready


class Outage:
    """How long the servers have been failing, shared by everything one client sends (every
    frame of every stream, in any thread): from the first retryable failure after the last
    success; any success ends it. Non-retryable errors (a bad frame or option: the server
    answered) neither start nor end it. Thread-safe; ``clock`` is injectable for tests.

    Nothing is known while nothing is sent: a failure of an attempt started more than
    ``QUIET_S`` after the outage's last failure begins a new outage (a long-lived client idle
    between runs, a Dask worker between tasks, must not find its patience spent by failures
    from long ago). While an outage goes on, attempts start at most a backoff (5 s) after a
    failure, so it is never cut short that way."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._since: float | None = None
        self._last_failure = -math.inf
        self._last_reason: str | None = None
        self._lock = threading.Lock()

    def failed(self, attempt_started: float | None = None, reason: str | None = None) -> float:
        """Record a retryable failure of an attempt started at ``attempt_started`` (default:
        now), for ``reason`` (its error); seconds the outage has lasted (0 at its first failure)."""
        with self._lock:
            now = self.clock()
            started = now if attempt_started is None else attempt_started
            if self._since is None or started - self._last_failure > QUIET_S:
                self._since = now
            self._last_failure, self._last_reason = now, reason
            return now - self._since

    @property
    def last_reason(self) -> str | None:
        """The error of the latest failure (None when not given)."""
        with self._lock:
            return self._last_reason

    def succeeded(self) -> None:
        """Record a success: the servers answer, the outage (if any) is over."""
        with self._lock:
            self._since = None

    def lasted_s(self) -> float | None:
        """Seconds since the outage began; None when there is none."""
        with self._lock:
            return None if self._since is None else self.clock() - self._since


def call_with_retries(function: Callable[[], object], policy: RetryPolicy,
                      sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic,
                      outage: Outage | None = None) -> tuple[object, int]:
    """``(function(), attempts)``; raises the last error once the policy gives up or the error
    is not retryable (ValueError and non-retryable SegmentationError fail at once).

    ``outage``: the shared one the patience is measured on (its own clock; a success resets
    it, a retryable failure starts it). None: this call's own, on ``clock``, from its first
    failure (a call that asks one question, e.g. a command's start-up metadata)."""
    outage = Outage(clock) if outage is None else outage
    attempt = 0
    while True:
        attempt += 1
        started = outage.clock()
        try:
            value = function()
        except SegmentationError as error:
            if not error.retryable or policy.gives_up(attempt, outage.failed(started, str(error))):
                error.attempts = attempt
                raise
            sleep(policy.delay(attempt))
        else:
            outage.succeeded()
            return value, attempt


def check_inflight(inflight) -> None:
    """Refuse an ``inflight`` that is not an integer >= 1 (ValueError naming it)."""
    if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 1:
        raise ValueError(f"inflight must be an integer >= 1, got {inflight!r}")


def ordered_stream(items: Iterable[tuple[int, Callable[[], object]]], process: Callable[[int, object], object],
                   inflight: int = 4, policy: RetryPolicy = RetryPolicy(),
                   wait: Callable[[float], None] = time.sleep, outage: Outage | None = None,
                   on_stopped: Callable[[set[int]], None] | None = None,
                   stop_grace_s: float = STOP_GRACE_S) -> Iterator[Outcome]:
    """Run ``process(worker, frame)`` over ``items`` with ``inflight`` workers; yield Outcomes
    in the items' order.

    Args:
        items: ``(index, load)`` pairs; ``load()`` returns the frame (read in the caller's
            thread, so readers need not be thread-safe). A load error (any Exception) becomes
            a failed Outcome of that frame alone.
        process: called in worker thread ``worker`` (0..inflight-1); its return value is the
            Outcome's ``result``.
        inflight: requests in flight at once.
        policy: retries of retryable SegmentationErrors.
        wait: waits the policy's delay before a retry (e.g. ``wait_for_recovery``, which
            cuts it short when the server is back).
        outage: the ``Outage`` the patience is measured on, shared with whatever else sends to
            the same servers (a client's); None: one of this stream's own, shared by its frames.
        on_stopped: called once when the stream ends, however it ends (exhausted, failed,
            closed), after waiting up to ``stop_grace_s`` for the calls in flight: with the
            workers still inside a ``process`` call then. Each makes no further call once that
            one returns; every other worker has made its last.
        stop_grace_s: how long the end of the stream waits for calls in flight.

    Raises:
        Whatever iterating ``items`` raised (the same exception), once every frame taken
        before it has been yielded. KeyboardInterrupt and SystemExit, from the items or a
        ``load()``, at once.
    """
    check_inflight(inflight)
    pool = _WorkerPool(process, inflight, policy, wait, Outage() if outage is None else outage)
    window = REORDER_WINDOW_FACTOR * inflight
    finished: dict[int, Outcome] = {}
    source = _Source(items)
    submitted = yielded = 0
    try:
        while True:
            while pool.busy < inflight and submitted - yielded < window and (item := source.next()) is not None:
                index, load = item
                try:
                    frame = load()
                except Exception as error:  # a bad frame fails alone; KeyboardInterrupt still ends the stream
                    finished[submitted] = Outcome(index, error=f"cannot read frame: {error}")
                else:
                    pool.submit(submitted, index, frame)
                submitted += 1
            if yielded in finished:
                yield finished.pop(yielded)
                yielded += 1
            elif source.done and yielded == submitted:
                break
            else:
                position, outcome = pool.next_result()
                finished[position] = outcome
    finally:
        still_running = pool.stop(stop_grace_s)
        if on_stopped is not None:
            on_stopped(still_running)
    if source.error is not None:
        raise source.error


class _Source:
    """The items, read until they end or fail; ``error`` is what they raised, kept so the
    frames already taken are yielded before it propagates."""

    def __init__(self, items: Iterable[tuple[int, Callable[[], object]]]):
        self._items = iter(items)
        self.done = False
        self.error: Exception | None = None

    def next(self) -> tuple[int, Callable[[], object]] | None:
        """The next ``(index, load)``; None once the items have ended or failed."""
        if self.done:
            return None
        try:
            index, load = next(self._items)
            return index, load
        except StopIteration:
            self.done = True
        except Exception as error:
            self.done, self.error = True, error
        return None


class _WorkerPool:
    """``inflight`` daemon threads taking ``(position, index, frame)`` jobs. Daemon threads,
    so a request hung without a deadline cannot keep the interpreter from exiting."""

    def __init__(self, process, workers: int, policy: RetryPolicy, wait: Callable[[float], None], outage: Outage):
        self.process, self.policy, self.wait = process, policy, wait
        self.outage = outage
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.busy = 0
        # Under the lock: whether the pool stopped, and which workers are inside a call, so
        # that no call starts after stop() and its report of calls still running is exact.
        self._lock = threading.Lock()
        self._stopped = False
        self._running: set[int] = set()
        self.threads = [threading.Thread(target=self._work, args=(w,), daemon=True, name=f"segment-{w}")
                        for w in range(workers)]
        for thread in self.threads:
            thread.start()

    def submit(self, position: int, index: int, frame) -> None:
        self.busy += 1
        self.jobs.put((position, index, frame))

    def next_result(self) -> tuple[int, Outcome]:
        result = self.results.get()
        self.busy -= 1
        return result

    def stop(self, grace_s: float = STOP_GRACE_S) -> set[int]:
        """Drop the jobs not started, wait up to ``grace_s`` for the calls in flight; returns
        the workers still inside a call then (each ends when that call returns)."""
        with self._lock:
            self._stopped = True
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + grace_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return set(self._running)

    def _work(self, worker: int) -> None:
        while (job := self.jobs.get()) is not None:
            with self._lock:
                if self._stopped:
                    return
                self._running.add(worker)
            try:
                outcome = self._run(worker, *job[1:])
            finally:
                with self._lock:
                    self._running.discard(worker)
            self.results.put((job[0], outcome))

    def _run(self, worker: int, index: int, frame) -> Outcome:
        """The Outcome of ``process(worker, frame)``, retried as the policy says."""
        try:
            result, attempts = call_with_retries(lambda: self.process(worker, frame), self.policy,
                                                 self.wait, outage=self.outage)
            return Outcome(index, result=result, attempts=attempts)
        except SegmentationError as error:
            return Outcome(index, error=str(error), attempts=getattr(error, "attempts", 1), retryable=error.retryable)
        except ValueError as error:
            return Outcome(index, error=str(error), attempts=1)
        except Exception as error:  # a bug must not hang the stream: report it on the frame
            return Outcome(index, error=f"{type(error).__name__}: {error}", attempts=1)
