"""``python -m segserve serve``: run the segmentation server until Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import signal
import sys
import threading
import time
import traceback

from segproto import (TOKEN_ENV, TOKEN_HEADER, TOKEN_LETTERS, header_name, is_token, new_token, token_in_file,
                      write_token_file)
from segserve.launcher import (DEFAULT_REPOSITORY, STUCK_STOP_S, ServerConfig, ServerError, StartCancelledError,
                               StuckRequestsError, TritonServer, token_is_served)


# A server whose stubs keep dying is not fixed by restarting it: give up after this many restarts.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segserve", description="Segmentation server (Triton 2.51).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start Triton on the model repository and serve until Ctrl-C / SIGTERM / SIGHUP")
    serve.add_argument("--model-repository", type=pathlib.Path, default=DEFAULT_REPOSITORY, help="default: %(default)s")
    serve.add_argument("--host", default="127.0.0.1",
                       help="bind address of every endpoint (default: %(default)s, local only; 0.0.0.0 exposes it)")
    serve.add_argument("--http-port", type=int, default=8000, help="default: %(default)s (0 picks a free port)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="default: %(default)s (0 picks a free port)")
    serve.add_argument("--metrics-port", type=int, default=8002, help="default: %(default)s (0 picks a free port)")
    serve.add_argument("--log-file", type=pathlib.Path, help="write the server log here (default: this terminal)")
    serve.add_argument("--log-verbose", type=int, default=0, help="Triton log verbosity (default: %(default)s)")
    serve.add_argument("--allocator", choices=("auto", "tcmalloc", "jemalloc", "glibc"), default="auto",
                       help="memory allocator of the server processes; auto = tcmalloc when installed (default: %(default)s)")
    serve.add_argument("--token", help="token of the restricted endpoints (shared memory, model config and repository, "
                       "trace, logging); default: $SEGSERVE_TOKEN, else the token file's while a running server uses "
                       "it (servers on one machine share it), else a new random one")
    serve.add_argument("--token-file", type=pathlib.Path,
                       help="where to write the token for local clients, owner-readable only (default: ~/.config/segserve/token)")
    serve.add_argument("--drain-timeout", type=float, default=60.0,
                       help="on Ctrl-C / SIGTERM / SIGHUP, seconds to let requests in flight finish before stopping; a second Ctrl-C stops at once (default: %(default)s)")
    serve.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness (default: %(default)s)")
    serve.add_argument("--debug", action="store_true", help="print tracebacks")
    args = parser.parse_args(argv)
    refuse_bad_settings(serve, args)
    return args


def refuse_bad_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 with one line for settings Triton would refuse with its usage text or Python
    with a traceback: a port out of range, one port for two endpoints, a timeout <= 0, a token
    Triton's restriction rule cannot hold."""
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    for option, port in ports.items():
        if not 0 <= port <= 65535:
            parser.error(f"{option} must be a port, 0 to 65535 (0 picks a free one), got {port}")
    given = [(option, port) for option, port in ports.items() if port]
    for (first, port), (second, other) in itertools.combinations(given, 2):
        if port == other:
            parser.error(f"{first} and {second} are both {port}: each endpoint needs its own port")
    if args.startup_timeout <= 0:
        parser.error(f"--startup-timeout must be > 0 seconds, got {args.startup_timeout}")
    if args.drain_timeout < 0:
        parser.error(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if args.token is not None and not is_token(args.token):
        parser.error(f"--token may hold only {TOKEN_LETTERS}" + (", and not be empty" if not args.token else ""))
    if args.token is None and os.environ.get(TOKEN_ENV, "").strip() and not is_token(os.environ[TOKEN_ENV].strip()):
        parser.error(f"${TOKEN_ENV} may hold only {TOKEN_LETTERS}")


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed), all alike: the first asks for a
    stop, which calls off a start in progress or drains a running server; the second cuts the
    drain short. ``signum`` is the first one's number."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.hurry = threading.Event()
        self.signum: int | None = None

    def install(self) -> None:
        for signum in self.HANDLED:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # under nohup: the user asked for the server to outlive the terminal
            signal.signal(signum, self._received)

    def _received(self, signum: int, _frame) -> None:
        if self.stop_requested.is_set():
            if not self.hurry.is_set():
                # os.write: print() is not safe in a handler that may interrupt another print().
                os.write(sys.stderr.fileno(), b"segserve: second signal: stopping now, requests in flight are abandoned\n")
            self.hurry.set()
        else:
            self.signum = signum
            self.stop_requested.set()


