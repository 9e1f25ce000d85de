"""The streaming CLI on stacks: order, containers, failures, interruption, resume, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import tifffile

from client.__main__ import main as client_main
from client.api import SegmentationClient
from client.stacks import FAILED_VALUE
from segserve.launcher import REPO_ROOT
from tests.conftest import DEFAULT_NETWORK, SECOND_NETWORK
from tests.helpers import cli, make_stack, our_dev_shm_entries, reference_masks, registered_regions, wait_for_record


def test_100_frame_tiff_stack_over_shm_in_order_with_progress(server, tmp_path, rng):
    stack = make_stack(rng, 100, (61, 97))
    tifffile.imwrite(tmp_path / "run.tif", stack, compression="zlib", photometric="minisblack")
    done = subprocess.run(cli(server, str(tmp_path / "run.tif"), "--out", str(tmp_path / "out"), "--inflight", "4",
                              transport="shm"), capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "100/100" in done.stderr and "frame/s" in done.stderr  # the progress bar
    assert "100 written, 0 failed" in done.stderr
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "run_mask.tif"), reference_masks(server, stack))
    assert our_dev_shm_entries() == [] and registered_regions(server) == []


def test_killed_client_is_cleaned_up_by_the_next_run_which_resumes(server, tmp_path, rng):
    stack = make_stack(rng, 40, (200, 230))
    np.save(tmp_path / "scan.npy", stack)
    out, record = tmp_path / "out", tmp_path / "out" / "scan.segment.json"
    args = cli(server, str(tmp_path / "scan.npy"), "--out", str(out), "--inflight", "2", "--no-progress", transport="shm")
    # Its own session, so SIGKILL takes the resource tracker too: nothing tidies up after it.
    victim = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, start_new_session=True)
    wait_for_record(record, 5, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    written_before = json.loads(record.read_text())["done"]
    assert written_before < 40
    left = [name for name in registered_regions(server) if f"_{victim.pid}_" in name]
    assert left, "the killed client should have left registered regions behind"

    # The next run cleans up first, then refuses to overwrite the interrupted run's output.
    refused = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert refused.returncode == 1 and "add --resume to continue" in refused.stderr
    assert f"removed {len(left)} shared-memory region(s) left by an earlier run" in refused.stderr
    assert our_dev_shm_entries() == [] and registered_regions(server) == []

    with_progress = [arg for arg in args if arg != "--no-progress"]
    resumed = subprocess.run(with_progress + ["--resume"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written_before} skipped" in resumed.stderr
    assert f"| {written_before}/40 [" in resumed.stderr and "| 40/40 [" in resumed.stderr  # the bar counts the whole stack
    assert np.array_equal(np.load(out / "scan_mask.npy"), reference_masks(server, stack))
    assert our_dev_shm_entries() == [] and registered_regions(server) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_stream_unregisters_and_keeps_what_was_written(server, tmp_path, rng, signum):
    """Exit code 128 + the signal's number (SIGTERM exited 130, as Ctrl-C)."""
    stack = make_stack(rng, 40, (200, 230))
    tifffile.imwrite(tmp_path / "scan.tif", stack, photometric="minisblack")
    out, record = tmp_path / "out", tmp_path / "out" / "scan.segment.json"
    args = cli(server, str(tmp_path / "scan.tif"), "--out", str(out), "--inflight", "3", "--no-progress", transport="shm")
    interrupted = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    wait_for_record(record, 4, interrupted)
    interrupted.send_signal(signum)
    assert interrupted.wait(timeout=60) == 128 + signum
    assert "--resume" in interrupted.stderr.read()
    assert our_dev_shm_entries() == [] and registered_regions(server) == []
    done = json.loads(record.read_text())["done"]
    masks = tifffile.imread(out / "scan_mask.partial.tif")  # unfinished: not under the output's own name
    assert not (out / "scan_mask.tif").exists()
    assert np.array_equal(masks[:done], reference_masks(server, stack[:done]))


