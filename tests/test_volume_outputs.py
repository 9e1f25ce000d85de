"""Outputs when the disk refuses them. Volumes: written whole or not at all (a file-size limit
stands in for a full disk: the writes fail alike, EFBIG for ENOSPC, and it needs no mount).
HDF5 stacks: refused frame by frame on a real small file system, with the file still closable.
NIfTI-2 scans give NIfTI-2 outputs; a 5D NIfTI of one time point is read as a volume."""

from __future__ import annotations

import pathlib
import resource
import signal
import subprocess
import sys

import h5py
import nibabel
import numpy as np
import pytest

from segserve.launcher import REPO_ROOT

LIMIT_BYTES = 1 << 20
WRITE_OUTPUTS = """
import pathlib, sys
import numpy as np
from client.volume_files import read_volume, write_volume_outputs

volume = read_volume(sys.argv[1])
spatial = volume.image.shape[1:]
rng = np.random.default_rng(0)
outputs = {"mask": np.zeros(spatial, np.uint8),  # small once compressed: it fits, the probabilities do not
           "probabilities": rng.random((3, *spatial), dtype=np.float32)}
try:
    write_volume_outputs(volume, outputs, pathlib.Path(sys.argv[2]))
    print("written")
except OSError as error:
    print(f"refused: {error}")
"""


def limit_file_size() -> None:
    """In the child: files beyond LIMIT_BYTES fail to grow (EFBIG), as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def write_input(directory, kind: str) -> str:
    volume = np.arange(40 * 60 * 70, dtype=np.int16).reshape(40, 60, 70)
    if kind == "nifti":
        nibabel.save(nibabel.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0])), directory / "ct.nii.gz")
        return str(directory / "ct.nii.gz")
    if kind == "npy":
        np.save(directory / "ct.npy", volume)
        return str(directory / "ct.npy")
    with h5py.File(directory / "ct.h5", "w") as handle:
        handle["entry/data"] = volume
    return f"{directory / 'ct.h5'}:/entry/data"


@pytest.mark.parametrize("kind", ["nifti", "npy"])
def test_outputs_the_disk_refuses_are_an_error_and_none_is_published(tmp_path, kind):
    """NIfTI published the mask without the probabilities; NPY said only "N requested and M
    written"."""
    argument, out = write_input(tmp_path, kind), tmp_path / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, "-c", WRITE_OUTPUTS, argument, str(out)], capture_output=True, text=True,
                         cwd=REPO_ROOT, preexec_fn=limit_file_size, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("refused: [Errno 27] File too large"), run.stdout
    assert sorted(path.name for path in out.iterdir()) == []


WRITE_STACK = """
import pathlib, sys, types
import numpy as np
from client.stacks import StackWriter

directory = pathlib.Path(sys.argv[1])
source = types.SimpleNamespace(path=directory / "scan.h5", kind="hdf5", count=40, frame_shape=(256, 256), one_frame=False,
                               dataset="/data")
writer = StackWriter(source, directory, ["mask", "probabilities"], num_classes=3, resume=False)
rng = np.random.default_rng(0)
written = 0
try:
    for index in range(40):
        writer.write(index, types.SimpleNamespace(mask=np.zeros((256, 256), np.uint8),
                                                  probabilities=rng.random((3, 256, 256), dtype=np.float32)))
        writer.flush()
        written += 1
    print("all written")
except OSError as error:
    print(f"refused after {written}: {error}")
writer.close(publish=False)
print("closed")
"""


@pytest.fixture
def small_file_system(tmp_path):
    """A 40 MiB tmpfs (as root: it needs a mount), removed afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_an_hdf5_stack_output_on_a_full_disk_is_refused_frame_by_frame_and_the_file_closes(small_file_system):
    """HDF5 whose write failed on a full disk crashed the client when the file was closed (a
    segmentation fault), losing the run record and the summary."""
    run = subprocess.run([sys.executable, "-c", WRITE_STACK, str(small_file_system)], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    refused, closed = run.stdout.splitlines()
    assert refused.startswith("refused after ") and "[Errno 28] no space left on device" in refused and "--resume" in refused
    assert closed == "closed"
    with h5py.File(pathlib.Path(small_file_system) / "scan_segmentation.h5", "r") as handle:  # readable, as written
        written = int(refused.split()[2].rstrip(":"))
        assert written >= 1 and handle["data.partial/mask"].shape == (40, 256, 256)


def test_an_hdf5_volume_output_the_disk_has_no_room_for_is_refused_and_none_is_published(small_file_system, tmp_path):
    """HDF5 crashed the client (a segmentation fault closing the file whose write failed), so
    the volumes after it were never done."""
    with h5py.File(tmp_path / "ct.h5", "w") as handle:  # random probabilities of 47 MiB: more than the disk holds
        handle["entry/data"] = np.zeros((60, 256, 256), np.int16)
    run = subprocess.run([sys.executable, "-c", WRITE_OUTPUTS, f"{tmp_path / 'ct.h5'}:/entry/data", str(small_file_system)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("refused: [Errno 28] no space left on device"), run.stdout
    assert sorted(path.name for path in small_file_system.iterdir()) == []


def test_a_nifti2_scan_gives_nifti2_outputs_without_a_word_on_its_header(tmp_path, caplog):
    """Its header went into NIfTI-1 images: nibabel logged "sizeof_hdr should be 348; set
    sizeof_hdr to 348" once per output, and the outputs were NIfTI-1."""
    import logging

    from client.volume_files import read_volume, write_volume_outputs

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nibabel.save(nibabel.Nifti2Image(np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5), affine), tmp_path / "scan.nii.gz")
    volume = read_volume(str(tmp_path / "scan.nii.gz"))
    mask = np.zeros(volume.image.shape[1:], np.uint8)
    with caplog.at_level(logging.DEBUG, logger="nibabel"):
        written = write_volume_outputs(volume, {"mask": mask, "probabilities": np.zeros((3, *mask.shape), np.float32)},
                                       tmp_path / "out")
    assert caplog.records == []
    for path in written:
        output = nibabel.load(path)
        assert type(output) is nibabel.Nifti2Image and np.array_equal(output.affine, affine)


def test_a_five_dimensional_nifti_of_one_time_point_is_a_volume(tmp_path):
    """[X, Y, Z, 1, C] (NIfTI's time on the 4th axis, components on the 5th) was refused as
    "expected a 3D volume"; one component is one channel, several are channels."""
    from client.volume_files import read_volume, write_volume_outputs

    data = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    nibabel.save(nibabel.Nifti1Image(data[..., None, None], np.eye(4)), tmp_path / "one.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.stack([data, -data], -1)[..., None, :], np.eye(4)), tmp_path / "two.nii.gz")
    volume = read_volume(str(tmp_path / "one.nii.gz"))
    assert np.array_equal(volume.image, data[None])
    assert np.array_equal(read_volume(str(tmp_path / "two.nii.gz")).image, np.stack([data, -data]))
    [mask] = write_volume_outputs(volume, {"mask": np.ones(data.shape, np.uint8)}, tmp_path / "out")
    assert nibabel.load(mask).shape == data.shape
