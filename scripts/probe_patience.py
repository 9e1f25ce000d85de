"""How long `python -m client segment` takes to give up once its server is gone for good: a
120-frame stack (256x256 uint16), the server (`python -m segserve serve`, the 2D repository,
2 sliding-window stubs) SIGTERMed a while after the client started. docs/recovery.md, point 3.

    python -m scripts.probe_patience [--patience 15] [--stop-after 6 | --stop-after-frames 10]

Prints the seconds from the client's start to its exit and the frames the record lists done
and failed. Its own ports, token and files (a temporary directory); nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from segserve.launcher import REPO_ROOT, free_ports
from tests.conftest import copy_2d_repository
from tests.helpers import make_stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patience", default="15", help="the client's --patience (default: %(default)s)")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--stop-after", type=float, default=6.0, help="SIGTERM the server this many seconds in")
    stop.add_argument("--stop-after-frames", type=int, help="SIGTERM the server once the record shows this many done")
    return parser.parse_args(argv)


def wait_for_text(path: pathlib.Path, text: str, process: subprocess.Popen) -> None:
    while text not in path.read_text():
        if process.poll() is not None:
            raise SystemExit(f"server exited: {path.read_text()[-2000:]}")
        time.sleep(0.25)


def wait_until_stop(args: argparse.Namespace, record: pathlib.Path) -> None:
    if args.stop_after_frames is None:
        time.sleep(args.stop_after)
        return
    while True:
        try:
            if json.loads(record.read_text())["done"] >= args.stop_after_frames:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = pathlib.Path(tempfile.mkdtemp(prefix="probe-patience-"))
    repository = copy_2d_repository(work / "models", sliding_window_instances=2)
    np.save(work / "stack120.npy", make_stack(np.random.default_rng(0), 120, (256, 256)))
    grpc, http, metrics = free_ports(3)
    log = work / "serve.out"
    serve = subprocess.Popen([sys.executable, "-m", "segserve", "serve", "--model-repository", str(repository),
                              "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
                              "--token", "probe", "--token-file", str(work / "token"), "--log-file",
                              str(work / "triton.log"), "--drain-timeout", "0"],
                             stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        wait_for_text(log, "segserve ready", serve)
        command = [sys.executable, "-m", "client", "segment", str(work / "stack120.npy"), "--out", str(work / "o"),
                   "--url", f"127.0.0.1:{grpc}", "--patience", args.patience, "--no-progress"]
        started = time.monotonic()
        client = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "SEGSERVE_TOKEN": "probe"},
                                  stderr=(work / "client.err").open("w"))
        wait_until_stop(args, work / "o" / "stack120.segment.json")
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
        gone = time.monotonic() - started
        code = client.wait(3600)
        took = time.monotonic() - started
        record = json.loads((work / "o" / "stack120.segment.json").read_text())
        print(f"client exit {code} after {took:.1f} s (server gone {gone:.1f} s in, --patience {args.patience}); "
              f"record: {record['done']} done, {len(record['failed'])} failed")
        return 0
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)


if __name__ == "__main__":
    sys.exit(main())
