"""Keep several frames in flight and hand results back in input order.

``ordered_stream`` is transport-agnostic: it takes items whose frame is loaded on demand and a
``process(worker, frame)`` function run by ``inflight`` worker threads (worker ``w`` always uses
slot ``w``, so each slot's connection and shared-memory regions serve one request at a time).
Failures become outcomes, never exceptions, so no frame is dropped silently; retries with
backoff are applied to errors marked retryable, for as long as the policy's patience.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from client.connection import SegmentationError

# Results kept waiting for an earlier, slower frame: at most this many times `inflight`.
REORDER_WINDOW_FACTOR = 2
# How long an interrupted stream waits for requests already sent before letting go of them.
STOP_GRACE_S = 10.0


# How long a frame may keep failing for passing reasons before it is given up: covers a whole
# server restart with every model on a busy 2-core machine (docs/recovery.md), with room.
DEFAULT_PATIENCE_S = 600.0


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Attempts again after a retryable error for up to ``patience_s`` seconds from the first
    failure (and at most ``retries`` more times when given): ``backoff_s`` first, doubling, at
    most ``max_backoff_s`` apart. Time, not a count of attempts, is what rides out a restart:
    the client waits for the server to be back, however long that takes on a busy machine."""

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
        """True when failed attempt ``attempt``, ``failing_for_s`` seconds after the first
        failure, is the last: retries spent, or the next try would come past the patience."""
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


def call_with_retries(function: Callable[[], object], policy: RetryPolicy,
                      sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic) -> tuple[object, int]:
    """``(function(), attempts)``; raises the last error once the policy gives up or the error
    is not retryable (ValueError and non-retryable SegmentationError fail at once)."""
    attempt = 0
    first_failure = None
    while True:
        attempt += 1
        try:
            return function(), attempt
        except SegmentationError as error:
            first_failure = clock() if first_failure is None else first_failure
            if not error.retryable or policy.gives_up(attempt, clock() - first_failure):
                error.attempts = attempt
                raise
            sleep(policy.delay(attempt))


def ordered_stream(items: Iterable[tuple[int, Callable[[], object]]], process: Callable[[int, object], object],
                   inflight: int = 4, policy: RetryPolicy = RetryPolicy(),
                   wait: Callable[[float], None] = time.sleep) -> Iterator[Outcome]:
    """Run ``process(worker, frame)`` over ``items`` with ``inflight`` workers; yield Outcomes
    in the items' order.

    Args:
        items: ``(index, load)`` pairs; ``load()`` returns the frame (read in the caller's
            thread, so readers need not be thread-safe). A load error becomes a failed Outcome.
        process: called in worker thread ``worker`` (0..inflight-1); its return value is the
            Outcome's ``result``.
        inflight: requests in flight at once.
        policy: retries of retryable SegmentationErrors.
        wait: waits the policy's delay before a retry (e.g. ``wait_for_recovery``, which
            cuts it short when the server is back).
    """
    if inflight < 1:
        raise ValueError(f"inflight must be >= 1, got {inflight}")
    pool = _WorkerPool(process, inflight, policy, wait)
    window = REORDER_WINDOW_FACTOR * inflight
    finished: dict[int, Outcome] = {}
    source = iter(items)
    submitted = yielded = 0
    exhausted = False
    try:
        while True:
            while not exhausted and pool.busy < inflight and submitted - yielded < window:
                try:
                    index, load = next(source)
                except StopIteration:
                    exhausted = True
                    break
                try:
                    frame = load()
                except (OSError, ValueError, KeyError) as error:
                    finished[submitted] = Outcome(index, error=f"cannot read frame: {error}")
                else:
                    pool.submit(submitted, index, frame)
                submitted += 1
            if yielded in finished:
                yield finished.pop(yielded)
                yielded += 1
            elif exhausted and yielded == submitted:
                return
            else:
                position, outcome = pool.next_result()
                finished[position] = outcome
    finally:
        pool.stop()


class _WorkerPool:
    """``inflight`` daemon threads taking ``(position, index, frame)`` jobs. Daemon threads,
    so a request hung without a deadline cannot keep the interpreter from exiting."""

    def __init__(self, process, workers: int, policy: RetryPolicy, wait: Callable[[float], None] = time.sleep):
        self.process, self.policy, self.wait = process, policy, wait
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.busy = 0
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

    def stop(self) -> None:
        """Let the workers finish what they hold (up to STOP_GRACE_S), then return."""
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + STOP_GRACE_S
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self, worker: int) -> None:
        while (job := self.jobs.get()) is not None:
            position, index, frame = job
            try:
                result, attempts = call_with_retries(lambda frame=frame: self.process(worker, frame), self.policy, self.wait)
                outcome = Outcome(index, result=result, attempts=attempts)
            except SegmentationError as error:
                outcome = Outcome(index, error=str(error), attempts=getattr(error, "attempts", 1))
            except ValueError as error:
                outcome = Outcome(index, error=str(error), attempts=1)
            except Exception as error:  # a bug must not hang the stream: report it on the frame
                outcome = Outcome(index, error=f"{type(error).__name__}: {error}", attempts=1)
            self.results.put((position, outcome))
