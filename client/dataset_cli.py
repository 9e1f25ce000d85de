"""Segment datasets larger than one machine on a Dask cluster, zarr in and zarr out.

    python -m client segment-dataset scan.zarr --out scan_seg.zarr --url gpu1:8001,gpu2:8001
    python -m client segment-dataset tomo.h5:/entry/data --out tomo_seg.zarr --model segment_3d
    python -m client segment-dataset em.zarr/raw --out em_seg.zarr --model segment_3d --scheduler tcp://head:8786
    python -m client segment-dataset scan.zarr --out scan_seg.zarr --resume       (after an interrupted run)

Inputs: a zarr array (STORE.zarr, STORE.zarr/path/in/store), an OME-Zarr image (level 0 of its
multiscales), an HDF5 dataset (FILE.h5:/path), a TIFF stack or an NPY file. With a 2D model
([N, H, W] or [N, C, H, W]) tasks are runs of --frames-per-task frames; with a 3D model
([D, H, W] or [C, D, H, W]) tasks are blocks of --block voxels, each read with its halo
straight from the input, so that the stitched result equals one whole-volume request.

Output: a zarr group with `mask` (uint8, the input's spatial shape, one chunk per task),
`probabilities` and `contour` on request, `done` (one element per task, set by the task after
its data) and attributes with the options, the network and the run's state. OME-Zarr inputs
also make the group an OME-Zarr label image over the input (NGFF `image-label`).

Without --scheduler a LocalCluster of --workers processes runs here; with it, an existing
cluster (Slurm, Kubernetes: docs/datasets.md). Each worker talks to $SEGSERVE_LOCAL_URL (its
node's server) when set there, else to the --url list, failing over between them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import pathlib
import sys
import time
import uuid

import numpy as np

from client import dataset_outages, outage_notices
from client.chunks import DEFAULT_MAX_CHUNK_VOXELS, effective_overlap
from client.cli_options import (add_pipeline_options, add_server_options, connected_client, say_above_progress,
                                segment_options)
from client.dataset_ranges import intensity_range
from client.dataset_sources import DatasetSource, open_source, release_handles
from client.datasets import DONE_ARRAY, Job, Task, TaskReport, default_block, plan_stack, plan_volume, run_task
from client.stacks import comparable_settings
from client.transports import check_pixel_type

ATTRIBUTE = "segment_dataset"
DEFAULT_FRAMES_PER_TASK = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="STORE.zarr[/array], an OME-Zarr image, FILE.h5:/dataset, .tif or .npy")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output zarr group (OUTPUT.zarr)")
    add_server_options(parser, "segment_2d", 1, "requests per worker", "request")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler (default: a LocalCluster here)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default: %(default)s)")
    parser.add_argument("--frames-per-task", type=int,
                        help=f"frames per task and per output chunk, stacks (default: {DEFAULT_FRAMES_PER_TASK}; with "
                             "--resume, the run's own)")
    parser.add_argument("--block", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="voxels per task and per output chunk, volumes, 0 for the whole axis (default: the largest power-of-two "
                             "multiple of the tile whose request with halos stays under --max-chunk-voxels; with --resume, the run's own)")
    parser.add_argument("--max-chunk-voxels", type=int, default=DEFAULT_MAX_CHUNK_VOXELS,
                        help="largest request in voxels, for the default --block (default: %(default)s)")
    parser.add_argument("--task-retries", type=int, default=3,
                        help="times Dask reruns a task that raised (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="run only the tasks an interrupted run did not finish")
    parser.add_argument("--overwrite", action="store_true", help="start over where an earlier run left OUTPUT.zarr")
    add_pipeline_options(parser)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The options of this command alone (``client.__main__.parse_args`` checks the shared ones)."""
    for name in ("workers", "frames_per_task", "max_chunk_voxels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.block and min(args.block) < 0:
        parser.error(f"--block extents must be >= 0 (0: the whole axis), got {args.block}")
    if args.task_retries < 0:
        parser.error(f"--task-retries must be >= 0, got {args.task_retries}")


@dataclasses.dataclass
class DatasetPlan:
    """The source, how it is cut, and the output arrays (name -> (shape, chunks, dtype))."""

    source: DatasetSource
    layout: str
    channels: bool
    tasks: list[Task]
    arrays: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]
    spatial_shape: tuple[int, ...]


