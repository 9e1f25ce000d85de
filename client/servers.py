"""Several servers behind one client: each request goes to the server with the fewest requests
in flight, a server that failed is skipped for a while, and per-server counts are kept.

A request that fails for a passing reason (server stopped, restarting, connection lost) is
tried at once on the next server; only when every server has failed does the caller's retry
policy (backoff) take over.
"""

from __future__ import annotations

import dataclasses
import threading
import time

# How long a server that failed is passed over while another one answers.
DEFAULT_COOLDOWN_S = 10.0


def split_urls(url: str | list[str] | tuple[str, ...] | None, default: str) -> list[str]:
    """``"a:8001,b:8001"`` or a list -> ``["a:8001", "b:8001"]``; None -> ``[default]``.

    Raises:
        ValueError: an empty entry or the same server twice.
    """
    if url is None:
        return [default]
    urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else url)]
    if not urls or any(not u for u in urls):
        raise ValueError(f"server URLs must be host:port, comma-separated, got {url!r}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"a server is listed twice in {url!r}")
    for entry in urls:
        check_host_port(entry)
    return urls


def check_host_port(entry: str) -> None:
    """Refuse what is not ``host:port`` (``[v6 address]:port`` too): a scheme, no port, a port
    that is not a number in 1..65535. tritonclient would take them and fail to connect, which
    reads as "is the server running?"."""
    if "://" in entry:
        raise ValueError(f"server URL {entry!r}: give host:port without a scheme, e.g. {entry.split('://', 1)[1]!r}")
    host, _, port = entry.rpartition(":")
    if not host or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise ValueError(f"server URL {entry!r}: expected host:port, e.g. localhost:8001 ([v6 address]:port)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"server URL {entry!r}: the port must be a number in 1..65535, got {port!r}")


@dataclasses.dataclass
class ServerCounts:
    """Per-server tally: requests answered, requests that failed there (tried elsewhere)."""

    url: str
    answered: int = 0
    failed: int = 0
    inflight: int = 0
    down_until: float = 0.0


class ServerPool:
    """Least-in-flight choice among servers, skipping those that failed in the last
    ``cooldown_s`` seconds (unless all did). Thread-safe."""

    def __init__(self, urls: list[str], cooldown_s: float = DEFAULT_COOLDOWN_S, clock=time.monotonic):
        self.servers = [ServerCounts(url) for url in urls]
        self.cooldown_s, self.clock = cooldown_s, clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.servers)

    def acquire(self, exclude: set[int] = frozenset()) -> int:
        """Index of the server for the next request (counted in flight until ``release``)."""
        with self._lock:
            now = self.clock()
            candidates = [i for i in range(len(self.servers)) if i not in exclude] or list(range(len(self.servers)))
            up = [i for i in candidates if self.servers[i].down_until <= now]
            if up:
                chosen = min(up, key=lambda i: (self.servers[i].inflight, self.servers[i].answered, i))
            else:  # all failed lately: the one whose pause ends first
                chosen = min(candidates, key=lambda i: self.servers[i].down_until)
            self.servers[chosen].inflight += 1
            return chosen

    def release(self, index: int, failed: bool) -> None:
        """Record the request's end; a failure pauses the server for ``cooldown_s``."""
        with self._lock:
            server = self.servers[index]
            server.inflight -= 1
            if failed:
                server.failed += 1
                server.down_until = self.clock() + self.cooldown_s
            else:
                server.answered += 1
                server.down_until = 0.0

    def summary(self) -> str:
        """``a:8001 40 answered, b:8001 22 answered (3 failed, tried elsewhere)``."""
        parts = []
        for server in self.servers:
            text = f"{server.url} {server.answered} answered"
            parts.append(text + (f" ({server.failed} failed, tried elsewhere)" if server.failed else ""))
        return ", ".join(parts)
