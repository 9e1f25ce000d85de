"""Segment frames with the segmentation server.

    python -m client segment frame.tif [more frames...] --out results/
    python -m client segment frame.npy --probabilities --overlap 0.5 --url 10.0.0.5:8001

For each frame ``NAME.ext`` it writes into --out: ``NAME_mask.tif`` (uint8 class per pixel),
``NAME_overlay.png`` (mask over the frame), and on request ``NAME_probabilities.tif``
(float32 [K, H, W]) and ``NAME_contour.tif``. Frames: TIFF, PNG or NPY; [H, W] or [C, H, W];
float32, uint8, uint16 or int16 pixels are sent as they are (the server converts them).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

from tqdm import tqdm

from client.api import SegmentationClient, SegmentationError
from client.frames import overlay, read_frame, write_array


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment frames and write masks", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("frames", nargs="+", type=pathlib.Path, help="frame files (.tif, .tiff, .png, .npy)")
    segment.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"), help="output directory (default: %(default)s)")
    segment.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address host:port (default: %(default)s)")
    segment.add_argument("--model", default="segment_2d", help="pipeline ensemble (default: %(default)s)")
    segment.add_argument("--network", help="network model to run (default: the server's default network)")
    segment.add_argument("--overlap", type=float, help="tile overlap fraction in [0, 1) (server default 0.25)")
    segment.add_argument("--blend", choices=("gaussian", "constant"), help="tile blending (server default gaussian)")
    segment.add_argument("--sw-batch-size", type=int, help="tiles per network batch (server default 8)")
    segment.add_argument("--intensity-min", type=float, help="fixed intensity mapped to 0 (with --intensity-max)")
    segment.add_argument("--intensity-max", type=float,
                         help="fixed intensity mapped to 1 (default: each frame's 1st..99th percentile)")
    segment.add_argument("--keep-largest", action="store_true", help="keep only the largest object of each class")
    segment.add_argument("--probabilities", action="store_true", help="also write NAME_probabilities.tif [K, H, W]")
    segment.add_argument("--contour", action="store_true", help="also write NAME_contour.tif (object borders)")
    segment.add_argument("--format", choices=("tif", "npy"), default="tif", help="array output format (default: %(default)s)")
    segment.add_argument("--no-overlay", action="store_true", help="skip the PNG overlay")
    segment.add_argument("--overlay-max-size", type=int, default=2048, help="longest overlay side in pixels (default: %(default)s)")
    segment.add_argument("--timeout", type=float, help="seconds before a request is abandoned (default: none)")
    segment.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return parser.parse_args(argv)


def segment_files(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with SegmentationClient(args.url, args.model, args.network, args.timeout) as client:
        if not client.is_ready():
            raise SegmentationError(f"model {args.model!r} is not ready at {args.url} (is the server running? `make serve`)")
        progress = tqdm(args.frames, unit="frame", disable=len(args.frames) < 2)
        for path in progress:
            try:
                written = segment_one(client, path, args)
                progress.write(f"{path} -> {', '.join(str(p) for p in written)}")
            except (OSError, ValueError, SegmentationError) as error:
                failures += 1
                progress.write(f"client: error: {path}: {error}")
                if args.debug:
                    traceback.print_exc()
    if failures:
        print(f"client: {failures} of {len(args.frames)} frame(s) failed", file=sys.stderr)
    return 1 if failures else 0


def segment_one(client: SegmentationClient, path: pathlib.Path, args: argparse.Namespace) -> list[pathlib.Path]:
    frame = read_frame(path)
    start = time.perf_counter()
    result = client.segment(
        frame, probabilities=args.probabilities, contour=args.contour, keep_largest=args.keep_largest or None,
        overlap=args.overlap, blend=args.blend, sw_batch_size=args.sw_batch_size,
        intensity_min=args.intensity_min, intensity_max=args.intensity_max)
    elapsed = time.perf_counter() - start
    stem, suffix = args.out / path.stem, f".{args.format}"
    written = [write_array(stem.with_name(f"{path.stem}_mask{suffix}"), result.mask)]
    if result.probabilities is not None:
        written.append(write_array(stem.with_name(f"{path.stem}_probabilities{suffix}"), result.probabilities))
    if result.contour is not None:
        written.append(write_array(stem.with_name(f"{path.stem}_contour{suffix}"), result.contour))
    if not args.no_overlay:
        overlay_path = stem.with_name(f"{path.stem}_overlay.png")
        overlay(frame, result.mask, max_size=args.overlay_max_size).save(overlay_path)
        written.append(overlay_path)
    written.append(f"({frame.shape[-1]}x{frame.shape[-2]} {frame.dtype}, {elapsed:.2f} s)")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return segment_files(args)
    except (OSError, ValueError, SegmentationError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"client: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("client: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
