"""Segment frames and stacks of frames with the segmentation server.

    python -m client segment frame.tif [more frames...] --out results/
    python -m client segment scan.tif --out results/ --transport shm --inflight 8
    python -m client segment run42.h5:/entry/data --out results/ --resume
    python -m client segment-volume scan.nii.gz --out results/    (3D: see segment-volume --help)

Inputs: image files (TIFF, PNG, NPY; [H, W] or [C, H, W]), stacks (multi-page TIFF, NPY or an
HDF5 dataset FILE.h5:/path, shaped [N, H, W] or [N, C, H, W]) and directories of image files.
Float32, uint8, uint16 and int16 pixels travel as they are (the server converts them).

Outputs in --out: for an image NAME.ext, NAME_mask.tif (uint8 class per pixel) and
NAME_overlay.png, plus NAME_probabilities.tif (float32 [K, H, W]) and NAME_contour.tif on
request; a directory DIR gives the same in --out/DIR/. A stack gives stacks in its own
container: NAME_mask.tif [N, H, W] for a TIFF, NAME_mask.npy for an NPY,
NAME_segmentation.h5 with a group named after the dataset for HDF5, and NAME.segment.json,
the run record --resume continues from. A frame that fails after its retries is reported,
left out of file outputs or filled with 255 (NaN for probabilities) in a stack, and the exit
code is 1. Frames are always written in input order.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import signal
import sys
import time
import traceback

from tqdm import tqdm

from client import dataset_cli, volume_cli
from client.cli_options import add_pipeline_options, add_server_options, connected_client, segment_options
from client.api import SegmentationClient, SegmentationError
from client.volume_files import record_path as volume_record_path
from client.stacks import (FileWriter, RunRecord, Source, StackWriter, Target, check_distinct_targets, open_sources,
                           refuse_files_not_written_here, stack_outputs)

MAX_INFLIGHT = 256  # requests in flight per client (one thread each); 100000 exhausts the threads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment frames and write masks", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("frames", nargs="+", help="image files, stacks (.tif, .npy, FILE.h5:/dataset) or directories")
    segment.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"), help="output directory (default: %(default)s)")
    add_server_options(segment, "segment_2d", 4, "frames")
    segment.add_argument("--resume", action="store_true", help="skip frames an interrupted run already wrote")
    segment.add_argument("--overwrite", action="store_true",
                         help="start over even where an interrupted run left a record, and replace files at the outputs' "
                         "names that this command did not write (refused otherwise)")
    add_pipeline_options(segment)
    segment.add_argument("--format", choices=("tif", "npy"), default="tif",
                         help="file format of per-image outputs (default: %(default)s; stacks keep their container)")
    segment.add_argument("--no-overlay", action="store_true", help="skip the PNG overlay of per-image outputs")
    segment.add_argument("--overlay-max-size", type=int, default=2048, help="longest overlay side in pixels (default: %(default)s)")
    volume = commands.add_parser("segment-volume", help="segment 3D volumes, in chunks when large",
                                 description=volume_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    volume.add_argument("volumes", nargs="+",
                        help="volumes: .nii/.nii.gz, .tif, .npy, FILE.h5:/dataset, or a directory of TIFF slices")
    volume.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"), help="output directory (default: %(default)s)")
    volume.add_argument("--resume", action="store_true",
                        help="skip volumes whose outputs are in --out already (an interrupted run's finished ones)")
    volume.add_argument("--overwrite", action="store_true",
                        help="replace files at the outputs' names that segment-volume did not write (refused otherwise)")
    add_server_options(volume, "segment_3d", 2, "chunks")
    add_pipeline_options(volume)
    volume_cli.add_chunk_options(volume)
    dataset = commands.add_parser("segment-dataset", help="segment a dataset on a Dask cluster, zarr out",
                                  description=dataset_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_cli.add_arguments(dataset)
    args = parser.parse_args(argv)
    if args.command == "segment-dataset":
        dataset_cli.check_arguments(dataset, args)
    if not 1 <= args.inflight <= MAX_INFLIGHT:
        parser.error(f"--inflight must be in 1..{MAX_INFLIGHT}, got {args.inflight}")
    if args.retries is not None and args.retries < 0:
        parser.error(f"--retries must be >= 0, got {args.retries}")
    if args.patience < 0:
        parser.error(f"--patience must be >= 0, got {args.patience}")
    if getattr(args, "overlay_max_size", 1) < 1:
        parser.error(f"--overlay-max-size must be >= 1 (--no-overlay for none), got {args.overlay_max_size}")
    if args.command != "segment-dataset" and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; --out names a directory")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume and --overwrite exclude each other")
    if (args.intensity_min is None) != (args.intensity_max is None):
        parser.error("--intensity-min and --intensity-max go together (both, or neither for each input's percentiles)")
    if args.intensity_min is not None and not args.intensity_min < args.intensity_max:
        parser.error(f"--intensity-min must be below --intensity-max, got {args.intensity_min:g} and {args.intensity_max:g}")
    if args.command == "segment-volume":
        volume_cli.check_chunk_options(parser, args)
    return args


@dataclasses.dataclass
class Tally:
    """Counts for the closing summary: of the frames written or failed (a frame interrupted
    before either is neither, and is sent again by ``--resume``), those that took more than
    one attempt (``retried``) and their further attempts (``retries``)."""

    written: int = 0
    skipped: int = 0
    retried: int = 0
    retries: int = 0
    failed: int = 0
    failures: list[FailedFrames] = dataclasses.field(default_factory=list)

    @property
    def frames(self) -> int:
        return self.written + self.failed

    def add_failure(self, source: Source, index: int, error: str) -> FailedFrames | None:
        """Count a failed frame; the new run of failures it begins, or None when it carries on
        the last one (the next frame of the same source, failed with the same error)."""
        self.failed += 1
        last = self.failures[-1] if self.failures else None
        if last is not None and last.source is source and last.last == index - 1 and last.error == error:
            last.last = index
            return None
        self.failures.append(FailedFrames(source, index, index, error))
        return self.failures[-1]

    def count_attempts(self, attempts: int) -> None:
        if attempts > 1:
            self.retried += 1
            self.retries += attempts - 1

    def summary(self, seconds: float) -> str:
        rate = f"{self.frames / seconds:.2f} frames/s" if seconds > 0 and self.frames else "-"
        text = (f"{self.frames} frame(s) in {seconds:.1f} s ({rate}): {self.written} written, "
                f"{self.failed} failed, {self.retried} retried")
        text += f" ({self.retries} further attempts)" if self.retries > self.retried else ""
        return text + (f", {self.skipped} skipped (already written)" if self.skipped else "")


@dataclasses.dataclass
class FailedFrames:
    """Frames ``first..last`` of ``source``, one after another, failed with one error (a stack
    cut short, a server gone: hundreds of frames, listed as one line)."""

    source: Source
    first: int
    last: int
    error: str

    def describe(self) -> str:
        label = self.source.frame_label
        if self.first == self.last:
            return f"{label(self.first)}: {self.error}"
        if self.source.kind in ("files", "directory"):
            frames = f"{label(self.first)} .. {label(self.last)}"
        else:
            frames = f"{self.source.label}[{self.first}..{self.last}]"
        return f"{frames} ({self.last - self.first + 1} frames): {self.error}"


@dataclasses.dataclass
class Plan:
    """One source, where its results go, and which of its frames still need segmenting."""

    source: Source
    writer: StackWriter | FileWriter
    todo: list[int]
    record: RunRecord | None = None


def plan_source(source: Source, args: argparse.Namespace, num_classes: int, network: str) -> Plan:
    """``network``: the network the run's requests take (the server's default when not given)."""
    outputs = stack_outputs(args.probabilities, args.contour)
    if source.kind in ("files", "directory"):
        return plan_file_outputs(source, args, outputs, network)
    return plan_stack_outputs(source, args, outputs, num_classes, network)


def plan_file_outputs(source: Source, args: argparse.Namespace, outputs: list[str], network: str) -> Plan:
    """Files per image; with ``--resume``, the images whose outputs this input and these settings wrote are skipped."""
    # What changes a mask: requested outputs are checked by the files that exist.
    settings = {"network": network, "model": args.model,
                **{k: v for k, v in segment_options(args).items() if k not in ("probabilities", "contour")}}
    writer = FileWriter(source, args.out, outputs, args.format, None if args.no_overlay else args.overlay_max_size,
                        settings)
    todo = [i for i in range(source.count) if not (args.resume and writer.is_done(i))]
    redone = sum(args.resume and writer.is_written(i) for i in todo)
    if redone:
        print(f"client: {redone} image(s) of {source.label} written from another input or with other settings "
              "are segmented again", file=sys.stderr)
    return Plan(source, writer, todo)


def plan_stack_outputs(source: Source, args: argparse.Namespace, outputs: list[str], num_classes: int,
                       network: str) -> Plan:
    """Preallocated stack outputs and their run record: a new one, or with ``--resume`` the
    interrupted run's (refused when its settings differ)."""
    # The location too: another file of the same name must not continue this one's record.
    settings = {"network": network, "model": args.model, "source": source.label,
                "location": str(source.path.resolve()), **segment_options(args)}
    record_path = StackWriter.record_path_for(source, args.out)
    record = None
    if record_path.exists():
        if args.resume:
            record = RunRecord.load(record_path, source.count, settings)
            record.check_witness(source.load, source.label)
        elif not args.overwrite and not RunRecord.is_complete_file(record_path):
            raise ValueError(f"{record_path}: an earlier run stopped before the end; add --resume to continue it "
                             "or --overwrite to start again")
    writer = StackWriter(source, args.out, outputs, num_classes, resume=record is not None,
                         finished=record is not None and record.is_finished())
    if record is None:
        record = RunRecord(record_path, source.count, settings)
        record.save()
    return Plan(source, writer, record.remaining(), record)


