"""The CLI reads TIFF, PNG and NPY frames and writes masks, probabilities and overlays."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.__main__ import main as client_main
from client.api import NetworkInfo, SegmentationClient, SegmentationError
from segserve.launcher import REPO_ROOT
from tests.conftest import DEFAULT_NETWORK, DEFAULT_NETWORK_3D, SECOND_NETWORK, Endpoint
from tests.helpers import environment_without_token, without_token
from training.synthetic import synthetic_slice, to_detector_counts


def test_cli_segments_each_file_type(server, tmp_path, rng):
    image, _ = synthetic_slice((203, 311), rng)
    tifffile.imwrite(tmp_path / "a.tif", to_detector_counts(image, np.uint16, rng))
    Image.fromarray(to_detector_counts(image, np.uint8, rng)).convert("RGB").save(tmp_path / "b.png")
    np.save(tmp_path / "c.npy", image)
    out = tmp_path / "out"
    code = client_main(["segment", str(tmp_path / "a.tif"), str(tmp_path / "b.png"), str(tmp_path / "c.npy"),
                        "--out", str(out), "--url", server.grpc_url, "--probabilities", "--contour"])
    assert code == 0
    for stem in "abc":
        mask = tifffile.imread(out / f"{stem}_mask.tif")
        assert mask.shape == (203, 311) and mask.dtype == np.uint8
        assert tifffile.imread(out / f"{stem}_probabilities.tif").shape == (3, 203, 311)
        assert tifffile.imread(out / f"{stem}_contour.tif").shape == (203, 311)
        assert Image.open(out / f"{stem}_overlay.png").size == (311, 203)
    with SegmentationClient(server.grpc_url) as client:
        assert np.array_equal(client.segment(image).mask, tifffile.imread(out / "c_mask.tif"))


def test_cli_reports_a_bad_file_and_goes_on(server, tmp_path, rng, capsys):
    np.save(tmp_path / "good.npy", rng.random((64, 64), dtype=np.float32))
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    code = client_main(["segment", str(tmp_path / "bad.npy"), str(tmp_path / "good.npy"), "--out", str(tmp_path / "out"),
                        "--url", server.grpc_url, "--no-overlay"])
    assert code == 1
    captured = capsys.readouterr()
    assert "client: error: " in captured.err and "bad.npy" in captured.err.split("client: error: ", 1)[1]
    assert "error" not in captured.out, "stdout lists written files only; errors go to stderr"
    assert "good.npy -> " in captured.out
    assert (tmp_path / "out" / "good_mask.tif").exists()


def test_cli_reports_server_errors_in_one_line(server, tmp_path, rng, capsys):
    np.save(tmp_path / "f.npy", rng.random((64, 64), dtype=np.float32))
    code = client_main(["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path), "--url", server.grpc_url, "--overlap", "1.5"])
    assert code == 1
    captured = capsys.readouterr()
    error_lines = [line for line in captured.err.splitlines() if line.startswith("client: error: ")]
    assert len(error_lines) == 1 and "overlap must be in [0, 1)" in error_lines[0]
    assert "overlap" not in captured.out


def unreadable_inputs(tmp_path) -> list[tuple[str, str, str]]:
    """(command, input argument, what the one-line error names) for files a reader trips on."""
    import gzip

    import h5py

    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    nifti = gzip.compress(b"\x5c\x01" + bytes(400))
    (tmp_path / "cut.nii.gz").write_bytes(nifti[: len(nifti) // 2])
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "good.nii.gz")
    whole = (tmp_path / "good.nii.gz").read_bytes()
    flipped = bytes(b ^ 0xFF for b in whole[22:38])  # zlib.error (a corrupt deflate stream)
    (tmp_path / "bad.nii.gz").write_bytes(whole[:22] + flipped + whole[38:])
    with h5py.File(tmp_path / "s.h5", "w") as file:
        file["entry/data"] = np.zeros((2, 32, 32), np.uint16)
    empty, h5 = str(tmp_path / "empty.npy"), str(tmp_path / "s.h5")
    return [("segment", empty, "empty.npy: empty or truncated .npy"),
            ("segment-volume", empty, "empty.npy: empty or truncated .npy"),
            ("segment-dataset", empty, "empty.npy: empty or truncated .npy"),
            ("segment-volume", str(tmp_path / "empty.nii.gz"), "empty.nii.gz: not a readable NIfTI file"),
            ("segment-volume", str(tmp_path / "cut.nii.gz"), "cut.nii.gz: not a readable NIfTI file"),
            ("segment-volume", str(tmp_path / "bad.nii.gz"), "bad.nii.gz: not a readable NIfTI file"),
            ("segment-dataset", f"{h5}:/entry/nothere", "s.h5: no dataset '/entry/nothere'"),
            ("segment-dataset", f"{h5}:/entry", "s.h5: '/entry' is a group, not a dataset; its datasets: data")]


def test_unreadable_inputs_fail_in_one_line_naming_the_file(server, tmp_path, capsys):
    for command, argument, message in unreadable_inputs(tmp_path):
        model = ["--model", "segment_3d"] if command == "segment-volume" else []
        code = client_main([command, argument, "--out", str(tmp_path / f"out-{command}.zarr"), "--url", server.grpc_url,
                            "--no-progress", *model])
        err = capsys.readouterr().err
        assert code == 1 and message in err and "Traceback" not in err, (command, argument, err)


@pytest.mark.parametrize("argument, reason", [(["--inflight", "100000"], "--inflight must be in 1..256, got 100000"),
                                              (["--url", "localhost:abc"], "the port must be a number"),
                                              (["--overlay-max-size", "-5"], "--overlay-max-size must be >= 1"),
                                              (["--out", "f.npy"], "is a file; --out names a directory")])
def test_cli_refuses_out_of_range_settings_before_any_request(argument, reason, tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.zeros((8, 8), np.float32))
    argument = [str(tmp_path / a) if a == "f.npy" else a for a in argument]
    try:
        code = client_main(["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path), *argument])
    except SystemExit as exit_:  # argparse's refusal
        code = exit_.code
    assert code in (1, 2) and reason in capsys.readouterr().err


@pytest.mark.parametrize("argument, reason", [(["--inflight", "0"], "--inflight must be in 1..256, got 0"),
                                              (["--retries", "-1"], "--retries must be >= 0, got -1"),
                                              (["--task-retries", "-1"], "--task-retries must be >= 0, got -1"),
                                              (["--workers", "0"], "--workers must be >= 1, got 0"),
                                              (["--block", "-1", "8", "8"], "--block extents must be >= 0"),
                                              (["--resume", "--overwrite"], "--resume and --overwrite exclude each other")])
def test_segment_dataset_refuses_out_of_range_settings_before_any_work(argument, reason, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        client_main(["segment-dataset", str(tmp_path / "in.zarr"), "--out", str(tmp_path / "out.zarr"), *argument])
    assert exit_.value.code == 2 and reason in capsys.readouterr().err


def test_inputs_that_would_write_the_same_output_are_refused_before_anything_is_written(server, tmp_path, rng,
                                                                                      capsys):
    """Two frames of one stem, two stacks of one name, a directory's outputs among its frames,
    and a stack's record continued by another file of the same name: refused in one line, and
    an earlier result stays as it was."""
    frames = tmp_path / "frames"
    frames.mkdir()
    np.save(frames / "a.npy", rng.random((40, 40), dtype=np.float32))
    tifffile.imwrite(frames / "a.tif", rng.random((40, 40), dtype=np.float32))
    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "b.npy", rng.random((40, 40), dtype=np.float32))
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "stack.npy", rng.integers(0, 4000, (3, 40, 40), dtype=np.uint16))
    import h5py

    h5 = tmp_path / "scan.h5"
    with h5py.File(h5, "w") as file:  # two datasets whose names give one record name
        file["entry/data"] = file["entry_data"] = rng.integers(0, 4000, (2, 40, 40), dtype=np.uint16)
    out = tmp_path / "out"
    common = ["--url", server.grpc_url, "--no-progress", "--no-overlay"]
    assert client_main(["segment", str(tmp_path / "one" / "stack.npy"), "--out", str(out), *common]) == 0
    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [([str(frames)], out, f"{frames / 'a.npy'} and {frames / 'a.tif'} would both write {out / 'frames' / 'a_mask.tif'}"),
             ([str(tmp_path / n / "stack.npy") for n in ("one", "two")] + ["--overwrite"], out,
              f"{tmp_path / 'one' / 'stack.npy'} and {tmp_path / 'two' / 'stack.npy'} would both write {out}"),
             ([str(scans)], tmp_path, f"--out would put outputs among the frames of the input {scans}"),
             ([str(tmp_path / "two" / "stack.npy"), "--resume"], out, "location"),
             ([str(tmp_path / "one" / "stack.npy"), str(tmp_path / "one" / ".." / "one" / "stack.npy")], out,
              "stack.npy is given twice"),
             ([f"{h5}:/entry/data", f"{h5}:/entry_data"], out,
              f"{h5}:/entry/data and {h5}:/entry_data would both write {out / 'scan_entry_data.segment.json'}")]
    for arguments, destination, message in cases:
        capsys.readouterr()
        assert client_main(["segment", *arguments, "--out", str(destination), *common]) == 1, arguments
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (arguments, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished
    assert sorted(p.name for p in frames.iterdir()) == ["a.npy", "a.tif"] and [p.name for p in scans.iterdir()] == ["b.npy"]


def test_a_directory_named_dot_or_dotdot_is_written_under_its_own_name_and_its_appledouble_files_skipped(
        server, tmp_path, rng, monkeypatch, capsys):
    """``segment ..`` wrote its masks beside --out (``out/../f00_mask.tif``), ``segment .`` into
    --out itself; ``._f00.tif``, macOS's metadata beside f00.tif on a share, failed as a frame."""
    run = tmp_path / "run1"
    (run / "notes").mkdir(parents=True)
    frames = rng.random((2, 40, 44), dtype=np.float32)
    for index, frame in enumerate(frames):
        tifffile.imwrite(run / f"f{index:02d}.tif", frame)
    (run / "._f00.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    common = ["--url", server.grpc_url, "--no-progress", "--no-overlay"]
    with SegmentationClient(server.grpc_url) as client:
        expected = [client.segment(frame).mask for frame in frames]
    for working_directory, argument, out in ((run / "notes", "..", tmp_path / "out_dotdot"),
                                              (run, ".", tmp_path / "out_dot")):
        monkeypatch.chdir(working_directory)
        assert client_main(["segment", argument, "--out", str(out), *common]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in (out / "run1").iterdir()) == ["f00_mask.tif", "f01_mask.tif", "segment-log.jsonl"]
        for index in range(2):
            assert np.array_equal(tifffile.imread(out / "run1" / f"f{index:02d}_mask.tif"), expected[index])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_dot", "out_dotdot", "run1"]
    (tmp_path / "scans").symlink_to(run)  # a link's outputs keep the link's name (resolving it renamed them)
    monkeypatch.chdir(tmp_path)
    assert client_main(["segment", "scans", "--out", str(tmp_path / "out_link"), *common]) == 0, capsys.readouterr().err
    assert (tmp_path / "out_link" / "scans" / "f00_mask.tif").exists()


def test_tiff_outputs_of_frames_and_stacks_keep_the_pixel_sizes_of_their_inputs(server, tmp_path, rng, capsys):
    """2D masks had no pixel size (segment-volume's kept it): particles measured on a mask in
    Fiji came out in pixels, not in the image's µm."""
    frame = rng.integers(0, 4000, (60, 70), dtype=np.uint16)
    stack = rng.integers(0, 4000, (3, 60, 70), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "cells.tif", frame, imagej=True, resolution=(10 / 7, 10 / 7), metadata={"unit": "um"})
    tifffile.imwrite(tmp_path / "plain.tif", frame, resolution=(300, 300), resolutionunit=tifffile.RESUNIT.CENTIMETER)
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, resolution=(2, 2),
                     metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"})
    out = tmp_path / "out"
    assert client_main(["segment", *(str(tmp_path / n) for n in ("cells.tif", "plain.tif", "stack.tif")), "--out", str(out),
                        "--probabilities", "--contour", "--url", server.grpc_url, "--no-progress", "--no-overlay"]) == 0, \
        capsys.readouterr().err
    with SegmentationClient(server.grpc_url) as client:
        expected = client.segment(frame, probabilities=True)
        expected_stack = np.stack([client.segment(f).mask for f in stack])

    def pixels_per_unit(tiff: tifffile.TiffFile) -> float:
        numerator, denominator = tiff.pages.first.tags["XResolution"].value
        return numerator / denominator

    for output in ("mask", "probabilities", "contour"):
        with tifffile.TiffFile(out / f"cells_{output}.tif") as tiff:
            assert tiff.imagej_metadata["unit"] == "um" and pixels_per_unit(tiff) == pytest.approx(10 / 7, rel=1e-6)
            if output != "contour":
                assert np.allclose(tiff.asarray(), getattr(expected, output), atol=1e-6)
        with tifffile.TiffFile(out / f"plain_{output}.tif") as tiff:
            assert pixels_per_unit(tiff) == pytest.approx(300, rel=1e-6)
            assert tiff.pages.first.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    for output, shape in (("mask", stack.shape), ("probabilities", (3, 3, 60, 70))):
        with tifffile.TiffFile(out / f"stack_{output}.tif") as tiff:
            assert tiff.series[0].shape == shape and pixels_per_unit(tiff) == pytest.approx(2, rel=1e-6)
            assert tiff.imagej_metadata["spacing"] == 2.5 and tiff.imagej_metadata["unit"] == "um"
    assert np.array_equal(tifffile.imread(out / "stack_mask.tif"), expected_stack)


def test_a_pipeline_or_a_3d_network_given_as_the_network_is_named_as_not_a_2d_network(server, tmp_path, capsys):
    """``--network segment_3d`` got "network 'segment_3d' must have one input and one output"."""
    np.save(tmp_path / "f.npy", np.zeros((40, 40), np.float32))
    for network in ("segment_3d", DEFAULT_NETWORK_3D):
        code = client_main(["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path / "out"), "--network", network,
                            "--url", server.grpc_url])
        err = capsys.readouterr().err
        assert code == 1 and f"network {network!r} on {server.grpc_url} is not a 2D network (a pipeline? a network " \
            f"of other dimensions?); loaded 2D networks: " in err and DEFAULT_NETWORK in err, err
    endpoint = Endpoint("grpc", server)  # a request of one's own: the server says so too
    with pytest.raises(InferenceServerException, match="model 'segment_3d' is not a network .* the networks here: .*"
                       + DEFAULT_NETWORK):
        endpoint.infer({"IMAGE": np.zeros((1, 40, 40), np.float32)}, parameters={"network": "segment_3d"})
    endpoint.client.close()


def test_cli_without_server_says_so(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.zeros((8, 8), np.float32))
    assert client_main(["segment", str(tmp_path / "f.npy"), "--url", "127.0.0.1:1"]) == 1
    assert "not ready" in capsys.readouterr().err


def test_http_to_the_grpc_port_is_pointed_to_the_ports(server, tmp_path, capsys):
    """It said only "is the server running?", with the server running on the next port."""
    np.save(tmp_path / "f.npy", np.zeros((8, 8), np.float32))
    assert client_main(["segment", str(tmp_path / "f.npy"), "--url", server.grpc_url, "--transport", "http"]) == 1
    assert f"is not ready at {server.grpc_url} (is the server running? `make serve`; is that its HTTP port? " \
        in capsys.readouterr().err


def test_cli_help_documents_every_option():
    help_text = subprocess.run([sys.executable, "-m", "client", "segment", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--url", "--network", "--overlap", "--blend", "--sw-batch-size", "--intensity-min", "--intensity-max",
                   "--keep-largest", "--probabilities", "--contour", "--format", "--no-overlay", "--timeout", "--debug"):
        assert option in help_text


def test_api_without_token_reads_what_it_needs_and_segments(server, monkeypatch, rng):
    """Inference needs no token: network, tile, classes and spatial dims come from open
    endpoints (metadata, statistics). With two 2D networks loaded (this session's server) the
    default cannot be told apart without the token: a clear error naming them."""
    without_token(monkeypatch)
    frame = rng.random((70, 90), dtype=np.float32)
    with SegmentationClient(server.grpc_url, network=DEFAULT_NETWORK) as client:
        assert client.network_info() == NetworkInfo(DEFAULT_NETWORK, 1, 3, (128, 128))
        result = client.segment(frame, probabilities=True)
    with SegmentationClient(server.grpc_url, token=server.config.token) as client:
        assert np.array_equal(client.segment(frame).mask, result.mask)
    with SegmentationClient(server.http_url, transport="http", model="segment_3d") as client:  # one 3D network
        assert client.network_info().name == DEFAULT_NETWORK_3D and client.spatial_dims() == 3
    with SegmentationClient(server.grpc_url) as client:
        with pytest.raises(SegmentationError, match=f"2 2D networks loaded: {SECOND_NETWORK}, {DEFAULT_NETWORK}.*--network"):
            client.network_info()


def test_cli_without_token_segments_a_frame_and_a_volume(server, tmp_path, rng):
    image, _ = synthetic_slice((150, 170), rng)
    np.save(tmp_path / "frame.npy", image)
    np.save(tmp_path / "ct.npy", rng.integers(-1000, 400, (40, 50, 60), dtype=np.int16))
    env = environment_without_token(tmp_path)
    frame = subprocess.run([sys.executable, "-m", "client", "segment", str(tmp_path / "frame.npy"), "--out", str(tmp_path / "out"),
                            "--url", server.grpc_url, "--network", DEFAULT_NETWORK, "--contour", "--no-progress"],
                           capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert frame.returncode == 0, frame.stderr
    volume = subprocess.run([sys.executable, "-m", "client", "segment-volume", str(tmp_path / "ct.npy"), "--out",
                             str(tmp_path / "out"), "--url", server.grpc_url, "--no-progress"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert volume.returncode == 0, volume.stderr
    with SegmentationClient(server.grpc_url, network=DEFAULT_NETWORK) as client:
        assert np.array_equal(tifffile.imread(tmp_path / "out" / "frame_mask.tif"), client.segment(image).mask)


@pytest.mark.parametrize(("command", "options", "refusal"), [
    ("segment-volume", ["--intensity-min", "-1000"], "--intensity-min and --intensity-max go together"),
    ("segment", ["--intensity-max", "300"], "--intensity-min and --intensity-max go together"),
    ("segment-volume", ["--intensity-min", "5", "--intensity-max", "1"], "--intensity-min must be below --intensity-max, got 5 and 1"),
    ("segment-volume", ["--max-chunk-voxels", "0"], "--max-chunk-voxels must be >= 1, got 0"),
    ("segment-volume", ["--chunk-shape", "64", "-1", "0"], "--chunk-shape extents must be >= 0 (0: the whole axis), got 64 -1 0"),
    ("segment-volume", ["--chunk-overlap", "-2"], "--chunk-overlap must be >= 0, got -2"),
])
def test_bad_options_are_refused_once_naming_the_flag_before_any_input_is_read(tmp_path, command, options, refusal):
    """They were refused once per volume, each read first, in the API's or the server's words
    ("max_voxels must be >= 1", "intensity_min and intensity_max must be given together")."""
    inputs = [str(tmp_path / f"{name}.npy") for name in "ab"]  # never read: they do not exist
    run = subprocess.run([sys.executable, "-m", "client", command, *inputs, "--url", "127.0.0.1:1", *options],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.splitlines()[-1].startswith(f"python -m client: error: {refusal}"), run.stderr


def test_segment_volume_without_a_server_leaves_no_output_directory(tmp_path, capsys):
    np.save(tmp_path / "ct.npy", np.zeros((8, 8, 8), np.int16))
    assert client_main(["segment-volume", str(tmp_path / "ct.npy"), "--out", str(tmp_path / "out"), "--url",
                        "127.0.0.1:1", "--patience", "0"]) == 1
    assert "not ready" in capsys.readouterr().err and not (tmp_path / "out").exists()
