"""``python -m segserve serve``: run the segmentation server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import threading
import traceback

from segserve.launcher import DEFAULT_REPOSITORY, ServerConfig, ServerError, TritonServer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segserve", description="Segmentation server (Triton 2.51).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start Triton on the model repository and wait for Ctrl-C / SIGTERM")
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
    serve.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness (default: %(default)s)")
    serve.add_argument("--debug", action="store_true", help="print tracebacks")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    config = ServerConfig(args.model_repository, args.host, args.http_port, args.grpc_port, args.metrics_port, args.log_verbose,
                          allocator=args.allocator)
    server = TritonServer(config, log_path=args.log_file)
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    server.start(args.startup_timeout)
    print(f"segserve ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {config.host}:{config.metrics_port}", flush=True)
    print("Ctrl-C stops the server.", flush=True)
    while not stop_requested.wait(0.5):
        if server.process.poll() is not None:
            print(f"segserve: error: tritonserver exited with code {server.process.returncode}", file=sys.stderr)
            server.stop()
            return 1
    print("stopping...", flush=True)
    code = server.stop()
    print(f"stopped (tritonserver exit code {code})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except ServerError as error:
        if args.debug:
            traceback.print_exc()
        print(f"segserve: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
