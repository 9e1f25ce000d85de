"""Peak resident memory of ``python -m client segment`` over an NPY stack, sampled from
/proc every 0.2 s: VmRSS, and its anonymous and file-mapped parts.

    python -m scripts.client_memory --url 127.0.0.1:8001 [--frames 100 --size 1024] [-- --probabilities]

Arguments after ``--`` go to ``segment``. The stack (float32 noise) and the outputs are written
under ``--work`` (default: a temporary directory, removed after).
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def status_mib(pid: int) -> dict[str, float]:
    """The ``FIELDS`` of /proc/PID/status in MiB (empty once the process is gone)."""
    try:
        lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines if line.split(":")[0] in FIELDS}


def write_stack(path: pathlib.Path, frames: int, size: int) -> None:
    stack = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(frames, size, size))
    rng = np.random.default_rng(0)
    for i in range(frames):
        stack[i] = rng.random((size, size), dtype=np.float32)
    stack.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, segment_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--work", type=pathlib.Path)
    args = parser.parse_args(ours)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or pathlib.Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        write_stack(work / "stack.npy", args.frames, args.size)
        command = [sys.executable, "-m", "client", "segment", str(work / "stack.npy"), "--out", str(work / "out"),
                   "--url", args.url, "--no-progress", "--overwrite", *segment_args]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        peak = dict.fromkeys(FIELDS, 0.0)
        while process.poll() is None:
            for field, mib in status_mib(process.pid).items():
                peak[field] = max(peak[field], mib)
            time.sleep(0.2)
        summary = [line for line in process.stderr.read().splitlines() if "frame(s) in" in line]
    shown = ["..." if previous == "--token" else arg for previous, arg in zip(["", *segment_args], segment_args)]
    print(f"{args.frames} frames of {args.size}² float32 ({args.frames * args.size**2 * 4 / 2**20:.0f} MiB), "
          f"segment {' '.join(shown)}: exit {process.returncode}; peak "
          + ", ".join(f"{field} {peak[field]:.0f} MiB" for field in FIELDS))
    print("\n".join(summary))
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
