"""Export a MONAI segmentation network to ONNX and into the Triton model repository.

Examples:
    python -m export --spec training/checkpoints/unet2d_particles.json \\
        --checkpoint training/checkpoints/unet2d_particles.pt --name unet2d_particles
    python -m export --architecture BasicUNet \\
        --arguments '{"spatial_dims": 2, "in_channels": 1, "out_channels": 3}' \\
        --tile 128 128 --checkpoint my.pt --name my_basicunet

    python -m export --spec training/checkpoints/unet3d_organs.json \\
        --checkpoint training/checkpoints/unet3d_organs.pt --name unet3d_organs

A name the repository already holds is refused: always when it is not a network written by
this exporter (a pipeline step such as segment_2d, an ensemble, ...), and for such a network
unless ``--overwrite`` is given; the replacement then takes the old model's place whole, once
the new one is exported and checked (a failed export leaves the old one as it was).

Afterwards (server restarted) a 2D network serves through ``segment_2d`` and a 3D one through
``segment_3d``, with the request parameter ``network=<name>`` (client: ``--network <name>``),
or by default with ``--set-default``.

Ctrl-C (or SIGTERM) stops the export with exit code 130 (143), saying what it had written: the
model and the pipeline configs each change whole, in one move, or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import traceback

from export.network_export import (INTERRUPTS, SUPPORTED_ARCHITECTURES, ExportError, ExportSettings,
                                   default_network_configs, export_network, set_default_network)
from segproto import PIPELINES

DEFAULT_REPOSITORY = pathlib.Path(__file__).resolve().parent.parent / "model_repository"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=pathlib.Path, help="JSON with 'architecture', 'arguments', 'tile' (as written by training/)")
    parser.add_argument("--architecture", choices=SUPPORTED_ARCHITECTURES, help="MONAI network class (overrides --spec)")
    parser.add_argument("--arguments", type=json.loads, help="JSON object of the class's arguments (overrides --spec)")
    parser.add_argument("--tile", type=int, nargs="+", help="tile size, one number per spatial dim (overrides --spec)")
    parser.add_argument("--checkpoint", type=pathlib.Path, help="trained weights: a state dict, a training checkpoint holding one (Lightning, MONAI), or a TorchScript file; omit to export untrained weights")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--repository", type=pathlib.Path, default=DEFAULT_REPOSITORY, help="model repository (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the network of that name exported before (never another kind of model)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="largest tile batch (default: %(default)s)")
    parser.add_argument("--gpu-max-batch-size", type=int,
                        help="largest tile batch in the gpu and onnxruntime variants (default: 256 for 2D tiles, "
                             "--max-batch-size for 3D)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="bound on |onnxruntime - torch| (default: %(default)s)")
    parser.add_argument("--instances-per-gpu", type=int, default=2,
                        help="network instances per GPU in the gpu and onnxruntime config variants (default: %(default)s)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="the onnxruntime variant uses the TensorRT execution accelerator (FP16)")
    parser.add_argument("--set-default", action="store_true", help="make this the network segment_2d (2D) or segment_3d (3D) uses by default")
    parser.add_argument("--debug", action="store_true", help="print tracebacks")
    return parser.parse_args(argv)


def read_spec(path: pathlib.Path) -> dict:
    """The --spec JSON object; errors name the file."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ExportError(f"--spec {path}: {error}") from error
    if not isinstance(spec, dict):
        raise ExportError(f"--spec {path}: expected a JSON object, got {type(spec).__name__}")
    return spec


def settings_from_args(args: argparse.Namespace) -> ExportSettings:
    spec = read_spec(args.spec) if args.spec else {}
    architecture = args.architecture or spec.get("architecture")
    arguments = args.arguments if args.arguments is not None else spec.get("arguments")
    tile = args.tile or spec.get("tile")
    missing = [flag for flag, value in (("--architecture", architecture), ("--arguments", arguments), ("--tile", tile)) if value is None]
    if missing:
        raise ExportError(f"missing {', '.join(missing)} (give them or a --spec file)")
    return ExportSettings(architecture, arguments, args.checkpoint, tuple(tile), args.name,
                          max_batch_size=args.max_batch_size, gpu_max_batch_size=args.gpu_max_batch_size,
                          tolerance=args.tolerance, instances_per_gpu=args.instances_per_gpu, tensorrt=args.tensorrt)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def identity(path: pathlib.Path) -> tuple[int, int] | None:
    """Which file or directory is at ``path`` (None: none): an export or --set-default moves a
    new one there, so it changes exactly when they wrote it."""
    try:
        found = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def interrupted_message(args: argparse.Namespace, watched: dict[pathlib.Path, tuple | None], model_dir: pathlib.Path | None,
                        pipeline: str | None) -> str:
    """What an interrupted export had written, read from the repository itself."""
    changed = {path for path, before in watched.items() if identity(path) != before}
    if not changed:
        return "export: interrupted; nothing was written to the repository"
    done = [f"{model_dir} was written (complete)"] if model_dir in changed else []
    if args.set_default:
        done.append(f"{pipeline} uses {args.name} by default" if changed - {model_dir} else f"{pipeline}'s default network is unchanged")
    return f"export: interrupted; {'; '.join(done)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT is set too: a shell starts background jobs with it ignored, and Python keeps that.
    previous = {signum: signal.signal(signum, raise_keyboard_interrupt) for signum in INTERRUPTS}
    watched, model_dir, pipeline = {}, None, None  # what an interrupt is reported against
    try:
        settings = settings_from_args(args)
        # Up front, before the minutes an export can take (export_network checks the name first).
        pipeline = PIPELINES[len(settings.tile)]
        if args.set_default and not (args.repository / pipeline / "config.pbtxt").is_file():
            raise ExportError(f"--set-default: {args.repository / pipeline} has no config.pbtxt (no {pipeline} pipeline to set)")
        if args.checkpoint is not None and not args.checkpoint.is_file():
            raise ExportError(f"checkpoint {args.checkpoint} is not a file")
        model_dir = args.repository / settings.name
        configs = default_network_configs(args.repository / pipeline) if args.set_default else []
        watched = {path: identity(path) for path in (model_dir, *configs)}
        export_network(settings, args.repository, overwrite=args.overwrite)
        if args.set_default:
            set_default_network(args.repository, settings.name, pipeline=pipeline)
            print(f"{pipeline} now uses {settings.name} by default (restart the server)")
    except Exception as error:  # one-line errors; --debug for the traceback
        if args.debug:
            traceback.print_exc()
        print(f"export: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        if args.debug:
            traceback.print_exc()
        print(interrupted_message(args, watched, model_dir, pipeline), file=sys.stderr)
        signum = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else signal.SIGINT
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
