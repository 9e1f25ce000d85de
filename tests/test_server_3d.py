"""segment_3d on the real server: parity with in-process MONAI sliding_window_inference on odd
volumes (one smaller than a tile), CONTOUR and keep_largest against MONAI's transforms,
chunked requests equal to one whole-volume request, and the volume CLI with NIfTI, TIFF, NPY
and HDF5 files."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from monai.transforms import KeepLargestConnectedComponent, LabelToContour

from client.__main__ import main as client_main
from client.api import SegmentationClient
from client.chunks import ChunkingError
from client.volumes import ChunkSettings
from segserve.options import PipelineOptions
from tests.helpers import assert_matches_reference, ct_volume
from training.synthetic_3d import synthetic_volume, to_int16_hu

TILE = (64, 64, 64)
# 197x171x45 cut at D 133 and H 107 (window starts, not round numbers): four chunks.
CHUNKED_SHAPE = (197, 171, 45)
CHUNK_SHAPE = (160, 160, 0)



@pytest.fixture(scope="module")
def client(server):
    with SegmentationClient(server.grpc_url, model="segment_3d") as connected:
        yield connected


def test_network_info_is_3d(client):
    info = client.network_info()
    assert (info.name, info.spatial_dims, info.tile, info.in_channels) == ("unet3d_organs", 3, TILE, 1)


@pytest.mark.parametrize("shape", [(37, 61, 53), (20, 30, 25), (70, 33, 81)], ids=lambda s: "x".join(map(str, s)))
def test_parity_with_monai_on_odd_volumes(client, network_3d, rng, shape):
    volume = ct_volume(shape, rng)
    result = client.segment(volume, probabilities=True)
    assert result.mask.shape == shape and result.mask.dtype == np.uint8
    assert_matches_reference(result, volume[None], network_3d, PipelineOptions(), TILE)


def test_every_voxel_type(client, rng):
    """int16 HU, and the same voxels as float32, uint16 (shifted by 1024) and uint8 (rescaled)."""
    volume = ct_volume((33, 40, 35), rng)
    from_int16 = client.segment(volume).mask
    assert np.array_equal(client.segment(volume.astype(np.float32)).mask, from_int16)
    shifted = (volume.astype(np.int32) + 1024).astype(np.uint16)
    assert np.mean(client.segment(shifted).mask == from_int16) > 0.999
    rescaled = np.clip((volume.astype(np.float32) + 1024) / 8, 0, 255).astype(np.uint8)
    assert np.mean(client.segment(rescaled).mask == from_int16) > 0.95


def test_contour_and_keep_largest_match_monai(client, rng):
    volume = ct_volume((48, 80, 72), rng)
    plain = client.segment(volume)
    assert set(np.unique(plain.mask)) >= {0, 1}, "the network should find organs in a synthetic CT volume"
    cleaned = client.segment(volume, keep_largest=True, contour=True)
    keep = KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False, independent=True)
    expected_mask = np.asarray(keep(torch.from_numpy(plain.mask)[None]))[0]
    assert np.array_equal(cleaned.mask, expected_mask)
    edges = np.asarray(LabelToContour()(torch.from_numpy(expected_mask)[None].float()))[0] != 0
    assert np.array_equal(cleaned.contour, np.where(edges, expected_mask, 0))


def test_masks_are_meaningful(client):
    image, truth = synthetic_volume((96, 112, 80), np.random.default_rng(77))
    mask = client.segment(to_int16_hu(image)).mask
    organ = 2 * np.sum((mask == 1) & (truth == 1)) / (np.sum(mask == 1) + np.sum(truth == 1))
    assert organ > 0.8, f"organ Dice {organ:.3f}"


def test_chunked_equals_whole_with_one_window_per_call(client, rng):
    """One window per network call and one chunk at a time: nothing but the chunking differs.
    Masks and contours are identical; probabilities to one float32 ulp (measured: 7 of 4.5M
    voxels differ by 3e-8, torch's vectorised softmax rounding differently for another size;
    a whole request repeated is identical)."""
    volume = ct_volume(CHUNKED_SHAPE, rng)
    options = dict(probabilities=True, contour=True, sw_batch_size=1, overlap=0.3, intensity_min=-1000.0,
                   intensity_max=300.0)
    whole = client.segment(volume, **options)
    chunked = client.segment_volume(volume, chunks=ChunkSettings(shape=CHUNK_SHAPE), inflight=1, **options)
    assert chunked.chunks == 4
    assert np.array_equal(chunked.mask, whole.mask) and np.array_equal(chunked.contour, whole.contour)
    assert np.abs(chunked.probabilities - whole.probabilities).max() <= 6e-8


def test_chunked_equals_whole_with_defaults(client, rng):
    """Default settings, chunks in flight together: the whole-volume intensity range and the
    stitched keep_largest make the masks identical; probabilities differ only by the network's
    batch-dependent rounding."""
    volume = ct_volume(CHUNKED_SHAPE, rng)
    whole = client.segment(volume, probabilities=True, keep_largest=True, contour=True)
    calls = []
    chunked = client.segment_volume(volume, chunks=ChunkSettings(shape=CHUNK_SHAPE), inflight=3, probabilities=True,
                                    keep_largest=True, contour=True, progress=lambda *call: calls.append(call))
    assert chunked.chunks == 4
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # the total first, then chunks done
    assert np.array_equal(chunked.mask, whole.mask) and np.array_equal(chunked.contour, whole.contour)
    assert np.abs(chunked.probabilities - whole.probabilities).max() <= 1e-5


def test_a_sparse_volume_is_segmented_alike_at_any_scale_and_chunked_as_whole(client):
    """A bright ball in 0.3 % of the voxels: its 1st and 99th percentiles are both 0, so the
    network was given the raw intensities (the mask changed with the ball's value), and each
    chunk scaled itself (the stitched mask differed from the whole volume's)."""
    z, y, x = np.ogrid[:CHUNKED_SHAPE[0], :CHUNKED_SHAPE[1], :CHUNKED_SHAPE[2]]
    ball = (z - 100) ** 2 + (y - 80) ** 2 + (x - 22) ** 2 <= 12 ** 2
    masks = []
    for value in (1, 1000):
        volume = np.where(ball, value, 0).astype(np.int16)
        whole = client.segment(volume).mask
        chunked = client.segment_volume(volume, chunks=ChunkSettings(shape=CHUNK_SHAPE), inflight=2)
        assert chunked.chunks == 4 and np.array_equal(chunked.mask, whole)
        masks.append(whole)
    assert np.array_equal(masks[0], masks[1])


def test_a_volume_with_nan_voxels_is_refused_before_any_chunk_is_sent(server, client, rng, tmp_path, capsys):
    """The server refused NaN chunk by chunk: one NaN in the last of 8 chunks came after 7
    chunks of compute, saying neither how many nor what to do."""
    volume = ct_volume(CHUNKED_SHAPE, rng).astype(np.float32)
    volume[190, 3, 44], volume[196, 170, 0] = np.nan, np.inf
    calls = []
    with pytest.raises(ValueError, match=re.escape("2 NaN or Inf voxel(s), the first at [z=190, y=3, x=44]; "
                                                   "the server refuses them: replace them first, e.g. numpy.nan_to_num")):
        client.segment_volume(volume, chunks=ChunkSettings(shape=CHUNK_SHAPE), progress=lambda *call: calls.append(call))
    assert calls == []  # not even planned
    np.save(tmp_path / "nan.npy", volume)
    np.save(tmp_path / "fine.npy", np.nan_to_num(volume[:40, :50, :30], posinf=0.0))
    code = client_main(["segment-volume", str(tmp_path / "nan.npy"), str(tmp_path / "fine.npy"), "--out", str(tmp_path / "out"),
                        "--url", server.grpc_url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"client: error: {tmp_path / 'nan.npy'}: 2 NaN or Inf voxel(s), the first at [z=190" in err, err
    assert not (tmp_path / "out" / "nan_mask.npy").exists() and (tmp_path / "out" / "fine_mask.npy").exists()


def test_an_unreadable_hdf5_output_file_is_refused_before_the_volume_is_segmented(server, rng, tmp_path, capsys):
    """A NAME_segmentation.h5 in --out that is no HDF5 failed after the whole compute, in
    h5py's words and under the input's name ("tomo.h5:/entry/data: Unable to synchronously
    open file (file signature not found)")."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "tomo.h5", "w") as handle:
        handle["entry/data"] = ct_volume((30, 41, 37), rng)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tomo_segmentation.h5").write_bytes(b"not HDF5")
    code = client_main(["segment-volume", f"{tmp_path / 'tomo.h5'}:/entry/data", "--out", str(tmp_path / "out"),
                        "--url", server.grpc_url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "request(s)" not in err, err
    assert (f"{tmp_path / 'out' / 'tomo_segmentation.h5'}: the output file there is not readable HDF5 "
            "(Unable to" in err), err
    assert (tmp_path / "out" / "tomo_segmentation.h5").read_bytes() == b"not HDF5"


def test_small_volume_goes_whole_and_a_limit_it_cannot_meet_is_refused(client, rng):
    volume = ct_volume((40, 50, 60), rng)
    calls = []
    result = client.segment_volume(volume, progress=lambda *call: calls.append(call))
    assert result.chunks == 1 and calls == [(0, 1), (1, 1)] and np.array_equal(result.mask, client.segment(volume).mask)
    with pytest.raises(ChunkingError, match=r"1000 is below the smallest chunk .* = 120000 voxels"):
        client.segment_volume(volume, chunks=ChunkSettings(max_voxels=1000))  # smaller than one tile: cannot be cut


def test_a_volume_sent_whole_rides_out_a_reload_of_the_pipeline(server, client, rng):
    """One request for the whole volume is retried like a chunk: with ``segment_3d`` unloaded
    (what `serve` does after a stub dies) and loaded again 3 s later, the volume still comes
    back, equal to one sent once the pipeline is back."""
    volume = ct_volume((40, 50, 60), rng)
    headers = server.token_headers("grpc")
    with grpcclient.InferenceServerClient(server.grpc_url) as control:
        control.unload_model("segment_3d", headers=headers)
        while control.is_model_ready("segment_3d"):
            time.sleep(0.1)
        loader = threading.Timer(3.0, control.load_model, args=("segment_3d",), kwargs={"headers": headers})
        loader.start()
        try:
            result = client.segment_volume(volume, patience_s=120)
        finally:
            loader.join()
            if not control.is_model_ready("segment_3d"):
                control.load_model("segment_3d", headers=headers)
    assert result.chunks == 1 and np.array_equal(result.mask, client.segment(volume).mask)


def test_nifti_round_trip_keeps_affine(server, client, rng, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = ct_volume(CHUNKED_SHAPE, rng)
    affine = np.array([[0.78, 0, 0, -199.6], [0, 0.78, 0, -180.2], [0, 0, 2.5, 71.0], [0, 0, 0, 1]])
    scan = nibabel.Nifti1Image(volume, affine)
    scan.header.set_xyzt_units("mm", "sec")
    # What describes the scan's values: a CT window, an intent, a description (not the outputs').
    scan.header["cal_min"], scan.header["cal_max"], scan.header["descrip"] = -1024, 3071, b"CT HU"
    scan.header.set_intent("estimate")
    nibabel.save(scan, tmp_path / "scan.nii.gz")
    code = client_main(["segment-volume", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), "--probabilities",
                        "--url", server.grpc_url, "--chunk-shape", *map(str, CHUNK_SHAPE), "--no-progress"])
    assert code == 0
    mask = nibabel.load(tmp_path / "out" / "scan_mask.nii.gz")
    scan = nibabel.load(tmp_path / "scan.nii.gz")  # the affine as stored (float32 in the header)
    assert np.array_equal(mask.affine, scan.affine)
    assert mask.header.get_xyzt_units() == ("mm", "sec") and mask.header.get_zooms() == scan.header.get_zooms()
    assert mask.get_data_dtype() == np.uint8
    expected = client.segment(volume).mask
    assert np.array_equal(np.asarray(mask.dataobj), expected)
    # A viewer shows the labels in their own range: the scan's -1024..3071 window made 0..2 one grey.
    assert (mask.header["cal_min"], mask.header["cal_max"]) == (0, expected.max())
    assert mask.header.get_intent()[0] == "label" and mask.header["descrip"].item() == b"mask of scan.nii.gz"
    probabilities = nibabel.load(tmp_path / "out" / "scan_probabilities.nii.gz")
    assert np.array_equal(probabilities.affine, scan.affine) and probabilities.shape == (*volume.shape, 3)
    assert (probabilities.header["cal_min"], probabilities.header["cal_max"]) == (0, 1)
    assert probabilities.header.get_intent()[0] == "none" and probabilities.header.get_xyzt_units() == ("mm", "unknown")


@pytest.mark.parametrize("kind", ["tif", "npy", "h5"])
def test_volume_cli_other_containers(server, client, rng, tmp_path, kind):
    import tifffile

    volume = ct_volume((30, 41, 37), rng)
    if kind == "tif":
        tifffile.imwrite(tmp_path / "ct.tif", volume)
        argument, output = tmp_path / "ct.tif", lambda: tifffile.imread(tmp_path / "out" / "ct_mask.tif")
    elif kind == "npy":
        np.save(tmp_path / "ct.npy", volume)
        argument, output = tmp_path / "ct.npy", lambda: np.load(tmp_path / "out" / "ct_mask.npy")
    else:
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp_path / "ct.h5", "w") as handle:
            handle["entry/data"] = volume

        def output():
            with h5py.File(tmp_path / "out" / "ct_segmentation.h5", "r") as handle:
                return handle["entry/data/mask"][()]
        argument = f"{tmp_path / 'ct.h5'}:/entry/data"
    code = client_main(["segment-volume", str(argument), "--out", str(tmp_path / "out"), "--url", server.grpc_url,
                        "--no-progress"])
    assert code == 0
    assert np.array_equal(output(), client.segment(volume).mask)


def test_volume_cli_refuses_a_2d_model_and_bad_chunks(server, rng, tmp_path, capsys):
    np.save(tmp_path / "ct.npy", ct_volume((100, 41, 37), rng))
    assert client_main(["segment-volume", str(tmp_path / "ct.npy"), "--url", server.grpc_url, "--model", "segment_2d"]) == 1
    assert "is not 3D" in capsys.readouterr().err
    code = client_main(["segment-volume", str(tmp_path / "ct.npy"), "--url", server.grpc_url, "--chunk-shape", "20", "0", "0",
                        "--no-progress", "--out", str(tmp_path)])
    assert code == 1 and "chunk extent 20 is too small" in capsys.readouterr().err


def test_datasets_of_one_hdf5_file_keep_their_own_groups(server, client, rng, tmp_path):
    """Each dataset's outputs go to its own group of ``<stem>_segmentation.h5``: a second
    dataset, and a later run of one, replace only their own group (the file used to be
    rewritten per volume, keeping the last one's group alone), and the file does not grow."""
    h5py = pytest.importorskip("h5py")
    volumes = {"entry/a": ct_volume((30, 41, 37), rng), "entry/b": ct_volume((33, 40, 35), rng)}
    with h5py.File(tmp_path / "scan.h5", "w") as handle:
        for name, volume in volumes.items():
            handle[name] = volume
    output = tmp_path / "out" / "scan_segmentation.h5"

    def run(*datasets: str, options: tuple[str, ...] = ()) -> None:
        arguments = [f"{tmp_path / 'scan.h5'}:/{name}" for name in datasets]
        code = client_main(["segment-volume", *arguments, "--out", str(tmp_path / "out"), "--url", server.grpc_url,
                            "--no-progress", *options])
        assert code == 0

    run("entry/a", "entry/b", options=("--probabilities",))
    size = output.stat().st_size
    run("entry/a", options=("--probabilities",))
    assert output.stat().st_size <= size
    run("entry/b")
    expected = {name: client.segment(volume, probabilities=True) for name, volume in volumes.items()}
    with h5py.File(output, "r") as handle:
        assert set(handle["entry"]) == {"a", "b"} and set(handle["entry/a"]) == {"mask", "probabilities"}
        assert set(handle["entry/b"]) == {"mask"}  # its last run asked for the mask alone
        for name, result in expected.items():
            assert np.array_equal(handle[f"{name}/mask"][()], result.mask)
        assert np.abs(handle["entry/a/probabilities"][()] - expected["entry/a"].probabilities).max() <= 1e-6


@pytest.mark.parametrize("layout, message", [
    (("x/ct.npy", "y/ct.npy"), "x/ct.npy and {tmp}/y/ct.npy would both write {tmp}/out/ct_mask.npy"),
    (("x/ct.npy", "x/../x/ct.npy"), "x/../x/ct.npy is given twice"),
    (("x/s.h5:/d", "y/s.h5:/d"), "x/s.h5:/d and {tmp}/y/s.h5:/d would both write {tmp}/out/s_segmentation.h5:d"),
], ids=["one name in two folders", "one file twice", "one dataset name in two files"])
def test_volumes_that_would_write_one_output_are_refused_before_anything_is_written(server, rng, tmp_path, capsys,
                                                                                    layout, message):
    h5py = pytest.importorskip("h5py")
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "ct.npy", ct_volume((30, 41, 37), rng))
        with h5py.File(tmp_path / folder / "s.h5", "w") as handle:
            handle["d"] = ct_volume((30, 41, 37), rng)
    code = client_main(["segment-volume", *(f"{tmp_path}/{argument}" for argument in layout), "--out",
                        str(tmp_path / "out"), "--url", server.grpc_url, "--no-progress"])
    assert code == 1 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_skips_the_volumes_whose_outputs_are_written(server, client, rng, tmp_path, capsys):
    """--resume after an interrupted run: a volume whose every requested output is in --out is
    not segmented again (its files are left as they are), the others are; in HDF5 per group."""
    h5py = pytest.importorskip("h5py")
    volumes = [ct_volume((30, 41, 37), rng) for _ in range(3)]
    np.save(tmp_path / "a.npy", volumes[0])
    with h5py.File(tmp_path / "s.h5", "w") as handle:
        handle["b"], handle["c"] = volumes[1], volumes[2]
    arguments = [str(tmp_path / "a.npy"), f"{tmp_path / 's.h5'}:/b", f"{tmp_path / 's.h5'}:/c"]
    out = tmp_path / "out"

    def run(*options: str) -> str:
        code = client_main(["segment-volume", *arguments, "--out", str(out), "--url", server.grpc_url, "--no-progress",
                            *options])
        assert code == 0
        return capsys.readouterr().err

    run()
    with h5py.File(out / "s_segmentation.h5", "a") as handle:
        del handle["c"]  # as if the run had been stopped before its last volume
    written = (out / "a_mask.npy").stat().st_mtime_ns
    err = run("--resume")
    assert "2 volume(s) skipped" in err and "s.h5:/c (30x41x37)" in err and "a.npy (30x41x37)" not in err
    assert (out / "a_mask.npy").stat().st_mtime_ns == written
    with h5py.File(out / "s_segmentation.h5", "r") as handle:
        for name, volume in zip("bc", volumes[1:]):
            assert np.array_equal(handle[f"{name}/mask"][()], client.segment(volume).mask)
    err = run("--resume", "--probabilities")  # another output asked for: none of them has it yet
    assert "skipped" not in err and err.count("(30x41x37) in 1 request(s)") == 3


def test_resume_segments_again_outputs_made_from_another_scan_or_with_other_settings(server, client, rng, tmp_path,
                                                                                     capsys):
    """--resume skipped a volume whenever outputs of its name were in --out: those of another
    scan of the same name (not even of its shape), or made with another overlap, were kept."""
    first, second = ct_volume((30, 41, 37), rng), ct_volume((20, 30, 25), rng)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "a" / "ct.npy", first)
    np.save(tmp_path / "b" / "ct.npy", second)
    out = tmp_path / "out"

    def run(directory: str, *options: str) -> str:
        code = client_main(["segment-volume", str(tmp_path / directory / "ct.npy"), "--out", str(out), "--url",
                            server.grpc_url, "--no-progress", *options])
        assert code == 0
        return capsys.readouterr().err

    run("a")
    err = run("b", "--resume")
    assert "skipped" not in err and f"segmenting it again, replacing its outputs in {out} (location" in err
    assert np.array_equal(np.load(out / "ct_mask.npy"), client.segment(second).mask)
    assert "1 volume(s) skipped" in run("b", "--resume")
    assert "1 volume(s) skipped" in run("b", "--resume", "--overlap", "0.25", "--blend", "gaussian")  # the defaults
    err = run("b", "--resume", "--overlap", "0.6")
    assert "skipped" not in err and "overlap 0.25 there, 0.6 now" in err
    assert np.array_equal(np.load(out / "ct_mask.npy"), client.segment(second, overlap=0.6).mask)
    (out / "ct.npy.segment-volume.json").unlink()  # as an earlier version left its outputs: skipped, as it did
    err = run("b", "--resume", "--overlap", "0.6")
    assert "1 volume(s) skipped" in err and "have no record of what they were made from" in err


def test_a_rerun_with_fewer_outputs_removes_the_earlier_ones_and_resume_takes_fewer_as_done(server, client, rng, tmp_path,
                                                                                            capsys):
    """A rerun with another overlap and no --probabilities left the earlier probabilities beside
    the new mask, disagreeing with it; --resume asking for fewer outputs than were made
    segmented the volume again ("contour True there, False now"). A file no record names (a
    user's own) stays."""
    volume = ct_volume((30, 41, 37), rng)
    np.save(tmp_path / "ct.npy", volume)
    out = tmp_path / "out"

    def run(*options: str) -> str:
        code = client_main(["segment-volume", str(tmp_path / "ct.npy"), "--out", str(out), "--url", server.grpc_url,
                            "--no-progress", *options])
        assert code == 0
        return capsys.readouterr().err

    run("--probabilities", "--contour")
    assert {p.name for p in out.glob("ct_*.npy")} == {"ct_mask.npy", "ct_probabilities.npy", "ct_contour.npy"}
    err = run("--resume", "--contour")  # fewer outputs asked for than were made: done
    assert "1 volume(s) skipped" in err and "segmenting it again" not in err, err
    err = run("--overlap", "0.6", "--contour")
    assert f"removed {out / 'ct_probabilities.npy'}, an earlier run's output not made now" in err
    assert {p.name for p in out.glob("ct_*.npy")} == {"ct_mask.npy", "ct_contour.npy"}
    assert np.array_equal(np.load(out / "ct_mask.npy"), client.segment(volume, overlap=0.6).mask)
    err = run("--overlap", "0.6")
    assert "removed" in err and {p.name for p in out.glob("ct_*.npy")} == {"ct_mask.npy"}
    np.save(out / "ct_probabilities.npy", np.zeros(3))  # the user's own: the record names no probabilities
    assert "removed" not in run("--overlap", "0.6") and (out / "ct_probabilities.npy").exists()


def test_resume_segments_again_a_volume_whose_outputs_another_input_wrote_over(server, client, rng, tmp_path, capsys):
    """scan.nii.gz, then scan.nii (another scan) into one --out: both write scan_mask.nii.gz.
    --resume of the first skipped it, its record intact, though the mask was the second's."""
    nibabel = pytest.importorskip("nibabel")
    first, second = ct_volume((30, 41, 37), rng), ct_volume((30, 41, 37), rng)
    nibabel.save(nibabel.Nifti1Image(first, np.eye(4)), tmp_path / "scan.nii.gz")
    nibabel.save(nibabel.Nifti1Image(second, np.eye(4)), tmp_path / "scan.nii")
    out = tmp_path / "out"

    def run(name: str, *options: str) -> str:
        code = client_main(["segment-volume", str(tmp_path / name), "--out", str(out), "--url", server.grpc_url,
                            "--no-progress", *options])
        assert code == 0
        return capsys.readouterr().err

    run("scan.nii.gz")
    assert "1 volume(s) skipped" in run("scan.nii.gz", "--resume")
    run("scan.nii")
    err = run("scan.nii.gz", "--resume")
    assert "skipped" not in err and "(scan_mask.nii.gz written since by another run)" in err, err
    mask = np.asanyarray(nibabel.load(out / "scan_mask.nii.gz").dataobj)
    assert np.array_equal(mask, client.segment(first).mask)


def test_resume_takes_the_outputs_of_segment_frame_by_frame_for_no_volumes(server, client, rng, tmp_path, capsys):
    """`segment ct.tif` (the 2D network, frame by frame) writes ct_mask.tif, a volume's name:
    `segment-volume ct.tif --resume` took it for an earlier version's volume output and kept it."""
    import tifffile

    volume = ct_volume((30, 41, 37), rng)
    tifffile.imwrite(tmp_path / "ct.tif", volume)
    out = tmp_path / "out"
    assert client_main(["segment", str(tmp_path / "ct.tif"), "--out", str(out), "--url", server.grpc_url, "--no-progress"]) == 0
    assert (out / "ct_mask.tif").exists() and (out / "ct.segment.json").exists()
    capsys.readouterr()
    code = client_main(["segment-volume", str(tmp_path / "ct.tif"), "--resume", "--out", str(out), "--url", server.grpc_url,
                        "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "skipped" not in err and "were made frame by frame by `segment` (ct.segment.json)" in err, err
    assert np.array_equal(tifffile.imread(out / "ct_mask.tif"), client.segment(volume).mask)
    (out / "ct.segment.json").unlink()  # and back: segment takes segment-volume's outputs for its own
    assert client_main(["segment", str(tmp_path / "ct.tif"), "--out", str(out), "--url", server.grpc_url, "--no-progress"]) == 0


def test_the_progress_bar_counts_chunks_from_its_total_and_volumes_of_the_batch(server, rng, tmp_path, capsys):
    """It showed "0chunk [00:00, ?chunk/s]" until the total was known, and no volume count."""
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", ct_volume((20, 30, 25), rng))
    code = client_main(["segment-volume", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out", str(tmp_path / "out"),
                        "--url", server.grpc_url])
    err = capsys.readouterr().err
    assert code == 0 and "0chunk" not in err, err
    assert "1/2 a.npy:   0%|" in err and "| 0/1 [" in err and "2/2 b.npy: " in err, err


def test_a_file_at_an_outputs_name_that_segment_volume_did_not_write_is_replaced_only_with_overwrite(server, client, rng,
                                                                                                    tmp_path, capsys):
    """A ground-truth a_mask.nii.gz beside a.nii.gz, with --out the scans' own directory, was
    replaced without a word. Outputs this tool wrote are replaced by a rerun, as before."""
    nibabel = pytest.importorskip("nibabel")
    volume = ct_volume((30, 41, 37), rng)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "a.nii.gz")
    truth = tmp_path / "a_mask.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.ones((30, 41, 37), np.uint8), np.eye(4)), truth)
    before = truth.read_bytes()

    def run(*options: str) -> tuple[int, str]:
        code = client_main(["segment-volume", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path), "--url", server.grpc_url,
                            "--no-progress", *options])
        return code, capsys.readouterr().err

    code, err = run()
    assert code == 1 and f"client: error: {truth}: in --out at an output's name, and no record there says" in err, err
    assert "add --overwrite to replace it" in err and "request(s)" not in err and truth.read_bytes() == before
    assert run("--overwrite")[0] == 0
    assert np.array_equal(np.asanyarray(nibabel.load(truth).dataobj), client.segment(volume).mask)
    code, err = run("--overlap", "0.5", "--probabilities")  # its own outputs: replaced as before
    assert code == 0 and (tmp_path / "a_probabilities.nii.gz").exists(), err


def test_volumes_the_network_cannot_take_are_refused_once_named_with_what_to_do(server, client, rng, tmp_path, capsys):
    """A 4D NIfTI of 3 time points was sent, then refused as "takes 1 channel(s), IMAGE has 3";
    an HDF5 dataset of one slice was named twice ("tomo.h5:/entry/flat: tomo.h5:/entry/flat: ...")."""
    nibabel = pytest.importorskip("nibabel")
    h5py = pytest.importorskip("h5py")
    series = nibabel.Nifti1Image(np.stack([ct_volume((20, 30, 25), rng) for _ in range(3)], axis=-1), np.eye(4))
    series.header.set_xyzt_units("mm", "sec")
    nibabel.save(series, tmp_path / "t3.nii.gz")
    with h5py.File(tmp_path / "tomo.h5", "w") as handle:
        handle["entry/flat"] = np.zeros((31, 61), np.uint16)
    np.save(tmp_path / "two.npy", np.zeros((2, 20, 30, 25), np.uint16))
    network = client.network_info().name
    code = client_main(["segment-volume", str(tmp_path / "t3.nii.gz"), f"{tmp_path / 'tomo.h5'}:/entry/flat",
                        str(tmp_path / "two.npy"), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert (f"client: error: {tmp_path / 't3.nii.gz'}: 3 volumes along its 4th axis (NIfTI: time points, or channels); "
            f"network {network!r} takes 1 channel(s); segment one at a time: split them, e.g. with "
            "nibabel.funcs.four_to_three\n") in err
    assert f"client: error: {tmp_path / 'tomo.h5'}:/entry/flat: expected a 3D volume, got shape [31, 61]; one image" in err
    # Not nibabel's advice for an array (it was given for every kind)
    assert (f"client: error: {tmp_path / 'two.npy'}: 2 volumes along the first axis of shape [2, 20, 30, 25]; network "
            f"{network!r} takes 1 channel(s); segment one at a time: save each channel as a volume of its own") in err


def test_an_output_directory_that_cannot_be_written_is_refused_before_any_volume_is_read(server, rng, tmp_path, capsys):
    """Each volume was read and segmented, then failed to be written."""
    np.save(tmp_path / "a.npy", ct_volume((20, 30, 25), rng))
    (tmp_path / "results").write_text("a file where the output directory's parent should be")
    out = tmp_path / "results" / "masks"
    code = client_main(["segment-volume", str(tmp_path / "a.npy"), str(tmp_path / "a.npy").replace("a.npy", "b.npy"),
                        "--out", str(out), "--url", server.grpc_url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err == f"client: error: --out {out}: cannot write there (Not a directory)\n", err


def test_tiff_masks_keep_the_voxel_sizes_of_their_scans(server, client, rng, tmp_path, capsys):
    """An ImageJ stack's spacing and unit and an OME-TIFF's physical sizes were dropped: in Fiji
    the mask did not overlay its scan at the scan's scale."""
    import tifffile

    volume = ct_volume((30, 41, 37), rng)
    tifffile.imwrite(tmp_path / "ij.tif", volume, imagej=True, resolution=(10 / 7, 10 / 7),
                     metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "scan.ome.tif", volume, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "PhysicalSizeZ": 2.0})
    code = client_main(["segment-volume", str(tmp_path / "ij.tif"), str(tmp_path / "scan.ome.tif"), "--probabilities",
                        "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    expected = client.segment(volume).mask
    for name, spacing, pixel_size in [("ij", 2.5, 0.7), ("scan", 2.0, 0.65)]:  # scan.ome.tif: stem "scan"
        with tifffile.TiffFile(tmp_path / "out" / f"{name}_mask.tif") as mask:
            assert np.array_equal(mask.asarray(), expected)
            assert mask.imagej_metadata["spacing"] == spacing and mask.imagej_metadata["unit"] == "um"
            x_resolution = mask.pages.first.tags["XResolution"].value
            assert x_resolution[0] / x_resolution[1] == pytest.approx(1 / pixel_size, rel=1e-6)
        with tifffile.TiffFile(tmp_path / "out" / f"{name}_probabilities.tif") as probabilities:
            assert probabilities.series[0].shape == (3, *volume.shape)
            x_resolution = probabilities.pages.first.tags["XResolution"].value
            assert x_resolution[0] / x_resolution[1] == pytest.approx(1 / pixel_size, rel=1e-6)
            # Pixels per µm: no unit TIFF names (tifffile's default, inch, would be 25400 times off).
            assert probabilities.pages.first.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE


def test_a_directory_of_tiff_slices_is_one_volume(server, client, rng, tmp_path, capsys):
    """A reconstruction's slices, one TIFF each (z_2 before z_10), were refused as an unsupported
    file; given one by one, each slice failed as "expected a 3D volume"."""
    import tifffile

    volume = ct_volume((12, 41, 37), rng)
    (tmp_path / "recon").mkdir()
    for z, image in enumerate(volume):
        tifffile.imwrite(tmp_path / "recon" / f"z_{z}.tif", image, resolution=(1 / 0.65, 1 / 0.65))
    code = client_main(["segment-volume", str(tmp_path / "recon"), "--out", str(tmp_path / "out"), "--url", server.grpc_url,
                        "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with tifffile.TiffFile(tmp_path / "out" / "recon_mask.tif") as mask:
        assert np.array_equal(mask.asarray(), client.segment(volume).mask)
        x_resolution = mask.pages.first.tags["XResolution"].value
        assert x_resolution[0] / x_resolution[1] == pytest.approx(1 / 0.65, rel=1e-6)
    tifffile.imwrite(tmp_path / "recon" / "z_12.tif", volume[0, :40])
    assert client_main(["segment-volume", str(tmp_path / "recon"), "--out", str(tmp_path / "out"), "--url",
                        server.grpc_url, "--no-progress"]) == 1
    assert ("z_12.tif: shape [40, 37] int16, where z_0.tif is [41, 37] int16; the slices of a volume are 2D images "
            "of one shape and type") in capsys.readouterr().err
