"""Volumes in and out: NIfTI (``.nii``, ``.nii.gz``), TIFF stacks, NPY and HDF5 datasets.

Voxels go to the server in the order they are stored: a NIfTI array ``[X, Y, Z]`` is sent as
``[1, X, Y, Z]`` and its mask comes back ``[X, Y, Z]``, so the mask is written with the input's
affine and header (data type changed to uint8) and lies exactly on the scan. A fourth NIfTI
axis holds channels. TIFF stacks are ``[Z, Y, X]`` (``[C, Z, Y, X]`` for several channels).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import zlib
from collections.abc import Callable

import numpy as np
import tifffile

from client.frames import image_stem, load_npy
from client.stacks import (HDF5_SUFFIXES, StackWriter, Target, atomic_write, atomic_write_all, check_hdf5_room,
                           comparable_settings, file_identity, open_hdf5_dataset, safe_name, split_hdf5_argument)
from client.tiffs import GENERIC_AXES, TiffFrames, open_tiff, refuse_cut_short, tiff_calibration, write_tiff

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".tif", ".tiff", ".npy", *HDF5_SUFFIXES)


@dataclasses.dataclass
class Volume:
    """A volume as the server takes it, ``[C, *spatial]``, and where it came from."""

    label: str
    kind: str  # nifti | tiff | npy | hdf5
    image: np.ndarray
    path: pathlib.Path
    dataset: str | None = None
    nifti: object | None = None  # the loaded nibabel image (affine, header)
    calibration: dict | None = None  # a TIFF's voxel sizes, as tifffile.imwrite takes them (``tiff_calibration``)

    @property
    def stem(self) -> str:
        return volume_stem(self.path)


def volume_stem(path: pathlib.Path) -> str:
    """The file name without its volume suffix (``scan.nii.gz``, ``scan.ome.tif`` -> ``scan``);
    a directory of slices by its whole name."""
    if path.is_dir():
        return path.resolve().name  # "." too
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return image_stem(path)


def volume_kind(path: pathlib.Path) -> str:
    if path.is_dir():
        return "tiff"  # a directory of slices, written as one TIFF stack
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith(".npy"):
        return "npy"
    if path.suffix.lower() in HDF5_SUFFIXES:
        return "hdf5"
    raise ValueError(f"{path}: unsupported volume file; use one of {', '.join(VOLUME_SUFFIXES)}, or a directory of "
                     "TIFF slices")


def channel_first(array: np.ndarray, label: str, channel_axis_last: bool) -> np.ndarray:
    """``[*spatial]`` -> ``[1, *spatial]``; 4D arrays keep (or move to) a leading channel axis."""
    if array.ndim == 3:
        return array[None]
    if array.ndim == 4:
        return np.moveaxis(array, -1, 0) if channel_axis_last else array
    hint = "; one image: segment frames with `segment`, or give the directory of a volume's TIFF slices" if array.ndim == 2 else ""
    raise ValueError(f"{label}: expected a 3D volume, got shape {list(array.shape)}{hint}")


def slice_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """A directory's TIFF slices in natural order (``z_2.tif`` before ``z_10.tif``), as a
    tomographic reconstruction writes them.

    Raises:
        ValueError: none in it.
    """
    names = tifffile.natural_sorted([p.name for p in directory.iterdir()
                                     if p.suffix.lower() in (".tif", ".tiff") and not p.name.startswith(".")])
    if not names:
        raise ValueError(f"{directory}: a directory, and no .tif/.tiff slices in it")
    return [directory / name for name in names]


def read_slices(directory: pathlib.Path) -> np.ndarray:
    """``[1, D, H, W]``: one 2D TIFF per slice, of one shape and pixel type.

    Raises:
        ValueError: a slice that is not one 2D image, or not of the first one's shape or type.
    """
    files = slice_files(directory)
    first = tifffile.imread(files[0])
    volume = np.empty((len(files), *first.shape), first.dtype)
    for index, path in enumerate(files):
        image = first if index == 0 else tifffile.imread(path)
        if image.ndim != 2 or image.shape != first.shape or image.dtype != first.dtype:
            raise ValueError(f"{path}: shape {list(image.shape)} {image.dtype}, where {files[0].name} is "
                             f"{list(first.shape)} {first.dtype}; the slices of a volume are 2D images of one shape and type")
        volume[index] = image
    return volume[None]


def read_tiff_volume(path: pathlib.Path) -> np.ndarray:
    """``[C, D, H, W]``: a z-stack's frames (ImageJ and OME channels first, a file written page
    by page read whole: :class:`client.tiffs.TiffFrames`), or a directory's slices; an array
    without axis metadata as ``channel_first`` takes any array."""
    if path.is_dir():
        return read_slices(path)
    with open_tiff(path) as tiff:
        refuse_cut_short(tiff, path, "a volume")
        series = tiff.series[0]
        if set(series.axes) <= {*GENERIC_AXES, "Y", "X"}:
            return channel_first(series.asarray(), path.name, False)
    with TiffFrames(path) as frames:
        return np.moveaxis(frames.read_all(), 1, 0)


def read_volume(argument: str) -> Volume:
    """Read a volume named by a path or ``FILE.h5:/dataset``.

    Raises:
        ValueError, OSError: missing file, unsupported type, wrong rank.
    """
    path, dataset = volume_location(argument)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    kind = volume_kind(path)
    if kind == "nifti":
        import nibabel

        try:
            nifti = nibabel.load(path)
            data = np.asanyarray(nifti.dataobj)
        except (nibabel.filebasedimages.ImageFileError, EOFError, zlib.error, OSError) as error:  # empty; cut; corrupt
            raise ValueError(f"{path}: not a readable NIfTI file ({error})") from error
        if data.ndim == 5 and data.shape[3] == 1:  # NIfTI: time on the 4th axis, components on the 5th; one time point
            data = data[:, :, :, 0]
        image = channel_first(data, path.name, channel_axis_last=True)
        return Volume(path.name, kind, image, path, nifti=nifti)
    if kind == "tiff":
        calibration = tiff_calibration(slice_files(path)[0] if path.is_dir() else path)
        return Volume(path.name, kind, read_tiff_volume(path), path, calibration=calibration)
    if kind == "npy":
        return Volume(path.name, kind, channel_first(load_npy(path), path.name, False), path)
    if dataset is None:
        raise ValueError(f"{path}: name the dataset, e.g. {path}:/entry/data")
    stored = open_hdf5_dataset(path, dataset)
    try:
        image = channel_first(stored[()], f"{path.name}:{dataset}", False)
    finally:
        stored.file.close()
    return Volume(f"{path.name}:{dataset}", kind, image, path, dataset=dataset)


def write_nifti(path: pathlib.Path, array: np.ndarray, source, output: str = "mask") -> None:
    """``array`` ``[*spatial]`` (or ``[K, *spatial]``, stored with K last) on the source's grid
    (its affine, codes and voxel sizes). What describes the scan's values goes: its display
    window (a CT's -1024..3071 showed labels 0..2 as one grey), intent and description; a
    mask or contour is a label image, probabilities span 0..1 over a 4th axis that is no time."""
    import nibabel

    data = np.moveaxis(array, 0, -1) if array.ndim == 4 else array
    header = source.header.copy()
    header.set_data_dtype(data.dtype)
    # A NIfTI-2 scan's header in a NIfTI-1 image was logged as fixed ("sizeof_hdr should be 348")
    # once per output, and its outputs were NIfTI-1.
    kind = nibabel.Nifti2Image if isinstance(source, nibabel.Nifti2Image) else nibabel.Nifti1Image
    image = kind(data, source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)  # labels and probabilities are stored unscaled
    labels = output != "probabilities"
    image.header.set_intent("label" if labels else "none")
    image.header["cal_min"], image.header["cal_max"] = 0.0, float(data.max()) if labels and data.size else 1.0
    image.header["descrip"] = f"{output} of {pathlib.Path(source.get_filename() or 'the scan').name}"[:79].encode()
    if not labels:
        image.header.set_xyzt_units(xyz=header.get_xyzt_units()[0], t="unknown")
    nibabel.save(image, path)


def output_group(dataset: str) -> str:
    """The HDF5 group of an input dataset's outputs (``/entry/data`` -> ``entry/data``)."""
    return dataset.strip("/") or "data"


def output_paths(path: pathlib.Path, kind: str, names: list[str], out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Where each output of the volume in ``path`` goes: ``<stem>_<output>.nii.gz`` / ``.tif`` /
    ``.npy``, or, for HDF5, one ``<stem>_segmentation.h5`` (a group per input dataset)."""
    stem = volume_stem(path)
    if kind == "hdf5":
        return {name: out_dir / f"{stem}_segmentation.h5" for name in names}
    suffix = {"nifti": ".nii.gz", "tiff": ".tif", "npy": ".npy"}[kind]
    return {name: out_dir / f"{stem}_{name}{suffix}" for name in names}


def volume_location(argument: str) -> tuple[pathlib.Path, str | None]:
    """The file a volume argument names, and its HDF5 dataset (``FILE.h5:/path``; else None)."""
    hdf5 = split_hdf5_argument(argument)
    return (hdf5[0], hdf5[1]) if hdf5 else (pathlib.Path(argument), None)


def output_targets(argument: str, names: list[str], out_dir: pathlib.Path) -> list[Target]:
    """What segmenting the volume named by ``argument`` writes (nothing is read).

    Raises:
        ValueError: an unsupported file type; an HDF5 file without a dataset.
    """
    path, dataset = volume_location(argument)
    kind = volume_kind(path)
    if kind == "hdf5" and dataset is None:
        raise ValueError(f"{path}: name the dataset, e.g. {path}:/entry/data")
    place = output_group(dataset) if kind == "hdf5" else ""
    owner = f"{path}:{dataset}" if place else str(path)
    return [Target(owner, target, place) for target in sorted(set(output_paths(path, kind, names, out_dir).values()))]


def outputs_written(argument: str, names: list[str], out_dir: pathlib.Path) -> bool:
    """Whether every output ``names`` of the volume named by ``argument`` is in ``out_dir``
    (files are renamed into place whole, so one that exists is complete; HDF5: the dataset's
    group holds each of them)."""
    try:
        targets = output_targets(argument, names, out_dir)
    except ValueError:  # names no volume: it fails on its own
        return False
    if not targets[0].place:
        return all(target.path.exists() for target in targets)
    import h5py

    try:
        with h5py.File(targets[0].path, "r") as handle:
            return targets[0].place in handle and all(name in handle[targets[0].place] for name in names)
    except OSError:  # no such file, or not HDF5
        return False


VOLUME_RECORD_SUFFIX = ".segment-volume.json"


def record_path(argument: str, out_dir: pathlib.Path) -> pathlib.Path:
    """``<file name>.segment-volume.json`` (HDF5: ``<file name>_<dataset>.segment-volume.json``)
    in ``out_dir``: what the volume's outputs there were made from (``write_record``). By the
    whole name: ``a/ct.nii.gz`` and ``b/ct.npy`` write outputs of their own, and records too."""
    path, dataset = volume_location(argument)
    name = (path.resolve().name if path.is_dir() else path.name) + (f"_{safe_name(dataset)}" if dataset else "")
    return out_dir / f"{name}{VOLUME_RECORD_SUFFIX}"


def files_of_records(out_dir: pathlib.Path) -> set[str]:
    """Names of the files in ``out_dir`` that a volume's record says segment-volume wrote
    (records without a file list, an earlier version's: their location's outputs)."""
    names = set()
    for record_file in out_dir.glob(f"*{VOLUME_RECORD_SUFFIX}"):
        try:
            record = json.loads(record_file.read_text())
            if "files" in record:
                names.update(record["files"])
                continue
            location = pathlib.Path(record["location"])
            names.update(target.name for target in output_paths(location, volume_kind(location), record["outputs"], out_dir).values())
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, or of a kind without files (HDF5)
            continue
    return names


def files_not_ours(argument: str, names: list[str], out_dir: pathlib.Path, ours: set[str]) -> list[pathlib.Path]:
    """Files at the names of the volume's outputs ``names`` in ``out_dir`` that no record says
    this tool wrote (``ours``: ``files_of_records``) and that ``segment`` did not write: a
    user's own (a ground-truth ``a_mask.nii.gz``), which a run would replace. HDF5: none (only
    the dataset's group is replaced)."""
    try:
        targets = output_targets(argument, names, out_dir)
    except ValueError:  # names no volume: it fails on its own
        return []
    if targets[0].place or frames_record(argument, out_dir) is not None:
        return []
    return [target.path for target in targets if target.path.exists() and target.path.name not in ours]


def frames_record(argument: str, out_dir: pathlib.Path) -> pathlib.Path | None:
    """The run record ``python -m client segment`` keeps in ``out_dir`` when it segmented this
    input frame by frame (``NAME.segment.json``): its outputs there have the names a volume's
    would have (``NAME_mask.tif``, an HDF5 group), and are not a volume's. None when absent."""
    path, dataset = volume_location(argument)
    if path.is_dir() or volume_kind(path) == "nifti":  # not a stack `segment` reads
        return None
    record = StackWriter.record_path_at(path, dataset, out_dir)
    return record if record.exists() else None


def volume_settings(argument: str, settings: dict) -> dict:
    """``settings`` (model, network, outputs, options) with the input's absolute location: a
    scan of the same name elsewhere writes the same outputs, and must not be taken for it."""
    path, dataset = volume_location(argument)
    return {"location": str(path.resolve()) + (f":{dataset}" if dataset else ""), **settings}


def write_record(argument: str, out_dir: pathlib.Path, settings: dict, written: list[pathlib.Path]) -> None:
    """Record, once its outputs are in place, what they were made from (``--resume``), and the
    size and modification time of each file ``written`` (HDF5: none, the file holds other
    datasets' groups too)."""
    target = record_path(argument, out_dir)
    record = volume_settings(argument, settings)
    if volume_kind(volume_location(argument)[0]) != "hdf5":
        record["files"] = {path.name: file_identity(path) for path in written}
    atomic_write(target, lambda partial: partial.write_text(json.dumps(record, indent=1)))


def files_replaced(recorded: dict, out_dir: pathlib.Path, names: set[str]) -> list[str]:
    """Of the output files ``names``, those the record lists that are not the files it was
    written after: another input of the same name (``scan.nii`` beside ``scan.nii.gz``) wrote
    over them since."""
    replaced = []
    for name, identity in recorded.get("files", {}).items():
        if name not in names:
            continue
        try:
            if file_identity(out_dir / name) != identity:
                replaced.append(name)
        except OSError:  # gone: outputs_written says so
            continue
    return replaced


def record_differences(argument: str, out_dir: pathlib.Path, settings: dict) -> list[str] | None:
    """How the recorded run of the volume's outputs differs from ``settings`` ("overlap 0.5
    there, 0.6 now"); [] for none, None when there is no record (outputs of an earlier
    version, or not made by this command)."""
    try:
        recorded = json.loads(record_path(argument, out_dir).read_text())
    except (OSError, ValueError):
        return None
    wanted = volume_settings(argument, settings)
    missing = [name for name in wanted.get("outputs", []) if name not in recorded.get("outputs", [])]
    # The outputs asked for are compared as outputs alone (fewer asked for: done), not again as
    # the options that ask for them ("contour True there, False now" segmented it again).
    then, now = comparable_settings(recorded), comparable_settings(wanted)
    compared = {*then, *now} - {"outputs", "files", *OPTIONAL_OUTPUTS}
    differences = [f"{key} {then.get(key)!r} there, {now.get(key)!r} now"
                   for key in sorted(compared) if then.get(key) != now.get(key)]
    path, _ = volume_location(argument)
    asked = {target.name for target in output_paths(path, volume_kind(path), wanted.get("outputs", []), out_dir).values()}
    replaced = files_replaced(recorded, out_dir, asked)
    differences += [f"{', '.join(replaced)} written since by another run"] if replaced else []
    return differences + ([f"no {', '.join(missing)} there"] if missing else [])


OPTIONAL_OUTPUTS = ("probabilities", "contour")  # outputs a request option asks for, beside the mask


def earlier_outputs_not_made(argument: str, out_dir: pathlib.Path, made: list[str]) -> list[pathlib.Path]:
    """Files of the volume's outputs in ``out_dir`` that its record says an earlier run made
    and that this run, making ``made``, does not replace: left, the probabilities of another
    overlap sat beside the new mask, disagreeing with it. Files no record names (a user's own,
    an earlier version's) are not listed. HDF5: none (a rerun replaces the dataset's group)."""
    try:
        record = json.loads(record_path(argument, out_dir).read_text())
        path, _ = volume_location(argument)
        kind = volume_kind(path)
    except (OSError, ValueError):
        return []
    earlier = [name for name in record.get("outputs", []) if name in OPTIONAL_OUTPUTS and name not in made]
    if kind == "hdf5" or not earlier:
        return []
    files = record.get("files")  # a file put there since the record (a user's own) stays

    def recorded(target: pathlib.Path) -> bool:
        return files is None or files.get(target.name) == file_identity(target)

    return [target for target in output_paths(path, kind, earlier, out_dir).values() if target.exists() and recorded(target)]


def write_volume_outputs(volume: Volume, outputs: dict[str, np.ndarray], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write each output (``mask``, ``probabilities``, ``contour``) in the input's own kind of
    file (``output_paths``). Files are written under a temporary name, then renamed; in HDF5
    the other datasets' groups of an existing file are kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(volume.path, volume.kind, list(outputs), out_dir)
    if volume.kind == "hdf5":
        target = paths["mask"]
        write_hdf5_group(target, output_group(volume.dataset), outputs)
        return [target]
    # All or none: a mask published beside probabilities that failed to write is a half result.
    atomic_write_all({paths[name]: array_writer(array, volume, name) for name, array in outputs.items()},
                     suffix=".nii.gz" if volume.kind == "nifti" else None)
    return list(paths.values())


def array_writer(array: np.ndarray, volume: Volume, output: str) -> Callable[[pathlib.Path], None]:
    """What writes ``array``, the volume's ``output``, into a file in the volume's kind (NIfTI
    on its grid, TIFF or NPY)."""
    if volume.kind == "nifti":
        return lambda path: write_nifti(path, array, volume.nifti, output)
    if volume.kind == "tiff":
        return lambda path: write_tiff(path, array, volume.calibration, "ZYX" if array.ndim == 3 else "CZYX")
    return lambda path: save_npy(path, array)


def save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    """``np.save`` through Python's file writes: numpy's own write of a whole array fails on
    a full disk with "N requested and M written" alone, without the system's reason."""
    with open(path, "wb") as file:
        np.lib.format.write_array(types.SimpleNamespace(write=file.write), np.asarray(array), allow_pickle=False)


def check_output_file_readable(argument: str, out_dir: pathlib.Path) -> None:
    """Refuse, before the volume is read or sent, an HDF5 output file in ``out_dir`` that exists
    but cannot be read: a rerun keeps its other groups, so it is read when the outputs are
    written (after the whole compute, in words that named the input).

    Raises:
        OSError: naming the output file and h5py's reason.
    """
    try:
        target = output_targets(argument, ["mask"], out_dir)[0]
    except ValueError:  # names no volume: it fails on its own
        return
    if not target.place or not target.path.exists():
        return
    import h5py

    try:
        h5py.File(target.path, "r").close()
    except OSError as error:
        raise OSError(f"{target.path}: the output file there is not readable HDF5 ({str(error).splitlines()[0]}); "
                      "its other groups would be kept, so it is read: move it away or choose another --out") from None


def write_hdf5_group(target: pathlib.Path, group_name: str, outputs: dict[str, np.ndarray]) -> None:
    """``outputs`` as the datasets of ``group_name`` in ``target``, replacing that group and
    keeping everything else in the file. A new file is written and renamed over it, so the file
    in place is never open for writing (HDF5 may leave a file killed while open for writing
    unreadable, and with it every group) and a replaced group leaves no dead space behind.

    Refused while the disk lacks room for the new file as if uncompressed (``check_hdf5_room``):
    the crash ended the batch.

    Raises:
        OSError: ENOSPC, before anything is written.
    """
    import h5py

    previous_bytes = target.stat().st_size if target.exists() else 0
    check_hdf5_room(target, previous_bytes + sum(array.nbytes for array in outputs.values()), "this volume's outputs")

    def write(partial: pathlib.Path) -> None:
        with h5py.File(partial, "w") as handle:
            if target.exists():
                with h5py.File(target, "r") as previous:
                    copy_all_but(previous, handle, group_name)
            group = handle.require_group(group_name)
            for name, array in outputs.items():
                group.create_dataset(name, data=array, compression="gzip")

    atomic_write(target, write)


def copy_all_but(source, destination, skipped: str) -> None:
    """Copy the HDF5 group ``source`` (its attributes and members) into ``destination``, but
    not the member at path ``skipped`` (relative to the file's root)."""
    destination.attrs.update(source.attrs)
    for name, member in source.items():
        path = member.name.lstrip("/")
        if path == skipped:
            continue
        if skipped.startswith(path + "/") and hasattr(member, "items"):  # a group on the way to it
            copy_all_but(member, destination.require_group(name), skipped)
        else:
            source.copy(member, destination, name=name)