def plan_dataset(source: DatasetSource, info, args: argparse.Namespace) -> DatasetPlan:
    """Stack or volume (rank against the network's spatial dims), its tasks and outputs.

    Raises:
        ValueError: a shape the network cannot take, or a per-block option on a chunked volume.
    """
    check_pixel_type(source.dtype, f"{source.argument}: ")  # before any task: each would fail
    if info.spatial_dims == 2:
        return plan_stack_dataset(source, info, args)
    return plan_volume_dataset(source, info, args)


def plan_stack_dataset(source: DatasetSource, info, args: argparse.Namespace) -> DatasetPlan:
    """Frames ``[N, H, W]`` or ``[N, C, H, W]`` in tasks of ``--frames-per-task``."""
    shape = source.shape
    channels = len(shape) == 4
    if len(shape) == 2 or (len(shape) == 3 and info.in_channels > 1):
        raise ValueError(f"{source.argument}: one frame {list(shape)}; use `python -m client segment` for frames")
    if channels and shape[1] != info.in_channels:
        raise ValueError(f"{source.argument}: frames have {shape[1]} channels, network {info.name!r} takes "
                         f"{info.in_channels}")
    frames, frame = shape[0], shape[-2:]
    frames_per_task = args.frames_per_task or DEFAULT_FRAMES_PER_TASK
    extent = min(frames_per_task, frames)
    arrays = output_arrays((frames, *frame), (extent, *frame), 1, info.num_classes, args)
    return DatasetPlan(source, "stack", channels, plan_stack(frames, frames_per_task), arrays, (frames, *frame))


def plan_volume_dataset(source: DatasetSource, info, args: argparse.Namespace) -> DatasetPlan:
    """A volume ``[D, H, W]`` or ``[C, D, H, W]`` in blocks of ``--block`` (with halos)."""
    channels = len(source.shape) == 4
    spatial = source.shape[1:] if channels else source.shape
    overlap = effective_overlap(args.overlap)
    block = tuple(args.block) if args.block else default_block(spatial, info.tile, args.max_chunk_voxels, overlap)
    block = tuple(min(b, n) if b else n for b, n in zip(block, spatial))
    tasks = plan_volume(spatial, info.tile, block, overlap)
    if len(tasks) > 1 and (args.keep_largest or args.contour):
        raise ValueError("--keep-largest and --contour look at the whole mask (the largest object, borders across "
                         "block seams); a block cannot compute them as a whole-volume request would. Segment without "
                         "them, or use `python -m client segment-volume` on a machine that holds the volume, or one "
                         "--block covering the volume")
    arrays = output_arrays(spatial, block, 0, info.num_classes, args)
    return DatasetPlan(source, "volume", channels, tasks, arrays, spatial)


def output_arrays(shape: tuple[int, ...], chunks: tuple[int, ...], class_axis: int, num_classes: int,
                  args: argparse.Namespace) -> dict[str, tuple]:
    """name -> (shape, chunks, dtype) of the requested outputs: masks (and contours) of
    ``shape``; probabilities with ``num_classes`` inserted at ``class_axis``."""
    def with_classes(extents: tuple[int, ...]) -> tuple[int, ...]:
        return (*extents[:class_axis], num_classes, *extents[class_axis:])

    arrays = {"mask": (tuple(shape), tuple(chunks), "uint8")}
    if args.probabilities:
        arrays["probabilities"] = (with_classes(tuple(shape)), with_classes(tuple(chunks)), "float32")
    if args.contour:
        arrays["contour"] = (tuple(shape), tuple(chunks), "uint8")
    return arrays


