"""Kill-to-serving time: `python -m segserve serve` on a model repository, one Python-backend
stub SIGKILLed, seconds until a frame is segmented again (the launcher reloads the broken model,
or restarts the server when requests were inside the dead stub).

    python -m scripts.recovery_time [--model-repository DIR] [--victim segment_2d]
                                    [--cpu-hogs 2] [--repeats 3] [--kill idle|probed|in-flight]

``--cpu-hogs N`` runs N busy loops beside it (a busy machine), stopped at the end.
``--kill``: ``idle`` (default) kills a stub with nothing in flight (the launcher reloads the
model alone); ``probed`` also sends 8 requests at once right after the kill, before the
launcher's next look, so one meets the dead stub (Triton 2.51 then keeps the old instance:
restart); ``in-flight`` kills it while a stream of 1024x1024 frames (4 in flight) is in the
pipeline, as on a busy service (requests stuck inside: restart).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from client import SegmentationClient, SegmentationError
from segserve.launcher import DEFAULT_REPOSITORY, REPO_ROOT, free_ports, python_backend_stubs


def wait_for(condition, timeout_s: float, what: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if server.poll() is not None:
            raise SystemExit(f"recovery_time: the server exited ({server.returncode}) before {what}")
        time.sleep(0.1)
    raise SystemExit(f"recovery_time: {what} not reached in {timeout_s:.0f} s")


def serving(url: str, frame: np.ndarray) -> bool:
    try:
        with SegmentationClient(url) as client:
            client.segment(frame)
        return True
    except SegmentationError:
        return False


def probe(clients: list[SegmentationClient], frame: np.ndarray) -> None:
    """One attempt per client at once (no retries); prints how many failed and why."""
    errors: list[str] = []

    def attempt(client: SegmentationClient) -> None:
        try:
            client.segment(frame)
        except SegmentationError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=attempt, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"  probes: {len(errors)} of {len(clients)} failed {sorted(set(e[:90] for e in errors))}", flush=True)


def start_stream(url: str, frames: int) -> threading.Thread:
    """A thread streaming ``frames`` 1024x1024 frames, 4 in flight, with default patience."""
    stack = np.random.default_rng(1).random((frames, 1024, 1024), dtype=np.float32)

    def stream() -> None:
        with SegmentationClient(url) as client:
            failed = [(o.index, o.attempts, o.error) for o in client.segment_stream(list(stack), inflight=4) if not o.ok]
        print(f"  the stream of {frames} frames: {frames - len(failed)} done, {len(failed)} failed {failed}", flush=True)

    thread = threading.Thread(target=stream)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=pathlib.Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--victim", default="segment_2d", help="model whose stub is killed (default: %(default)s)")
    parser.add_argument("--cpu-hogs", type=int, default=0, help="busy loops running beside the server (default: 0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill", choices=("idle", "probed", "in-flight"), default="idle",
                        help="what the server is doing at the kill (default: %(default)s)")
    args = parser.parse_args(argv)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="recovery-"))
    grpc_port, http_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "segserve", "serve", "--model-repository", str(args.model_repository),
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
               "--token", "recovery-time", "--token-file", str(scratch / "token"), "--log-file", str(scratch / "triton.log")]
    output = open(scratch / "serve.out", "w")
    hogs: list[subprocess.Popen] = []
    server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def log_text() -> str:
        return (scratch / "serve.out").read_text()

    url, frame = f"127.0.0.1:{grpc_port}", np.random.default_rng(0).random((256, 256), dtype=np.float32)
    try:
        start = time.monotonic()
        wait_for(lambda: "segserve ready" in log_text(), 900, "ready", server)
        print(f"start to ready: {time.monotonic() - start:.1f} s", flush=True)
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.cpu_hogs)]
        print(f"cpu hogs: {[h.pid for h in hogs]}", flush=True)
        for repeat in range(args.repeats):
            wait_for(lambda: serving(url, frame), 600, "serving", server)
            victim = next(pid for pid, model in python_backend_stubs(server.pid).items() if f"/{args.victim}/" in model)
            if args.kill == "in-flight":
                busy = start_stream(url, frames=12)
                time.sleep(3)  # the stream's frames are inside every instance
            elif args.kill == "probed":
                probes = [SegmentationClient(url) for _ in range(8)]
                for client in probes:  # connected and configured: they reach the server at once
                    client.segment(frame)
            recoveries = log_text().count("segserve ready again")
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            if args.kill == "probed":
                probe(probes, frame)
                for client in probes:
                    client.close()
            else:
                time.sleep(0.5)  # the supervisor looks every 0.5 s; a request before that meets the dead stub
            wait_for(lambda: serving(url, frame), 900, "serving again", server)
            serving_s = time.monotonic() - killed
            # A reload serves at once; a restart follows it when requests reached the dead stub.
            wait_for(lambda: log_text().count("segserve ready again") > recoveries, 900, "recovered", server)
            wait_for(lambda: serving(url, frame), 900, "serving after the recovery", server)
            print(f"kill #{repeat + 1}: first frame served after {serving_s:.1f} s, the launcher's recovery done and "
                  f"serving after {time.monotonic() - killed:.1f} s", flush=True)
            if args.kill == "in-flight":
                busy.join()
        print(log_text(), flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
