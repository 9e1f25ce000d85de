"""Segment 3D volumes with the ``segment_3d`` pipeline.

    python -m client segment-volume scan.nii.gz --out results/
    python -m client segment-volume ct.tif tomo.h5:/entry/data --out results/ --keep-largest
    python -m client segment-volume big.npy --chunk-shape 128 0 0 --inflight 4
    python -m client segment-volume scans/*.nii.gz --out results/ --resume   # after Ctrl-C: skip the written ones

Inputs: NIfTI (.nii, .nii.gz), TIFF stacks [Z, Y, X], a directory of TIFF slices (one 2D image
per slice, in natural order: z_2 before z_10; written as DIRNAME_mask.tif), NPY and HDF5 datasets (FILE.h5:/path);
float32, uint8, uint16 and int16 (CT Hounsfield units) travel as stored. Outputs in --out,
in the input's kind of file: NAME_mask.nii.gz (uint8, same affine and header as the scan),
NAME_mask.tif or NAME_mask.npy, or NAME_segmentation.h5 for HDF5 (a group per dataset);
NAME_probabilities and NAME_contour on request. Volumes that would write one output are refused.
Each volume's outputs are written whole once it is done (under a temporary name, then renamed),
with NAME.segment-volume.json beside them saying what they were made from (the input's path,
the network and the options), so --resume skips the volumes whose requested outputs are there,
made from the same input with the same settings, and segments the others again. A file at an
output's name that no such record names (one of your own) is not replaced without --overwrite.

A volume above --max-chunk-voxels (default 512x512x256) is sent as overlapping chunks shaped
to send the fewest voxels in all, --inflight at a time, cut on the network's tile grid so that the stitched
result equals one whole-volume request; no chunk exceeds the limit (one below the smallest
chunk the tile allows is refused). The intensity range (default: 1st..99th percentile)
is then taken over the whole volume, and --keep-largest runs on the stitched mask.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from tqdm import tqdm

from client.api import SegmentationClient, SegmentationError
from client.chunks import DEFAULT_MAX_CHUNK_VOXELS
from client.cli_options import connected_client, segment_options
from client.stacks import check_distinct_targets, refuse_files_not_written_here, stack_outputs
from client.volume_files import (check_output_file_readable, earlier_outputs_not_made, files_not_ours, files_of_records,
                                 frames_record, output_targets, outputs_written, read_volume, record_differences,
                                 volume_location, write_record, write_volume_outputs)
from client.volumes import ChunkSettings


def add_chunk_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-chunk-voxels", type=int, default=DEFAULT_MAX_CHUNK_VOXELS,
                        help="largest request in voxels; bigger volumes go in chunks (default: %(default)s)")
    parser.add_argument("--chunk-shape", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="largest chunk extent per axis, 0 for the whole axis (default: from --max-chunk-voxels, "
                             "the chunk shape that sends the fewest voxels)")
    parser.add_argument("--chunk-overlap", type=int, default=0,
                        help="voxels sent twice at each seam, at least (default: what the tile grid needs, about one tile)")


def check_chunk_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad chunk options naming the flag, before any volume is read (each volume was
    read, then refused in the API's words)."""
    if args.max_chunk_voxels < 1:
        parser.error(f"--max-chunk-voxels must be >= 1, got {args.max_chunk_voxels}")
    if args.chunk_shape and min(args.chunk_shape) < 0:
        parser.error(f"--chunk-shape extents must be >= 0 (0: the whole axis), got {' '.join(map(str, args.chunk_shape))}")
    if args.chunk_overlap < 0:
        parser.error(f"--chunk-overlap must be >= 0, got {args.chunk_overlap}")


def chunk_settings(args: argparse.Namespace) -> ChunkSettings:
    return ChunkSettings(tuple(args.chunk_shape) if args.chunk_shape else None, args.max_chunk_voxels, args.chunk_overlap)


