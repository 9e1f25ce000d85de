"""``make demo``: start the server, segment the sample frames with the CLI, score the masks
against the samples' ground truth, stop the server.

    python -m scripts.demo [--samples samples] [--out out/demo] [--url host:8001]

With ``--url`` it uses a running server instead (the container demo: docker/compose.yaml).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import tifffile

import client.__main__ as client_cli
from segserve.launcher import ServerConfig, TritonServer
from training.samples import write_samples
from training.synthetic import CLASS_NAMES


def dice_scores(mask: np.ndarray, truth: np.ndarray) -> str:
    scores = []
    for index, name in enumerate(CLASS_NAMES[1:], start=1):
        overlap = np.logical_and(mask == index, truth == index).sum()
        scores.append(f"{name} {2 * overlap / max((mask == index).sum() + (truth == index).sum(), 1):.3f}")
    return "Dice " + ", ".join(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=pathlib.Path, default=pathlib.Path("samples"), help="default: %(default)s")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/demo"), help="default: %(default)s")
    parser.add_argument("--url", help="gRPC address of a running server (default: start one here)")
    args = parser.parse_args(argv)
    frames = write_samples(args.samples)
    args.out.mkdir(parents=True, exist_ok=True)
    segment = ["segment", *map(str, frames), "--out", str(args.out), "--probabilities"]
    if args.url:
        code = client_cli.main([*segment, "--url", args.url])
    else:
        log = args.out / "server.log"
        print(f"starting the server (log: {log}) ...", flush=True)
        with TritonServer(ServerConfig(http_port=0, grpc_port=0, metrics_port=0), log_path=log) as server:
            print(f"server ready on {server.grpc_url}", flush=True)
            code = client_cli.main([*segment, "--url", server.grpc_url, "--token", server.config.token])
    for frame in frames:
        mask_path = args.out / f"{frame.stem}_mask.tif"
        if mask_path.exists():
            truth = tifffile.imread(frame.with_name(f"{frame.stem}_truth.tif"))
            print(f"{frame.name}: {dice_scores(tifffile.imread(mask_path), truth)}")
    print(f"outputs in {args.out}/ (masks *_mask.tif, overlays *_overlay.png)")
    return code


if __name__ == "__main__":
    sys.exit(main())
