"""Volumes in and out: NIfTI (``.nii``, ``.nii.gz``), TIFF stacks, NPY and HDF5 datasets.

Voxels go to the server in the order they are stored: a NIfTI array ``[X, Y, Z]`` is sent as
``[1, X, Y, Z]`` and its mask comes back ``[X, Y, Z]``, so the mask is written with the input's
affine and header (data type changed to uint8) and lies exactly on the scan. A fourth NIfTI
axis holds channels. TIFF stacks are ``[Z, Y, X]`` (``[C, Z, Y, X]`` for several channels).
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib

import numpy as np
import tifffile

from client.frames import load_npy
from client.stacks import HDF5_SUFFIXES, split_hdf5_argument

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

    @property
    def stem(self) -> str:
        name = self.path.name
        for suffix in VOLUME_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem


def volume_kind(path: pathlib.Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith(".npy"):
        return "npy"
    if path.suffix.lower() in HDF5_SUFFIXES:
        return "hdf5"
    raise ValueError(f"{path}: unsupported volume file; use one of {', '.join(VOLUME_SUFFIXES)}")


def channel_first(array: np.ndarray, label: str, channel_axis_last: bool) -> np.ndarray:
    """``[*spatial]`` -> ``[1, *spatial]``; 4D arrays keep (or move to) a leading channel axis."""
    if array.ndim == 3:
        return array[None]
    if array.ndim == 4:
        return np.moveaxis(array, -1, 0) if channel_axis_last else array
    raise ValueError(f"{label}: expected a 3D volume, got shape {list(array.shape)}")


def read_volume(argument: str) -> Volume:
    """Read a volume named by a path or ``FILE.h5:/dataset``.

    Raises:
        ValueError, OSError: missing file, unsupported type, wrong rank.
    """
    hdf5 = split_hdf5_argument(argument)
    path = hdf5[0] if hdf5 else pathlib.Path(argument)
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
        image = channel_first(data, path.name, channel_axis_last=True)
        return Volume(path.name, kind, image, path, nifti=nifti)
    if kind == "tiff":
        return Volume(path.name, kind, channel_first(tifffile.imread(path), path.name, False), path)
    if kind == "npy":
        return Volume(path.name, kind, channel_first(load_npy(path), path.name, False), path)
    if hdf5 is None:
        raise ValueError(f"{path}: name the dataset, e.g. {path}:/entry/data")
    import h5py

    with h5py.File(path, "r") as handle:
        if hdf5[1] not in handle or not isinstance(handle[hdf5[1]], h5py.Dataset):
            raise ValueError(f"{path}: no dataset {hdf5[1]!r}")
        image = channel_first(handle[hdf5[1]][()], f"{path.name}:{hdf5[1]}", False)
    return Volume(f"{path.name}:{hdf5[1]}", kind, image, path, dataset=hdf5[1])


def write_nifti(path: pathlib.Path, array: np.ndarray, source) -> None:
    """``array`` ``[*spatial]`` (or ``[K, *spatial]``, stored with K last) on the source's grid."""
    import nibabel

    data = np.moveaxis(array, 0, -1) if array.ndim == 4 else array
    header = source.header.copy()
    header.set_data_dtype(data.dtype)
    image = nibabel.Nifti1Image(data, source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)  # labels and probabilities are stored unscaled
    nibabel.save(image, path)


def write_volume_outputs(volume: Volume, outputs: dict[str, np.ndarray], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write each output (``mask``, ``probabilities``, ``contour``) in the input's own kind of
    file: ``<stem>_<output>.nii.gz`` / ``.tif`` / ``.npy``, or ``<stem>_segmentation.h5`` with a
    group named after the dataset. Files are written under a temporary name, then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if volume.kind == "hdf5":
        import h5py

        target = out_dir / f"{volume.stem}_segmentation.h5"
        partial = target.with_name(target.name + ".partial")
        with h5py.File(partial, "w") as handle:
            group = handle.require_group(volume.dataset.strip("/") or "data")
            for name, array in outputs.items():
                group.create_dataset(name, data=array, compression="gzip")
        partial.replace(target)
        return [target]
    suffix = {"nifti": ".nii.gz", "tiff": ".tif", "npy": ".npy"}[volume.kind]
    written = []
    for name, array in outputs.items():
        target = out_dir / f"{volume.stem}_{name}{suffix}"
        partial = target.with_name(f".{target.name}.partial{suffix}")
        if volume.kind == "nifti":
            write_nifti(partial, array, volume.nifti)
        elif volume.kind == "tiff":
            tifffile.imwrite(partial, array, compression="zlib", photometric="minisblack")
        else:
            np.save(partial, array)
        partial.replace(target)
        written.append(target)
    return written