def segment_volumes(args: argparse.Namespace) -> int:
    """Segment each volume of ``args.volumes`` into ``args.out``; 1 if any failed."""
    check_distinct_volume_outputs(args)
    failed = []
    with connected_client(args) as (client, info):  # an absent server leaves no --out behind
        check_writable(args.out)
        if info.spatial_dims != 3:
            raise SegmentationError(f"network {info.name!r} of {args.model!r} is not 3D; "
                                    "use `python -m client segment` for frames")
        settings = run_settings(args, info.name)
        todo = [argument for argument in args.volumes if not (args.resume and already_done(argument, args, settings))]
        if not args.overwrite:
            refuse_files_not_ours(todo, args)
        if len(todo) < len(args.volumes):
            print(f"client: {len(args.volumes) - len(todo)} volume(s) skipped: their outputs are in {args.out} "
                  "(--resume)", file=sys.stderr)
        for number, argument in enumerate(todo, 1):
            try:
                segment_one(client, argument, args, settings, f"{number}/{len(todo)} " if len(todo) > 1 else "")
            except (OSError, ValueError, SegmentationError) as error:
                failed.append(naming(argument, error))
                print(f"client: error: {failed[-1]}", file=sys.stderr)
    if failed and len(args.volumes) > 1:
        print("client: failed volumes:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


def refuse_files_not_ours(arguments: list[str], args: argparse.Namespace) -> None:
    """Refuse, before any volume is read, to replace files at the outputs' names that this
    tool did not write (a ground-truth ``a_mask.nii.gz`` in --out was replaced without a word).

    Raises:
        ValueError: naming them, and what to do.
    """
    ours = files_of_records(args.out)
    refuse_files_not_written_here(
        [path for argument in arguments for path in files_not_ours(argument, requested_outputs(args), args.out, ours)],
        "no record there says segment-volume wrote it")


def check_writable(out: pathlib.Path) -> None:
    """Make ``out`` and write a file there, before any volume is read: each volume was read and
    segmented, then failed to be written (a batch's whole compute for nothing).

    Raises:
        OSError: ``out`` cannot be made or written, naming it.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise OSError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def run_settings(args: argparse.Namespace, network: str) -> dict:
    """What a volume's outputs depend on, recorded beside them (``--resume`` compares it; the
    chunking is left out: chunked results equal whole-volume ones)."""
    return {"model": args.model, "network": network, "outputs": requested_outputs(args), **segment_options(args)}


def already_done(argument: str, args: argparse.Namespace, settings: dict) -> bool:
    """With --resume: whether the volume's outputs are in --out, made from this input with
    these settings (the outputs asked for among those made). Outputs made otherwise (another
    scan of the same name, another overlap) are segmented again, which replaces them; outputs
    without a record (an earlier version's) are skipped as that version did. The user is told."""
    if not outputs_written(argument, requested_outputs(args), args.out):
        return False
    differences = record_differences(argument, args.out, settings)
    if differences is None and (by_frames := frames_record(argument, args.out)) is not None:
        print(f"client: {argument}: its outputs in {args.out} were made frame by frame by `segment` ({by_frames.name}); "
              "segmenting it as a volume, replacing them", file=sys.stderr)
        return False
    if differences is None:  # outputs of a version that kept no record: taken as done, as it did
        print(f"client: {argument}: its outputs in {args.out} have no record of what they were made from (an "
              "earlier version's); skipped, as then: rerun with --overwrite instead of --resume to replace them", file=sys.stderr)
        return True
    if differences:
        print(f"client: {argument}: segmenting it again, replacing its outputs in {args.out} "
              f"({'; '.join(differences)})", file=sys.stderr)
    return not differences


def naming(argument: str, error: BaseException) -> str:
    """The error after the volume's argument, once (readers' errors start with the file's
    path, or its name)."""
    message, (path, dataset) = str(error), volume_location(argument)
    if message.startswith((f"{argument}: ", f"{path}: ")):
        return message
    for label in (f"{path.name}:{dataset}: ", f"{path.name}: "):  # a volume's label (HDF5: with its dataset)
        message = message.removeprefix(label)
    return f"{argument}: {message}"


def check_channels(volume, info) -> None:
    """Refuse, before sending it, a volume of more (or fewer) channels than the network takes,
    saying where they came from: a 4D NIfTI's 4th axis (time points, or MONAI's channels last),
    the first axis of a 4D array."""
    channels = volume.image.shape[0]
    if channels == info.in_channels:
        return
    where = ("its 4th axis (NIfTI: time points, or channels)" if volume.kind == "nifti"
             else f"the first axis of shape {list(volume.image.shape)}")
    if info.in_channels != 1:
        advice = ""
    elif volume.kind == "nifti":
        advice = "; segment one at a time: split them, e.g. with nibabel.funcs.four_to_three"
    else:  # nibabel's advice for a TIFF's colour or an array's first axis was none
        advice = "; segment one at a time: save each channel as a volume of its own (colour slices: make them grey first)"
    raise ValueError(f"{volume.label}: {channels} volumes along {where}; network {info.name!r} takes "
                     f"{info.in_channels} channel(s){advice}")


def requested_outputs(args: argparse.Namespace) -> list[str]:
    return stack_outputs(args.probabilities, args.contour)


def check_distinct_volume_outputs(args: argparse.Namespace) -> None:
    """Refuse, before anything is read or sent, a volume given twice and volumes that would
    write the same output (``a/ct.npy`` and ``b/ct.npy``; one result would be lost). Arguments
    naming no volume file are left to fail on their own."""
    targets, inputs, seen = [], [], set()
    for argument in args.volumes:
        try:
            located = output_targets(argument, requested_outputs(args), args.out)
        except ValueError:
            continue
        path = volume_location(argument)[0].resolve()
        identity = (path, located[0].place)
        if identity in seen:
            raise ValueError(f"{argument} is given twice")
        seen.add(identity)
        targets += located
        inputs.append(path)
    check_distinct_targets(targets, inputs)


def segment_one(client: SegmentationClient, argument: str, args: argparse.Namespace, settings: dict,
                position: str = "") -> None:
    """``position``: where the volume is in the batch ("2/5 "), shown on its progress bar."""
    check_output_file_readable(argument, args.out)
    volume = read_volume(argument)
    check_channels(volume, client.network_info())
    start = time.perf_counter()
    bars: list[tqdm] = []  # made at the first call, (0, total): a bar made before showed "0chunk [00:00, ?chunk/s]"

    def advance(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="chunk", desc=f"{position}{volume.label[-30:]}", disable=args.no_progress,
                             dynamic_ncols=True, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        result = client.segment_volume(volume.image, chunks=chunk_settings(args), inflight=args.inflight,
                                       retries=args.retries, patience_s=args.patience, progress=advance, **segment_options(args))
    finally:
        for bar in bars:
            bar.close()
    outputs = {"mask": result.mask, "probabilities": result.probabilities, "contour": result.contour}
    made = {k: v for k, v in outputs.items() if v is not None}
    stale = earlier_outputs_not_made(argument, args.out, list(made))  # before the record is replaced
    written = write_volume_outputs(volume, made, args.out)
    for path in stale:
        path.unlink(missing_ok=True)
        print(f"client: {volume.label}: removed {path}, an earlier run's output not made now "
              "(it would disagree with the new mask)", file=sys.stderr)
    write_record(argument, args.out, settings, written)
    shape = "x".join(str(n) for n in volume.image.shape[1:])
    print(f"client: {volume.label} ({shape}) in {result.chunks} request(s), {time.perf_counter() - start:.1f} s -> "
          f"{', '.join(str(p) for p in written)}", file=sys.stderr)