def files_not_ours(source: Source, args: argparse.Namespace) -> list[pathlib.Path]:
    """Files at ``source``'s output names that this command did not write: an image's that its
    ``segment-log.jsonl`` does not name (with no log at all, an earlier version's outputs count
    as ours under --resume), a stack's final outputs without the stack's run record or
    segment-volume's record of the same input. HDF5: none (only the dataset's group is replaced)."""
    outputs = stack_outputs(args.probabilities, args.contour)
    if source.kind in ("files", "directory"):
        writer = FileWriter(source, args.out, outputs, args.format, None if args.no_overlay else args.overlay_max_size)
        logged = writer.written_with()
        if logged is None and args.resume:
            return []
        existing = [path for index in range(source.count) for path in writer.paths(index).values() if path.exists()]
        return [path for path in existing if logged is None or path.name not in logged]
    if source.kind == "hdf5" or StackWriter.record_path_for(source, args.out).exists():
        return []
    if volume_record_path(str(source.path), args.out).exists():  # segment-volume's outputs of this input
        return []
    return [path for path in StackWriter.paths_for(source, args.out, outputs).values() if path.exists()]


def refuse_files_not_ours(sources: list[Source], args: argparse.Namespace) -> None:
    """Refuse, before anything is written, to replace files this command did not write (a
    hand-drawn ``frame_mask.tif`` in --out was replaced without a word).

    Raises:
        ValueError: naming them, and what to do.
    """
    refuse_files_not_written_here([path for source in sources for path in files_not_ours(source, args)],
                                  f"neither {FileWriter.LOG_NAME} nor a run record there says this command wrote it")