def recorded_settings(out: pathlib.Path) -> dict | None:
    """The settings of the run that wrote ``out`` (see ``run_settings``); None where there is
    no such group or another program wrote it."""
    import zarr

    try:
        group = zarr.open_group(out, mode="r")
    except (OSError, ValueError):  # no such path; zarr 3's GroupNotFoundError is both
        return None
    return dict(group.attrs).get(ATTRIBUTE, {}).get("settings")


def check_output_place(source: DatasetSource, out: pathlib.Path) -> None:
    """Refuse an output that is the input, lies inside it or holds it (--overwrite would
    delete the input; a group inside it would change it)."""
    output, data = out.resolve(), pathlib.Path(source.path).resolve()
    if output == data or data in output.parents or output in data.parents:
        relation = "is" if output == data else "lies inside" if data in output.parents else "holds"
        raise ValueError(f"--out {out} {relation} the input {source.argument}; choose another --out")


def is_empty_directory(path: pathlib.Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def with_recorded_extent(args: argparse.Namespace, previous: dict | None) -> argparse.Namespace:
    """``args`` where a resumed run takes the earlier run's task extent for the one it was not
    given (``--block``, ``--frames-per-task``): the default may have changed since (another
    ``--max-chunk-voxels``, another client version), and the tasks must be the same."""
    if previous is None or "task_extent" not in previous:
        return args
    extent = previous["task_extent"]
    if previous.get("layout") == "volume" and args.block is None:
        return argparse.Namespace(**{**vars(args), "block": list(extent)})
    if previous.get("layout") == "stack" and args.frames_per_task is None:
        return argparse.Namespace(**{**vars(args), "frames_per_task": extent[0]})
    return args


def run_settings(plan: DatasetPlan, info, args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run it continues."""
    source = plan.source
    return {"input": source.argument, "input_location": f"{source.path}:{source.inner or ''}",
            "input_shape": list(source.shape), "input_dtype": source.dtype,
            "layout": plan.layout, "model": args.model, "network": info.name,
            "task_extent": list(plan.arrays["mask"][1]), "tasks": len(plan.tasks),
            "options": {k: v for k, v in segment_options(args).items() if v is not None}}


def differing_settings(previous: dict, settings: dict) -> list[str]:
    """This run's settings that differ from those of the run it resumes. The input counts by
    its location (absolute path; a relative name means another file from another directory),
    or as it was spelled where the earlier run recorded no location; the options as
    ``comparable_settings`` takes them (an option named at its default is the same run)."""
    ignored = "input" if "input_location" in previous else "input_location"
    previous = {**previous, "options": comparable_settings(previous.get("options") or {})}
    settings = {**settings, "options": comparable_settings(settings.get("options") or {})}
    return sorted(k for k in settings if k != ignored and previous.get(k) != settings[k])


def reopen_output(plan: DatasetPlan, settings: dict, previous: dict | None, args: argparse.Namespace):
    """Check ``--out`` before anything is written: the group a --resume continues, or None
    where a new one is to be created (nothing there, an empty directory, or an earlier run's
    output and --overwrite). ``previous``: the settings recorded there (``recorded_settings``).

    Raises:
        ValueError: ``--out`` is or holds the input, holds something else, or holds an earlier
            run that this one may neither resume (other settings) nor replace (no --overwrite).
    """
    import zarr

    check_output_place(plan.source, args.out)
    if not args.out.exists() or is_empty_directory(args.out):
        return None
    if previous is None:
        raise ValueError(f"{args.out} exists and is not the output of a segment-dataset run; choose another --out "
                         "(--resume and --overwrite take only such an output)")
    if not args.resume:
        if not args.overwrite:
            raise ValueError(f"{args.out} exists; add --resume to continue the run that wrote it or --overwrite to "
                             "start again")
        return None
    differing = differing_settings(previous, settings)
    if differing:
        raise ValueError(f"{args.out}: written with other settings ({', '.join(differing)}: "
                         f"{[previous.get(k) for k in differing]}); resume with the same ones or --overwrite")
    return zarr.open_group(args.out, mode="r+")


def create_output(plan: DatasetPlan, settings: dict, args: argparse.Namespace):
    """A new output group (replacing what ``reopen_output`` allowed); the driver alone writes
    its attributes."""
    import zarr

    group = zarr.open_group(args.out, mode="w", zarr_format=3)
    label = ome_label_metadata(plan, args.out) if plan.source.ome is not None else None
    for name, (shape, chunks, dtype) in plan.arrays.items():
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                           dimension_names=dimension_names(plan, name, label))
    group.create_array(DONE_ARRAY, shape=(len(plan.tasks),), chunks=(1,), dtype="uint8", fill_value=0,
                       dimension_names=("task",))
    attributes = {ATTRIBUTE: {"settings": settings, "complete": False}}
    if label is not None:
        attributes["ome"] = label
    group.attrs.update(attributes)
    return group


def dimension_names(plan: DatasetPlan, name: str, label: dict | None) -> tuple[str, ...]:
    """The names of output ``name``'s axes (zarr 3 ``dimension_names``; NGFF 0.5 requires them,
    equal to its axes): the label image's axes, else ``frame``/``z``, ``y``, ``x``; probabilities
    with ``class`` where the classes are (after the frame axis of a stack, first in a volume)."""
    names = ["frame" if plan.layout == "stack" else "z", "y", "x"]
    if label is not None and len(label["multiscales"][0]["axes"]) == len(names):
        names = [axis["name"] for axis in label["multiscales"][0]["axes"]]
    if name == "probabilities":
        names.insert(1 if plan.layout == "stack" else 0, "class")
    return tuple(names)


def ome_label_metadata(plan: DatasetPlan, out: pathlib.Path) -> dict:
    """NGFF 0.5 label-image metadata: one level (`mask`) on the input's level-0 grid."""
    multiscale = plan.source.ome
    axes = multiscale.get("axes", [])[plan.source.dropped:]
    if plan.channels:
        axes = [a for i, a in enumerate(axes) if i != (1 if plan.layout == "stack" else 0)]
    transforms = multiscale["datasets"][0].get("coordinateTransformations", [])
    keep = len(axes)
    transforms = [{**t, **{k: t[k][-keep:] for k in ("scale", "translation") if k in t}} for t in transforms]
    image = os.path.relpath(pathlib.Path(plan.source.path, plan.source.inner.rpartition("/")[0]), out)
    return {"version": "0.5",
            "multiscales": [{"name": "mask", "axes": axes,
                             "datasets": [{"path": "mask", "coordinateTransformations": transforms}]}],
            "image-label": {"version": "0.5", "source": {"image": image}}}


def start_cluster(args: argparse.Namespace):
    """A distributed Client: to --scheduler, or to a LocalCluster of single-threaded worker
    processes (each keeps one SegmentationClient, made in the process: gRPC does not survive a fork;
    a task already sends --inflight requests at once)."""
    from distributed import Client, LocalCluster

    if args.scheduler:
        try:
            return Client(args.scheduler), None
        except (OSError, ValueError, TypeError) as error:  # unreachable; no port, or not a number
            raise ValueError(f"--scheduler {args.scheduler}: {error}") from error
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster


def close_cluster(dask_client, cluster) -> None:
    """Close the client, and the LocalCluster ``start_cluster`` made (None: --scheduler's)."""
    dask_client.close()
    if cluster is not None:
        cluster.close()


def volume_options(plan: DatasetPlan, group, dask_client, options: dict) -> dict:
    """Options sent with every block: the whole volume's intensity range unless given
    (computed once and stored, so a resumed run sends the same)."""
    if plan.layout != "volume" or len(plan.tasks) == 1:
        return options
    options = {**options, "overlap": effective_overlap(options.get("overlap"))}
    if options.get("intensity_min") is not None or options.get("intensity_max") is not None:
        return options
    state = dict(group.attrs)[ATTRIBUTE]
    if "intensity_range" not in state:
        blocks = [functools.partial(plan.source.read, ((slice(None),) if plan.channels else ()) + task.kept)
                  for task in plan.tasks]

        def run(function, items):
            return dask_client.gather(dask_client.map(function, items, pure=False))

        started = time.perf_counter()
        window = intensity_range(blocks, run)
        state = {**state, "intensity_range": window}
        group.attrs[ATTRIBUTE] = state
        print(f"client: whole-volume intensity range {window} (exact 1st..99th percentile, 2 passes) in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    if state["intensity_range"] is not None:
        options["intensity_min"], options["intensity_max"] = state["intensity_range"]
    return options


@dataclasses.dataclass
class Summary:
    reports: list[TaskReport] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    skipped: int = 0

    def line(self, layout: str, seconds: float) -> str:
        items = sum(r.items for r in self.reports)
        unit = "frame" if layout == "stack" else "block"
        rate = f"{items / seconds:.2f} {unit}s/s" if seconds > 0 and items else "-"
        read, written = sum(r.bytes_read for r in self.reports), sum(r.bytes_written for r in self.reports)
        done = sum(report.error is None for report in self.reports)
        return (f"{items} {unit}(s) in {done} task(s), {seconds:.1f} s ({rate}), "
                f"{read / 2**20:.1f} MiB read, {written / 2**20:.1f} MiB written, "
                f"{sum(r.retried for r in self.reports)} retried, {len(self.failed)} task(s) failed"
                + (f", {self.skipped} already done" if self.skipped else ""))

    def per_server(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for report in self.reports:
            for url, answered in report.servers.items():
                counts[url] = counts.get(url, 0) + answered
        return counts


def run_tasks(dask_client, job: Job, tasks: list[Task], args: argparse.Namespace, summary: Summary) -> None:
    """Run ``tasks`` on the cluster; each one that did not finish goes to ``summary.failed``
    with its reason, and the rest still run (``--resume`` does the failed ones later)."""
    from tqdm import tqdm

    outage = dataset_outages.ClusterOutage(job.run)
    with tqdm(total=len(tasks), unit="task", disable=args.no_progress, dynamic_ncols=True) as progress, \
            dataset_outages.subscribed(dask_client, outage), \
            outage_notices.watching(outage, ", ".join(job.urls), job.patience_s, say_above_progress,
                                    retries=job.retries, item=args.retried_item):
        futures = dask_client.map(run_task, [job] * len(tasks), tasks, retries=args.task_retries, pure=False)
        task_of = {future.key: task for future, task in zip(futures, tasks)}
        with cancelled_on_exit(dask_client, futures):
            collect(futures, task_of, outage, progress, summary)


def collect(futures: list, task_of: dict, outage, progress, summary: Summary) -> None:
    """Each task's report (or failure) as it ends, into ``summary``; its worker's outage
    state at its end into ``outage``."""
    from distributed import as_completed

    for future in as_completed(futures):
        task = task_of[future.key]
        try:
            report = future.result()
            error = report.error  # a frame the server refused: the task's others are written
            outage.update(report.outage)
            summary.reports.append(report)
        except Exception as raised:  # noqa: BLE001 - the task's own error, or its loss by the cluster
            error = task_failure(raised)
        if error is not None:
            summary.failed.append(f"task {task.index} {task.describe()}: {error}")
            progress.write(f"client: error: {summary.failed[-1]}", file=sys.stderr)
        progress.update(1)
        progress.set_postfix(failed=len(summary.failed), refresh=False)


@contextlib.contextmanager
def cancelled_on_exit(dask_client, futures: list):
    """Cancel the tasks still queued when the driver stops early (Ctrl-C, a lost scheduler):
    they would otherwise run on, reopening the input after the run released it."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            dask_client.cancel([future for future in futures if not future.done()])
        raise


def task_failure(error: Exception) -> str:
    """Why a task did not finish: its exception, or that the cluster cancelled it (Dask's
    reason: its scheduler restarted, the driver lost the scheduler, another client cancelled it)."""
    from concurrent.futures import CancelledError

    if isinstance(error, CancelledError):
        return f"cancelled by the cluster (reason: {getattr(error, 'reason', None) or 'unknown'})"
    return str(error) or type(error).__name__


def release_worker_handles(dask_client, source: DatasetSource) -> None:
    """Close the input on every worker of a cluster that outlives the run."""
    try:
        answers = dask_client.run(release_handles, source, on_error="return")
    except Exception as error:  # noqa: BLE001 - scheduler gone: nothing to close through it
        answers = {"the scheduler": error}
    failed = {worker: answer for worker, answer in answers.items() if isinstance(answer, BaseException)}
    if failed:
        print("client: warning: the input may still be open on " + ", ".join(
            f"{worker} ({type(error).__name__}: {error})" for worker, error in failed.items()), file=sys.stderr)


def segment_dataset(args: argparse.Namespace) -> int:
    """Plan, start or join the cluster, run the unfinished tasks, summarise; 1 if any failed."""
    return run_dataset(args)[0]


def run_dataset(args: argparse.Namespace) -> tuple[int, Summary, float]:
    """``segment_dataset`` with its summary and the seconds the tasks took (for benchmarks)."""
    # The command only asks metadata; for CUDA shared memory over gRPC: the workers, on the
    # servers' nodes, make the regions, and a driver elsewhere may have no GPU.
    with connected_client(args, "grpc" if args.transport == "cuda-shm" else None) as (client, info):
        urls = tuple(client.urls)
    source = dataclasses.replace(open_source(args.input, info.spatial_dims), run=uuid.uuid4().hex)
    previous = recorded_settings(args.out)
    if args.resume:
        args = with_recorded_extent(args, previous)
    plan = plan_dataset(source, info, args)
    settings = run_settings(plan, info, args)
    group = reopen_output(plan, settings, previous, args)
    done = np.zeros(len(plan.tasks), np.uint8) if group is None else np.asarray(group[DONE_ARRAY][:])
    todo = [task for task in plan.tasks if not done[task.index]]
    summary = Summary(skipped=len(plan.tasks) - len(todo))
    dask_client, cluster = start_cluster(args)  # before the output is written: a bad --scheduler leaves nothing
    if group is None:
        try:
            group = create_output(plan, settings, args)
        except BaseException:
            close_cluster(dask_client, cluster)
            raise
    start = time.perf_counter()
    try:
        print(f"client: Dask dashboard {dask_client.dashboard_link}", file=sys.stderr)
        if cluster is None and not dask_client.scheduler_info().get("workers"):  # the bar alone sat at 0 silently
            print(f"client: the cluster at {args.scheduler} has no workers yet; the tasks wait until one joins "
                  "(its batch jobs still queued?), Ctrl-C stops", file=sys.stderr)
        print(f"client: {source.argument} {list(source.shape)} {source.dtype} as a {plan.layout}: {len(plan.tasks)} "
              f"task(s) of {list(plan.arrays['mask'][1])}, {summary.skipped} already done, {len(todo)} to do -> "
              f"{args.out}", file=sys.stderr)
        options = volume_options(plan, group, dask_client, segment_options(args))
        # The network by name: workers then need only open metadata; the token only for shared memory.
        job = Job(source, os.path.abspath(args.out), plan.layout, plan.channels, urls, args.model, info.name,
                  args.transport, args.token, args.timeout, args.retries, args.patience, args.inflight, options,
                  tuple(plan.arrays), run=source.run)
        start = time.perf_counter()
        run_tasks(dask_client, job, todo, args, summary)
    finally:
        seconds = time.perf_counter() - start
        print(f"client: {summary.line(plan.layout, seconds)}", file=sys.stderr)
        if summary.reports:
            print("client: per server: " + ", ".join(f"{u} {n} answered" for u, n in summary.per_server().items()),
                  file=sys.stderr)
        if cluster is None:
            release_worker_handles(dask_client, source)
        close_cluster(dask_client, cluster)
    remaining = int(len(plan.tasks) - np.count_nonzero(group[DONE_ARRAY][:]))
    state = dict(group.attrs)[ATTRIBUTE]
    group.attrs[ATTRIBUTE] = {**state, "complete": remaining == 0, "remaining_tasks": remaining}
    if summary.failed or remaining:
        print(f"client: {remaining} task(s) unfinished; rerun with --resume to do only those", file=sys.stderr)
        return 1, summary, seconds
    return 0, summary, seconds