@pytest.mark.parametrize("container", ["npy", "hdf5"])
def test_a_rerun_failing_every_frame_leaves_the_earlier_result_as_it_was(container, server, tmp_path, rng, capsys):
    """A finished stack rerun with an option the server refuses (every frame fails): the
    earlier result keeps its name and bytes; the failed run's outputs sit under partial names
    until a run finishes, which then takes the output's name and leaves no partial behind."""
    h5py = pytest.importorskip("h5py")
    stack = make_stack(rng, 3, (60, 50))
    if container == "npy":
        np.save(tmp_path / "scan.npy", stack)
        argument, out = str(tmp_path / "scan.npy"), tmp_path / "out"
    else:
        with h5py.File(tmp_path / "scan.h5", "w") as h5:
            h5.create_dataset("entry/data", data=stack)
        argument, out = f"{tmp_path / 'scan.h5'}:/entry/data", tmp_path / "out"

    def masks(partial: bool) -> np.ndarray:
        if container == "npy":
            return np.load(out / f"scan_mask{'.partial' if partial else ''}.npy")
        with h5py.File(out / "scan_segmentation.h5", "r") as h5:
            return h5[f"entry/data{'.partial' if partial else ''}/mask"][:]

    common = ["--out", str(out), "--url", server.grpc_url, "--no-progress"]
    expected = reference_masks(server, stack)
    assert client_main(["segment", argument, *common]) == 0
    assert np.array_equal(masks(partial=False), expected)
    capsys.readouterr()
    assert client_main(["segment", argument, *common, "--overlap", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "0 written, 3 failed" in err and "unfinished, so under partial names" in err, err
    assert np.array_equal(masks(partial=False), expected)
    assert (masks(partial=True) == FAILED_VALUE).all()
    assert client_main(["segment", argument, *common]) == 0  # the failed run was finished: no --overwrite
    assert np.array_equal(masks(partial=False), expected)
    with pytest.raises((FileNotFoundError, KeyError)):
        masks(partial=True)


@pytest.mark.parametrize("container", ["tiff", "hdf5"])
def test_resume_refuses_when_the_outputs_it_would_continue_are_gone(container, server, tmp_path, rng, capsys):
    """A finished HDF5 run's output file moved away: --resume made a new one, skipped every
    frame and published an all-0 mask (0 is a class) as done. An interrupted run's partial
    output deleted: --resume continued in the earlier run's file under the own name, mixing two
    runs' settings in one finished-looking stack."""
    h5py = pytest.importorskip("h5py")
    stack = make_stack(rng, 4, (60, 50))
    if container == "tiff":
        tifffile.imwrite(tmp_path / "scan.tif", stack)
        argument, output, record = str(tmp_path / "scan.tif"), "scan_mask.tif", "scan.segment.json"
    else:
        with h5py.File(tmp_path / "scan.h5", "w") as h5:
            h5.create_dataset("entry/data", data=stack)
        argument, output, record = f"{tmp_path / 'scan.h5'}:/entry/data", "scan_segmentation.h5", "scan_entry_data.segment.json"
    out = tmp_path / "out"
    common = ["segment", argument, "--out", str(out), "--url", server.grpc_url, "--no-progress"]
    assert client_main(common) == 0
    # Killed after its record said finished, before it renamed its outputs: --resume publishes them.
    if container == "tiff":
        (out / output).rename(out / "scan_mask.partial.tif")
    else:
        with h5py.File(out / output, "a") as h5:
            h5.move("entry/data", "entry/data.partial")
    assert client_main([*common, "--resume"]) == 0
    assert not (out / "scan_mask.partial.tif").exists()
    if container == "hdf5":
        with h5py.File(out / output, "r") as h5:
            assert "entry/data.partial" not in h5 and np.array_equal(h5["entry/data/mask"][()], reference_masks(server, stack))
    kept = (out / output).read_bytes()
    saved = json.loads((out / record).read_text())
    (out / record).write_text(json.dumps({**saved, "done": 2}))  # as an interrupted later run left it
    capsys.readouterr()
    assert client_main([*common, "--resume"]) == 1  # its partial outputs are not there
    err = capsys.readouterr().err
    assert "client: error: --resume: the outputs of the run it continues are gone (" in err, err
    assert "add --overwrite (instead of --resume) to start again" in err and (out / output).read_bytes() == kept
    (out / record).write_text(json.dumps(saved))  # finished, and its output moved away
    (out / output).rename(tmp_path / "archived")
    assert client_main([*common, "--resume"]) == 1
    assert f"are gone ({out / output}" in capsys.readouterr().err and not (out / output).exists()


def test_resume_segments_again_an_image_written_since(server, tmp_path, rng, capsys):
    """Beamlines reuse file names: an image re-acquired under its name was skipped by --resume,
    its mask the old acquisition's."""
    first, second = make_stack(rng, 2, (60, 50))
    tifffile.imwrite(tmp_path / "frame.tif", first)
    out = tmp_path / "out"
    command = ["segment", str(tmp_path / "frame.tif"), "--out", str(out), "--url", server.grpc_url, "--no-progress",
               "--no-overlay"]
    assert client_main(command) == 0
    assert client_main([*command, "--resume"]) == 0 and "1 skipped" in capsys.readouterr().err
    time.sleep(0.01)  # a later modification time, on any file system clock
    tifffile.imwrite(tmp_path / "frame.tif", second)
    assert client_main([*command, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "1 image(s) of files written from another input or with other settings are segmented again" in err, err
    assert np.array_equal(tifffile.imread(out / "frame_mask.tif"), reference_masks(server, [second])[0])


def test_resume_refuses_to_continue_a_stack_acquired_again_under_its_name(server, tmp_path, rng, capsys):
    """A stack re-acquired under its name was continued by --resume: its first frames kept the
    earlier acquisition's masks. (A failed frame fixed in place is still continued:
    test_a_stack_run_record_names_the_network_the_default_resolved_to.)"""
    first, second = make_stack(rng, 4, (60, 50)), make_stack(rng, 4, (60, 50))
    tifffile.imwrite(tmp_path / "scan.tif", first)
    out = tmp_path / "out"
    command = ["segment", str(tmp_path / "scan.tif"), "--out", str(out), "--url", server.grpc_url, "--no-progress"]
    assert client_main(command) == 0
    record = json.loads((out / "scan.segment.json").read_text())
    assert record["witness"]["frame"] == 0
    (out / "scan.segment.json").write_text(json.dumps({**record, "done": 2}))  # as an interrupted run left it
    (out / "scan_mask.tif").rename(out / "scan_mask.partial.tif")
    kept = (out / "scan_mask.partial.tif").read_bytes()
    tifffile.imwrite(tmp_path / "scan.tif", second)
    capsys.readouterr()
    assert client_main([*command, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "scan.tif: frame 0 is not the one the run it continues segmented (acquired again under this name? written " \
        "over?); add --overwrite (instead of --resume) to segment it again" in err, err
    assert (out / "scan_mask.partial.tif").read_bytes() == kept
    assert client_main([*command, "--overwrite"]) == 0
    assert np.array_equal(tifffile.imread(out / "scan_mask.tif"), reference_masks(server, second))


def test_resume_naming_the_servers_defaults_continues_the_run_that_named_none(server, tmp_path, rng, capsys):
    """``--resume --overlap 0.25 --blend gaussian`` (the server's defaults, named) was refused
    for a stack ("overlap None there, 0.25 now") and segmented every image of a directory
    again; the tiles per network call change the speed only, and are not compared either."""
    stack = make_stack(rng, 3, (60, 50))
    tifffile.imwrite(tmp_path / "scan.tif", stack, photometric="minisblack")
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(stack):
        tifffile.imwrite(tmp_path / "frames" / f"f{i}.tif", frame)
    out = tmp_path / "out"
    common = ["--out", str(out), "--url", server.grpc_url, "--no-progress", "--no-overlay"]
    assert client_main(["segment", str(tmp_path / "scan.tif"), str(tmp_path / "frames"), *common]) == 0
    record = json.loads((out / "scan.segment.json").read_text())
    (out / "scan.segment.json").write_text(json.dumps({**record, "done": 1}))  # as an interrupted run left it
    (out / "scan_mask.tif").rename(out / "scan_mask.partial.tif")
    capsys.readouterr()
    named = ["--overlap", "0.25", "--blend", "gaussian", "--sw-batch-size", "3"]
    assert client_main(["segment", str(tmp_path / "scan.tif"), str(tmp_path / "frames"), *common, "--resume", *named]) == 0
    err = capsys.readouterr().err
    assert "other settings" not in err and "segmented again" not in err, err
    assert np.array_equal(tifffile.imread(out / "scan_mask.tif"), reference_masks(server, stack))
    assert client_main(["segment", str(tmp_path / "frames"), *common, "--resume", "--overlap", "0.5"]) == 0
    assert "3 image(s) of frames written from another input or with other settings" in capsys.readouterr().err


def test_files_at_output_names_that_segment_did_not_write_are_replaced_only_with_overwrite(server, tmp_path, rng, capsys):
    """A hand-drawn frame_mask.tif (or scan_mask.tif) in --out was replaced by the new mask
    without a word. The command's own outputs are replaced by a rerun, as before."""
    stack = make_stack(rng, 3, (60, 50))
    tifffile.imwrite(tmp_path / "scan.tif", stack)
    tifffile.imwrite(tmp_path / "frame.tif", stack[0])
    truths = {name: np.full((60, 50), 7, np.uint16) for name in ("frame_mask.tif", "scan_mask.tif")}
    for name, truth in truths.items():
        tifffile.imwrite(tmp_path / name, truth)

    def run(*options: str) -> tuple[int, str]:
        code = client_main(["segment", str(tmp_path / "scan.tif"), str(tmp_path / "frame.tif"), "--out", str(tmp_path),
                            "--url", server.grpc_url, "--no-progress", "--no-overlay", *options])
        return code, capsys.readouterr().err

    code, err = run()
    assert code == 1 and f"client: error: {tmp_path / 'scan_mask.tif'}, {tmp_path / 'frame_mask.tif'}: in --out at an " \
        "output's name, and neither segment-log.jsonl nor a run record there says this command wrote it" in err, err
    assert all(np.array_equal(tifffile.imread(tmp_path / name), truth) for name, truth in truths.items())
    assert not (tmp_path / "scan.segment.json").exists()
    assert run("--overwrite")[0] == 0
    expected = reference_masks(server, stack)
    assert np.array_equal(tifffile.imread(tmp_path / "scan_mask.tif"), expected)
    assert np.array_equal(tifffile.imread(tmp_path / "frame_mask.tif"), expected[0])
    assert run("--overlap", "0.5")[0] == 0  # its own outputs now


def test_a_stack_run_record_names_the_network_the_default_resolved_to(server, tmp_path, rng, capsys):
    """The record kept ``network: None`` for the server's default, so a resume after the
    default changed continued with another network, and naming the default refused the resume."""
    stack = make_stack(rng, 3, (64, 72)).astype(np.float32)
    stack[1, 5, 5] = np.nan
    np.save(tmp_path / "frames.npy", stack)
    common = [str(tmp_path / "frames.npy"), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--no-progress"]
    assert client_main(["segment", *common, "--network", DEFAULT_NETWORK]) == 1  # frame 1 failed
    record = json.loads((tmp_path / "out" / "frames.segment.json").read_text())
    assert record["settings"]["network"] == DEFAULT_NETWORK and record["failed"].keys() == {"1"}
    stack[1, 5, 5] = 0
    np.save(tmp_path / "frames.npy", stack)
    capsys.readouterr()
    assert client_main(["segment", *common, "--resume"]) == 0, capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "out" / "frames_mask.npy"), reference_masks(server, stack))
    capsys.readouterr()
    assert client_main(["segment", *common, "--resume", "--network", SECOND_NETWORK]) == 1
    assert f"network {DEFAULT_NETWORK!r} there, {SECOND_NETWORK!r} now" in capsys.readouterr().err


def test_a_malformed_frame_is_reported_and_the_others_written(server, tmp_path, rng, capsys):
    stack = make_stack(rng, 6, (90, 70)).astype(np.float32)
    stack[2, 10, 10] = np.nan
    np.save(tmp_path / "frames.npy", stack)
    code = client_main(["segment", str(tmp_path / "frames.npy"), "--out", str(tmp_path / "out"), "--url", server.grpc_url,
                        "--transport", "shm", "--inflight", "3", "--contour"])
    assert code == 1
    error = capsys.readouterr().err
    assert "frames.npy[2]" in error and "NaN" in error and "5 written, 1 failed" in error
    masks = np.load(tmp_path / "out" / "frames_mask.npy")
    assert (masks[2] == FAILED_VALUE).all()
    good = [0, 1, 3, 4, 5]
    assert np.array_equal(masks[good], reference_masks(server, stack[good]))
    assert json.loads((tmp_path / "out" / "frames.segment.json").read_text())["failed"].keys() == {"2"}
    assert our_dev_shm_entries() == [] and registered_regions(server) == []


def test_hdf5_dataset_and_directory_are_written_into_matching_containers(server, tmp_path, rng):
    h5py = pytest.importorskip("h5py")  # in requirements.txt; a GPU image may lack it (scripts/gpu_check.sh)
    stack = make_stack(rng, 5, (77, 101))
    with h5py.File(tmp_path / "scan.h5", "w") as h5:
        h5.create_dataset("entry/data", data=stack)
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(stack):
        tifffile.imwrite(tmp_path / "frames" / f"f{index:02d}.tif", frame)
    code = client_main(["segment", f"{tmp_path / 'scan.h5'}:/entry/data", str(tmp_path / "frames"),
                        "--out", str(tmp_path / "out"), "--url", server.http_url, "--transport", "http",
                        "--probabilities", "--no-overlay", "--no-progress"])
    assert code == 0
    expected = reference_masks(server, stack)
    with h5py.File(tmp_path / "out" / "scan_segmentation.h5", "r") as h5:
        assert np.array_equal(h5["entry/data/mask"][:], expected)
        assert h5["entry/data/probabilities"].shape == (5, 3, 77, 101)
    for index in range(5):
        assert np.array_equal(tifffile.imread(tmp_path / "out" / "frames" / f"f{index:02d}_mask.tif"), expected[index])


def test_an_hdf5_dataset_of_one_frame_is_segmented_as_that_frame(server, tmp_path, rng, capsys):
    """A detector's single image ``[H, W]`` in HDF5 was refused as "not a stack"."""
    h5py = pytest.importorskip("h5py")
    frame = make_stack(rng, 1, (83, 97))[0]
    with h5py.File(tmp_path / "shot.h5", "w") as h5:
        h5.create_dataset("entry/image", data=frame)
        h5.create_dataset("entry/line", data=frame[0])
    out = tmp_path / "out"
    code = client_main(["segment", f"{tmp_path / 'shot.h5'}:/entry/image", "--out", str(out), "--url", server.grpc_url,
                        "--probabilities", "--contour", "--no-overlay", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with SegmentationClient(server.grpc_url) as client:
        expected = client.segment(frame, probabilities=True, contour=True)
    with h5py.File(out / "shot_segmentation.h5", "r") as h5:
        assert np.array_equal(h5["entry/image/mask"][...], expected.mask)
        assert np.array_equal(h5["entry/image/contour"][...], expected.contour)
        np.testing.assert_allclose(h5["entry/image/probabilities"][...], expected.probabilities, atol=1e-6)
    code = client_main(["segment", f"{tmp_path / 'shot.h5'}:/entry/line", "--out", str(out), "--url", server.grpc_url])
    assert code == 1
    assert "shape [97] is neither a frame [H, W] nor a stack [N, H, W]" in capsys.readouterr().err


def test_a_request_past_its_deadline_is_retried_then_reported(server, tmp_path, rng, capsys):
    """Retried counts frames (it counted attempts: "4 retried" for these 2 frames)."""
    for name in ("big", "large"):
        np.save(tmp_path / f"{name}.npy", make_stack(rng, 1, (1024, 1024))[0])
    code = client_main(["segment", str(tmp_path / "big.npy"), str(tmp_path / "large.npy"), "--out", str(tmp_path / "out"),
                        "--url", server.grpc_url, "--transport", "shm", "--timeout", "0.05", "--retries", "2",
                        "--no-overlay"])
    assert code == 1
    error = capsys.readouterr().err
    assert "2 frame(s)" in error and "0 written, 2 failed, 2 retried (4 further attempts)" in error
    assert "big.npy" in error and "large.npy" in error
    assert "(no answer within the 0.05 s timeout: --timeout, timeout_s)" in error  # "Deadline Exceeded" named no option
    assert not list((tmp_path / "out").glob("*_mask.tif"))
    assert our_dev_shm_entries() == [] and registered_regions(server) == []


def test_resume_of_images_redoes_those_written_with_other_settings_or_from_another_input(server, tmp_path, rng, capsys):
    """Per-image outputs are skipped only when written from this input with these settings
    (segment-log.jsonl); they were skipped whenever they existed, so a resume with another
    intensity range, or of another directory of the same name, mixed two kinds of masks."""
    stack = make_stack(rng, 3, (64, 80))
    for name in ("a", "b"):
        (tmp_path / name / "frames").mkdir(parents=True)
        for index, frame in enumerate(stack if name == "a" else stack[::-1]):
            tifffile.imwrite(tmp_path / name / "frames" / f"f{index}.tif", frame)

    def segment(directory: str, *extra: str) -> str:
        code = client_main(["segment", str(tmp_path / directory / "frames"), "--out", str(tmp_path / "out"),
                            "--url", server.grpc_url, "--no-overlay", "--no-progress", *extra])
        error = capsys.readouterr().err
        assert code == 0, error
        return error

    def masks() -> np.ndarray:
        return np.stack([tifffile.imread(tmp_path / "out" / "frames" / f"f{i}_mask.tif") for i in range(3)])

    segment("a")
    (tmp_path / "out" / "frames" / "f2_mask.tif").unlink()  # as if interrupted before the last image
    assert "2 skipped" in segment("a", "--resume")
    assert np.array_equal(masks(), reference_masks(server, stack))
    ranged = ["--intensity-min", "0", "--intensity-max", "300"]
    error = segment("a", "--resume", *ranged)
    assert "3 image(s) of frames written from another input or with other settings are segmented again" in error
    with SegmentationClient(server.grpc_url) as client:
        expected = np.stack([client.segment(frame, intensity_min=0, intensity_max=300).mask for frame in stack])
    assert np.array_equal(masks(), expected) and not np.array_equal(expected, reference_masks(server, stack))
    assert "3 image(s) of frames written from another input" in segment("b", "--resume", *ranged)
    assert np.array_equal(masks(), expected[::-1])
    # Each output file counts: npy outputs of a's frames do not vouch for the tif ones of b's.
    segment("a", "--format", "npy", *ranged)
    assert "3 image(s) of frames written" in segment("a", "--resume", *ranged)
    assert np.array_equal(masks(), expected)