def planned_targets(sources: list[Source], args: argparse.Namespace) -> tuple[list[Target], list[pathlib.Path]]:
    """What every source would write, and the run's inputs (files, and directories given)."""
    targets, inputs, seen = [], [], set()
    outputs = stack_outputs(args.probabilities, args.contour)
    for source in sources:
        location = source.files[0].parent if source.kind == "directory" else source.path
        identity = (location.resolve() if location else None, source.dataset)
        if source.kind != "files" and identity in seen:
            raise ValueError(f"{source.label} is given twice")
        seen.add(identity)
        if source.kind in ("files", "directory"):
            writer = FileWriter(source, args.out, outputs, args.format, None if args.no_overlay else args.overlay_max_size)
            targets += writer.targets()
            inputs += [source.files[0].parent] if source.kind == "directory" else source.files
        else:
            targets += StackWriter.targets(source, args.out, outputs)
            inputs.append(source.path)
    return targets, inputs


def run_plan(client: SegmentationClient, plan: Plan, args: argparse.Namespace, progress: tqdm, tally: Tally) -> None:
    source, writer = plan.source, plan.writer
    items = ((i, lambda i=i: source.load(i)) for i in plan.todo)
    stream = client.segment_stream(items, inflight=args.inflight, retries=args.retries, patience_s=args.patience,
                                   **segment_options(args))
    try:
        for outcome in stream:
            if outcome.ok:
                written = writer.write(outcome.index, outcome.result)
                if plan.record is not None and plan.record.witness is None:
                    plan.record.witness_written(outcome.index, source.load(outcome.index))
                tally.written += 1
                if source.kind in ("files", "directory"):
                    progress.write(f"{source.frame_label(outcome.index)} -> {', '.join(str(p) for p in written)}")
            else:
                # The first frame of a run that fails alike is told now, the run in the summary.
                begun = tally.add_failure(source, outcome.index, outcome.error)
                if begun is not None:
                    progress.write(f"client: error: {begun.describe()}", file=sys.stderr)
                if plan.record is not None:
                    writer.write_failed(outcome.index)
            if plan.record is not None:
                writer.flush()
                plan.record.mark(outcome.index, outcome.error)
                plan.record.save()
            tally.count_attempts(outcome.attempts)
            progress.update(1)
            progress.set_postfix(retried=tally.retried, failed=tally.failed, refresh=False)
    finally:
        stream.close()
        source.close()
        if isinstance(writer, StackWriter):
            writer.close(publish=plan.record.is_finished())