def serve(args: argparse.Namespace) -> int:
    # The token file's token, while a running server uses it, before a new one: a second server
    # on this machine then shares it, where it replaced the first one's, whose clients reading
    # the file were refused from then on. With none running, a start makes a new one.
    in_file = token_in_file(args.token_file)
    shared = in_file if in_file and token_is_served(in_file) else None
    token = args.token or os.environ.get(TOKEN_ENV, "").strip() or shared or new_token()  # a secret's newline dropped
    config = ServerConfig(args.model_repository, args.host, args.http_port, args.grpc_port, args.metrics_port, args.log_verbose,
                          allocator=args.allocator, token=token)
    signals = StopSignals()
    server = TritonServer(config, log_path=args.log_file, start_cancelled=signals.stop_requested, drain_cancelled=signals.hurry)
    signals.install()
    try:
        return run_until_stopped(server, signals, args)
    except StartCancelledError as error:
        server.stop()
        print(f"segserve: {error} ({signal.Signals(signals.signum).name})", file=sys.stderr, flush=True)
        return 128 + signals.signum


def run_until_stopped(server: TritonServer, signals: StopSignals, args: argparse.Namespace) -> int:
    """Start, keep the server healthy (``recover``) until a stop signal, then drain and stop.
    Returns the exit code of the command.

    Raises:
        StartCancelledError: a signal came while a (re)start waited for readiness.
    """
    config = server.config
    # Written before the start (a client that sees readiness finds the token), once the start
    # is known not to be refused (a port in use, a mistyped repository): a running server's
    # token stays.
    server.prepare()
    if signals.stop_requested.is_set():
        raise StartCancelledError("stopped before it was started")
    token_file = write_token_file(config.token, args.token_file)
    server.start(args.startup_timeout)
    warn_networks_not_loaded(server)
    print(f"segserve ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {config.host}:{config.metrics_port}", flush=True)
    print(f"restricted endpoints ({', '.join(config.restricted_endpoints)}) need the header {TOKEN_HEADER} (gRPC: {header_name('grpc')}); "
          f"token in {token_file}", flush=True)
    print("Ctrl-C stops the server.", flush=True)
    restarts: list[float] = []
    while not signals.stop_requested.wait(0.5):
        problem = server.health_problem()
        if problem is None:
            continue
        restarts = [t for t in restarts if time.monotonic() - t < RESTART_WINDOW_S] + [time.monotonic()]
        if len(restarts) > MAX_RESTARTS:
            print(f"segserve: error: {problem}; {MAX_RESTARTS} restarts in {RESTART_WINDOW_S / 60:.0f} min, giving up",
                  file=sys.stderr, flush=True)
            server.stop()
            return 1
        recover(server, problem, args.startup_timeout)
    print(f"stopping: letting requests in flight finish (at most {args.drain_timeout:.0f} s; "
          "a second Ctrl-C stops at once)...", flush=True)
    code = server.stop(drain_s=args.drain_timeout)
    print(f"stopped (tritonserver exit code {code})", flush=True)
    if signals.hurry.is_set():
        return 128 + signals.signum
    return 0 if code == 0 else 1


def recover(server: TritonServer, problem: str, timeout_s: float) -> None:
    """Reload only the models whose stubs died; restart the whole server when that fails or
    the server itself is gone. Clients wait for readiness meanwhile (their patience)."""
    broken = server.broken_models() if server.process is not None and server.process.poll() is None else []
    stop_timeout_s = 40.0
    if broken:
        print(f"segserve: {problem}; reloading {', '.join(broken)} (clients wait and retry)", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            server.reload_models(broken, timeout_s)
            if server.start_cancelled.is_set():
                return  # a stop was asked for meanwhile: it drains and stops the server
        except ServerError as error:
            if server.start_cancelled.is_set():
                return
            print(f"segserve: {error}; restarting the server", file=sys.stderr, flush=True)
            if isinstance(error, StuckRequestsError):
                stop_timeout_s = STUCK_STOP_S  # a graceful stop would wait its whole timeout for them
        else:
            print(f"segserve ready again: reloaded {', '.join(broken)} in {time.monotonic() - start:.1f} s", flush=True)
            return
    else:
        print(f"segserve: {problem}; restarting the server (clients wait and retry)", file=sys.stderr, flush=True)
    server.restart(timeout_s, stop_timeout_s=stop_timeout_s)
    warn_networks_not_loaded(server)
    print(f"segserve ready again: gRPC {server.grpc_url}  HTTP {server.http_url}", flush=True)


def warn_networks_not_loaded(server: TritonServer) -> None:
    """Name each network that failed to load, and why: the others serve without it."""
    defaults = server.default_networks() if server.networks_not_loaded else {}
    for name, reason in server.networks_not_loaded.items():
        pipelines = [pipeline for pipeline, network in defaults.items() if network == name]
        default = f"; it is the default network of {', '.join(pipelines)}: requests naming no network fail" if pipelines else ""
        print(f"segserve: warning: network {name} failed to load and is not served (requests for it fail; the others "
              f"serve{default}): {reason}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except (ServerError, OSError) as error:  # OSError: the token file
        if args.debug:
            traceback.print_exc()
        print(f"segserve: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