def segment_inputs(args: argparse.Namespace) -> int:
    """``segment``: every frame of ``args.frames`` into ``args.out``; 1 if any failed."""
    with connected_client(args) as (client, info):  # refused transports and absent servers leave no --out behind
        args.out.mkdir(parents=True, exist_ok=True)
        in_channels, num_classes = info.in_channels, info.num_classes
        sources = open_sources(args.frames, in_channels)
        for note in (source.note for source in sources if source.note):
            print(f"client: warning: {note}", file=sys.stderr)
        check_distinct_targets(*planned_targets(sources, args))  # before any writer opens (and truncates) a file
        if not args.overwrite:
            refuse_files_not_ours(sources, args)
        plans = [plan_source(source, args, num_classes, info.name) for source in sources]
        tally = Tally(skipped=sum(p.source.count - len(p.todo) for p in plans))
        remaining = sum(len(p.todo) for p in plans)
        start = time.perf_counter()
        try:  # a resumed run's bar starts at the frames already written
            with tqdm(total=remaining + tally.skipped, initial=tally.skipped, unit="frame",
                      disable=args.no_progress or remaining < 2, dynamic_ncols=True) as progress:
                for plan in plans:
                    progress.set_description(plan.source.label[-30:])
                    run_plan(client, plan, args, progress, tally)
        finally:
            print_run_summary(client, plans, tally, time.perf_counter() - start)
    return 1 if tally.failed else 0


def print_run_summary(client: SegmentationClient, plans: list[Plan], tally: Tally, seconds: float) -> None:
    """The closing lines: counts, per server when several, and where each stack went."""
    print(f"client: {tally.summary(seconds)}", file=sys.stderr)
    if len(client.urls) > 1:
        print(f"client: per server: {client.servers.summary()}", file=sys.stderr)
    for plan in plans:
        if plan.record is not None:
            print(f"client: {plan.source.label} -> {plan.writer.describe()}", file=sys.stderr)
            if not plan.writer.published:
                print(f"client: {plan.source.label}: unfinished, so under partial names until --resume "
                      "finishes it (the earlier result, if any, is untouched)", file=sys.stderr)
    if tally.failures:
        print("client: failed frames:\n  " + "\n  ".join(run.describe() for run in tally.failures), file=sys.stderr)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM takes the same path as Ctrl-C: regions unregistered and freed, run record saved.
    # SIGINT is set too: a shell starts background jobs with it ignored, and Python keeps that.
    previous = {signum: signal.signal(signum, raise_keyboard_interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.command == "segment-dataset":
            return dataset_cli.segment_dataset(args)
        return volume_cli.segment_volumes(args) if args.command == "segment-volume" else segment_inputs(args)
    except (OSError, ValueError, SegmentationError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"client: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        if args.command == "segment-volume":  # a volume is written whole or not at all
            print("client: interrupted; the volumes reported written are complete, the one in progress was not "
                  "written; rerun with --resume to skip the written ones", file=sys.stderr)
        else:
            print("client: interrupted; rerun with --resume to continue", file=sys.stderr)
        # 128 + the signal's number, as shells report it and as serve and export exit: 143 for SIGTERM.
        signum = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else signal.SIGINT
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
