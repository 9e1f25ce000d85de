"""`segment-dataset` on a real Dask cluster (two single-threaded worker processes) and two real
servers: zarr outputs equal the single-machine client's for a stack and a chunked volume; a
worker SIGKILLed mid-run, a server SIGKILLed mid-run and a driver SIGKILLed then resumed all
end with equal outputs and nothing missing."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client, LocalCluster

from client.__main__ import main as client_main
from client.api import SegmentationClient
from client.volumes import ChunkSettings
from segserve.launcher import ServerConfig, TritonServer, free_ports
from tests.conftest import copy_2d_repository
from tests.helpers import ct_volume, make_stack, running_with_stderr

FRAME = (120, 150)


@pytest.fixture(scope="module")
def second_server(server, tmp_path_factory):
    """A second real server with the 2D pipeline only (killed by the last test using it)."""
    repository = copy_2d_repository(tmp_path_factory.mktemp("dataset-second") / "model_repository", 2)
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                          token=server.config.token)
    second = TritonServer(config, log_path=tmp_path_factory.mktemp("logs") / "dataset-second.log").start(timeout_s=600)
    yield second
    second.stop(timeout_s=20)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, as `segment-dataset` starts by default."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        with Client(local) as dask_client:
            yield local, dask_client


@pytest.fixture(scope="module")
def stack(rng, tmp_path_factory):
    """30 uint16 frames in a zarr array chunked unlike the tasks, and their reference masks."""
    frames = make_stack(rng, 30, FRAME)
    path = tmp_path_factory.mktemp("inputs") / "scan.zarr"
    zarr.create_array(path, shape=frames.shape, chunks=(7, 64, 64), dtype=frames.dtype)[:] = frames
    return frames, path


@pytest.fixture(scope="module")
def reference(server, stack):
    frames, _ = stack
    with SegmentationClient(server.grpc_url) as client:
        results = [client.segment(frame, probabilities=True) for frame in frames]
    return np.stack([r.mask for r in results]), np.stack([r.probabilities for r in results])


def urls(*servers) -> str:
    return ",".join(s.grpc_url for s in servers)


def dataset_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "client", "segment-dataset", *args, "--no-progress"]


def done_count(out) -> int:
    try:
        return int(np.count_nonzero(zarr.open_array(out, path="done", mode="r")[:]))
    except (OSError, ValueError, KeyError, FileNotFoundError):
        return 0  # not created yet


def wait_for_done(out, count: int, process: subprocess.Popen, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"segment-dataset exited early: {process.communicate()[1]}")
        if (done := done_count(out)) >= count:
            return done
        time.sleep(0.02)
    pytest.fail(f"{out} never reached {count} tasks done")


def assert_complete(out, masks: np.ndarray, tasks: int) -> None:
    group = zarr.open_group(out, mode="r")
    assert np.array_equal(group["mask"][:], masks)
    assert np.count_nonzero(group["done"][:]) == tasks
    state = group.attrs["segment_dataset"]
    assert state["complete"] and state["remaining_tasks"] == 0


def test_stack_equals_the_single_machine_client(server, second_server, cluster, stack, reference, tmp_path, capsys):
    _, dask_client = cluster
    out = tmp_path / "out.zarr"
    code = client_main(["segment-dataset", str(stack[1]), "--out", str(out), "--url", urls(server, second_server),
                        "--scheduler", dask_client.scheduler.address, "--frames-per-task", "4", "--probabilities",
                        "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    group = zarr.open_group(out, mode="r")
    assert group["mask"].chunks == (4, *FRAME) and group["mask"].dtype == np.uint8
    assert_complete(out, reference[0], 8)
    assert np.abs(group["probabilities"][:] - reference[1]).max() <= 1e-5
    assert group.attrs["segment_dataset"]["settings"]["network"] == "unet2d_particles"
    assert "Dask dashboard http" in err and "0 already done, 8 to do" in err
    assert re.search(r"30 frame\(s\) in 8 task\(s\), .* 0 task\(s\) failed", err), err
    answered = dict((u, int(n)) for u, n in re.findall(r"(\S+) (\d+) answered", err.split("per server:")[1]))
    assert sum(answered.values()) == 30 and all(n > 0 for n in answered.values()), err  # both servers used


def test_volume_equals_the_single_machine_chunked_client(server, cluster, rng, tmp_path, capsys):
    """A 3D volume in an HDF5 file, cut in 2x2x1 blocks whose halos ([0:112] and [48:170] along
    D) the workers read from the file; the intensity range is the whole volume's."""
    import h5py

    _, dask_client = cluster
    volume = ct_volume((170, 130, 40), rng)
    with h5py.File(tmp_path / "ct.h5", "w") as file:
        file.create_dataset("/entry/data", data=volume, chunks=(16, 32, 40))
    with SegmentationClient(server.grpc_url, model="segment_3d") as client:
        chunked = client.segment_volume(volume, chunks=ChunkSettings(shape=(160, 0, 0)), probabilities=True)
    assert chunked.chunks > 1
    out = tmp_path / "ct_seg.zarr"
    code = client_main(["segment-dataset", f"{tmp_path / 'ct.h5'}:/entry/data", "--out", str(out), "--model",
                        "segment_3d", "--url", server.grpc_url, "--scheduler", dask_client.scheduler.address,
                        "--block", "85", "65", "0", "--probabilities", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    group = zarr.open_group(out, mode="r")
    assert group["mask"].chunks == (85, 65, 40) and group["mask"].shape == volume.shape
    assert_complete(out, chunked.mask, 4)
    assert np.abs(group["probabilities"][:] - chunked.probabilities).max() <= 1e-5
    low, high = np.percentile(volume.astype(np.float32), [1.0, 99.0])
    assert group.attrs["segment_dataset"]["intensity_range"] == [float(low), float(high)]


def test_volume_refuses_whole_mask_options_over_blocks(server, tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.zeros((70, 70, 70), np.int16))
    code = client_main(["segment-dataset", str(tmp_path / "v.npy"), "--out", str(tmp_path / "o.zarr"), "--model",
                        "segment_3d", "--url", server.grpc_url, "--block", "40", "40", "40", "--keep-largest"])
    assert code == 1 and "--keep-largest and --contour look at the whole mask" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_ome_zarr_image_gets_a_label_image(server, cluster, stack, reference, tmp_path, capsys):
    """OME-Zarr input (level 0 of two, t and c of length 1): the output group is an NGFF label
    image on the input's grid, pointing at it."""
    _, dask_client = cluster
    frames = stack[0][:5]
    image = zarr.open_group(tmp_path / "image.ome.zarr", mode="w", zarr_format=3)
    image.create_array("0", shape=(1, 1, *frames.shape), chunks=(1, 1, 1, *FRAME), dtype=frames.dtype)[:] = frames[None, None]
    image.create_array("1", shape=(1, 1, 5, 60, 75), chunks=(1, 1, 1, 60, 75), dtype=frames.dtype)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
            {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    scale = [{"type": "scale", "scale": [1.0, 1.0, 2.0, 0.5, 0.5]}]
    image.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": scale},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 2.0, 1.0, 1.0]}]}]}]}
    out = tmp_path / "labels.zarr"
    code = client_main(["segment-dataset", str(tmp_path / "image.ome.zarr"), "--out", str(out), "--url",
                        server.grpc_url, "--scheduler", dask_client.scheduler.address, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert_complete(out, reference[0][:5], 2)
    ome = zarr.open_group(out, mode="r").attrs["ome"]
    assert ome["multiscales"][0]["axes"] == axes[2:]
    # NGFF 0.5: an array's dimension names are its axes' (ome-zarr-models refused the label image).
    assert zarr.open_array(out, path="mask", mode="r").metadata.dimension_names == ("z", "y", "x")
    assert ome["multiscales"][0]["datasets"] == [{"path": "mask", "coordinateTransformations": [
        {"type": "scale", "scale": [2.0, 0.5, 0.5]}]}]
    assert (out / ome["image-label"]["source"]["image"]).resolve() == (tmp_path / "image.ome.zarr").resolve()


def start_one_frame_tasks(stack, out, server_urls: str, local) -> subprocess.Popen:
    """The CLI on ``stack``'s file, one frame per task, on the module's cluster (stderr piped)."""
    return subprocess.Popen(dataset_cli(str(stack[1]), "--out", str(out), "--url", server_urls,
                                        "--scheduler", local.scheduler_address, "--frames-per-task", "1"),
                            stderr=subprocess.PIPE, text=True)


def test_worker_killed_mid_run(server, second_server, cluster, stack, reference, tmp_path):
    """SIGKILL one worker process once 3 tasks are done: its task reruns on a new worker."""
    local, dask_client = cluster
    out = tmp_path / "out.zarr"
    process = start_one_frame_tasks(stack, out, urls(server, second_server), local)
    wait_for_done(out, 3, process)
    pids = dask_client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert_complete(out, reference[0], 30)
    dask_client.wait_for_workers(2, timeout=120)


def test_killed_run_resumes_only_unfinished_tasks(server, second_server, cluster, stack, reference, tmp_path, capsys):
    local, _ = cluster
    out = tmp_path / "out.zarr"
    common = ["--url", urls(server, second_server), "--scheduler", local.scheduler_address, "--frames-per-task", "1"]
    process = subprocess.Popen(dataset_cli(str(stack[1]), "--out", str(out), *common), stderr=subprocess.PIPE, text=True)
    wait_for_done(out, 4, process)
    process.kill()
    process.communicate()
    code = client_main(["segment-dataset", str(stack[1]), "--out", str(out), *common, "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    done, todo = (int(n) for n in re.search(r"(\d+) already done, (\d+) to do", err).groups())
    assert done >= 4 and todo >= 1 and done + todo == 30
    ran = re.search(r"(\d+) frame\(s\) in (\d+) task\(s\)", err)
    assert int(ran[2]) == todo  # only the unfinished ones ran
    assert_complete(out, reference[0], 30)


def undo_tasks(out, indices) -> None:
    """What an interrupted run leaves for these tasks: their done element 0 and no mask."""
    group = zarr.open_group(out, mode="r+")
    extent = group["mask"].chunks
    for index in indices:
        group["done"][index] = 0
        start = np.unravel_index(index, group["mask"].cdata_shape)
        group["mask"][tuple(slice(i * e, (i + 1) * e) for i, e in zip(start, extent))] = 0


@pytest.mark.parametrize("layout", ["stack", "volume"])
def test_resume_keeps_the_task_extent_of_the_run_it_continues(layout, server, cluster, stack, rng, tmp_path, capsys):
    """An extent given to the first run (--frames-per-task, --block) and left out of --resume
    is the run's own, not the default; another extent given to --resume is refused."""
    _, dask_client = cluster
    if layout == "stack":
        source, extent, tasks = str(stack[1]), ["--frames-per-task", "3"], 10
        common = ["--url", server.grpc_url]
    else:
        np.save(tmp_path / "ct.npy", ct_volume((90, 70, 40), rng))
        source, extent, tasks = str(tmp_path / "ct.npy"), ["--block", "45", "35", "0"], 4
        common = ["--url", server.grpc_url, "--model", "segment_3d"]
    out = tmp_path / "out.zarr"
    common += ["--out", str(out), "--scheduler", dask_client.scheduler.address, "--no-progress"]
    assert client_main(["segment-dataset", source, *common, *extent]) == 0, capsys.readouterr().err
    expected = zarr.open_array(out, path="mask", mode="r")[:]
    undo_tasks(out, [1, tasks - 1])
    assert not np.array_equal(zarr.open_array(out, path="mask", mode="r")[:], expected)  # something to redo
    capsys.readouterr()
    code = client_main(["segment-dataset", source, *common, "--resume"])
    err = capsys.readouterr().err
    assert code == 0 and f"{tasks - 2} already done, 2 to do" in err, err
    assert_complete(out, expected, tasks)
    named_defaults = ["--overlap", "0.25", "--blend", "gaussian", "--sw-batch-size", "3"]  # the same run
    code = client_main(["segment-dataset", source, *common, "--resume", *named_defaults])
    err = capsys.readouterr().err
    assert code == 0 and f"{tasks} already done, 0 to do" in err, err
    other = ["--frames-per-task", "4"] if layout == "stack" else ["--block", "45", "0", "0"]
    assert client_main(["segment-dataset", source, *common, "--resume", *other]) == 1
    assert "written with other settings (task_extent, tasks" in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_runs_output(server, stack, tmp_path, capsys):
    """--overwrite never deletes the input or a directory no run wrote; refused before any
    cluster starts, and a bad --scheduler leaves no output behind."""
    frames = tmp_path / "frames.npy"
    np.save(frames, stack[0][:2])
    notes = tmp_path / "results" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    common = ["--url", server.grpc_url, "--no-progress"]
    for out, reason in [(frames, "is the input"), (tmp_path, "holds the input"), (frames / "seg.zarr", "lies inside"),
                        (notes.parent, "is not the output of a segment-dataset run")]:
        assert client_main(["segment-dataset", str(frames), "--out", str(out), "--overwrite", *common]) == 1
        assert reason in capsys.readouterr().err
    assert notes.read_text() == "mine" and np.array_equal(np.load(frames), stack[0][:2])
    out = tmp_path / "out.zarr"
    assert client_main(["segment-dataset", str(frames), "--out", str(out), "--scheduler", "localhost:abc", *common]) == 1
    assert "--scheduler localhost:abc" in capsys.readouterr().err and not out.exists()


def test_a_pixel_type_no_request_takes_is_refused_before_any_task(server, tmp_path, capsys):
    np.save(tmp_path / "counts.npy", np.zeros((3, 40, 40), np.complex64))
    out = tmp_path / "out.zarr"
    assert client_main(["segment-dataset", str(tmp_path / "counts.npy"), "--out", str(out), "--url", server.grpc_url,
                        "--no-progress"]) == 1
    assert "counts.npy: pixel type complex64 is not supported; use one of" in capsys.readouterr().err
    assert not out.exists()


def test_a_frame_the_server_refuses_fails_its_task_once_and_the_tasks_other_frames_are_written(
        server, cluster, stack, reference, tmp_path, capsys):
    """NaN pixels: refused by the server, so a rerun of the task would fail alike; the task is
    listed failed after one try (was: rerun --task-retries times, each with a traceback). Its
    other frames are written and the refused one is 255, as ``segment`` writes it: the whole
    task was left at the fill value 0, a class, so its good frames read as background."""
    import tritonclient.grpc as grpcclient

    _, dask_client = cluster
    frames = stack[0][:4].astype(np.float32)
    frames[1, 5, 5] = np.nan
    np.save(tmp_path / "frames.npy", frames)

    def answered() -> int:  # the pipeline's answers, its refusals (marked errors) included
        with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
            statistics = grpc.get_inference_statistics("segment_2d", as_json=True)["model_stats"][0]
        return int(statistics["inference_stats"]["success"].get("count", 0))

    before = answered()
    out = tmp_path / "out.zarr"
    command = ["segment-dataset", str(tmp_path / "frames.npy"), "--out", str(out), "--url", server.grpc_url,
               "--scheduler", dask_client.scheduler.address, "--frames-per-task", "2", "--task-retries", "3",
               "--probabilities", "--no-progress"]
    code = client_main(command)
    err = capsys.readouterr().err
    assert code == 1 and "task 0 [0:2]: frame(s) 1 refused by the server, written as 255 in the mask; mend the input " \
        "and --resume: " in err and "NaN" in err and "1 task(s) failed" in err, err
    assert "3 frame(s) in 1 task(s)" in err, err
    # Each frame once (1 + 3 reruns of task 0: 10 answers, measured on the code before this test's first version).
    assert answered() - before == 4, err
    assert done_count(out) == 1
    masks, probabilities = reference
    written = zarr.open_group(out, mode="r")
    assert (written["mask"][1] == 255).all() and np.isnan(written["probabilities"][1]).all()
    good = [0, 2, 3]
    assert np.array_equal(written["mask"][good], masks[good])
    np.testing.assert_allclose(written["probabilities"][good], probabilities[good], atol=1e-6)
    frames[1, 5, 5] = 0  # mended
    np.save(tmp_path / "frames.npy", frames)
    assert client_main([*command, "--resume"]) == 0, capsys.readouterr().err
    with SegmentationClient(server.grpc_url) as client:
        assert np.array_equal(zarr.open_group(out, mode="r")["mask"][1], client.segment(frames[1]).mask)
    assert done_count(out) == 2


def test_server_killed_mid_run(server, second_server, cluster, stack, reference, tmp_path):
    """SIGKILL the second server (server and stubs) once 3 tasks are done: the workers' clients
    fail over to the first one; every frame is there and equal."""
    local, _ = cluster
    out = tmp_path / "out.zarr"
    process = start_one_frame_tasks(stack, out, urls(server, second_server), local)
    wait_for_done(out, 3, process)
    os.killpg(second_server.process.pid, signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert_complete(out, reference[0], 30)
    answered = dict(re.findall(r"(\S+) (\d+) answered", err.split("per server:")[1]))
    assert int(answered[server.grpc_url]) + int(answered.get(second_server.grpc_url, 0)) == 30, err


@pytest.fixture
def own_server(server, tmp_path):
    """A server of the test's own (it is stopped and started again mid-run): the 2D pipeline,
    one sliding-window stub, the session server's token."""
    repository = copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=1)
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                          token=server.config.token)
    running = TritonServer(config, log_path=tmp_path / "own-server.log").start(timeout_s=600)
    try:
        yield running
    finally:
        running.stop(timeout_s=2)


def test_a_run_says_once_when_its_server_stops_answering_and_when_it_answers_again(own_server, cluster, stack,
                                                                                   reference, tmp_path):
    """The server stopped once 3 tasks are done, then started again on the same ports: the
    command says so once for the run (both workers' clients see the outage) and once that it
    answers again; before, its progress bar stood still without a word (the requests run on
    the workers). Every frame is there and equal."""
    local, _ = cluster
    np.save(tmp_path / "frames.npy", np.concatenate([stack[0], stack[0]]))  # 60 tasks: many left at the stop
    out = tmp_path / "out.zarr"
    command = dataset_cli(str(tmp_path / "frames.npy"), "--out", str(out), "--url", own_server.grpc_url,
                          "--scheduler", local.scheduler_address, "--frames-per-task", "1")
    with running_with_stderr(command) as (process, lines):

        def wait_until(condition, timeout_s: float) -> bool:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert process.poll() is None, "segment-dataset exited early:\n" + "".join(lines)
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return True

        assert wait_until(lambda: done_count(out) >= 3, 300), "".join(lines)
        own_server.stop(timeout_s=2)
        assert done_count(out) < 60
        wait_until(lambda: any("no answer from" in line for line in lines), 90)  # the notice: past 5 s
        own_server.restart(timeout_s=600)
        code = process.wait(timeout=600)
    err = "".join(lines)
    assert code == 0, err
    told = [line.strip() for line in lines if "no answer from" in line or "answers again" in line]
    assert len(told) == 2, err
    assert told[0].startswith(f"client: no answer from {own_server.grpc_url} for "), told
    assert told[0].endswith("requests are tried again (until it has failed for 600 s, --patience)"), told
    assert told[1].startswith(f"client: {own_server.grpc_url} answers again, after about "), told
    assert_complete(out, np.concatenate([reference[0], reference[0]]), 60)


def test_the_workers_outage_reports_make_one_outage_for_the_run():
    """Reports of two worker processes (``client.dataset_outages``), on a fake clock: one
    outage from the first one failing, over until both answer again; a process with no task
    running neither holds it open nor ends it; another run's reports and late ones count not."""
    from client.dataset_outages import ClusterOutage
    from client.outage_notices import OutageNotices
    from tests.helpers import FakeClock

    clock = FakeClock()
    outage = ClusterOutage("run1", clock=clock, stale_s=30.0)
    said: list[str] = []
    notices = OutageNotices(outage, "host:1", patience_s=600.0, say=said.append)
    t = iter(range(1, 1000))

    def report(process, lasted_s, busy=True, run="run1", reason="connection refused"):
        outage.update({"run": run, "process": process, "t": float(next(t)), "lasted_s": lasted_s, "busy": busy,
                       "reason": reason if lasted_s is not None else None})

    report("a", None), report("b", None)
    for second in range(8):  # both fail
        report("a", float(second)), report("b", max(0.0, second - 0.5))
        report("c", float(second), run="run2")
        notices.check()
        clock.sleep(1.0)
    assert said == ["client: no answer from host:1 for 5 s (connection refused); frames are tried again (until it "
                    "has failed for 600 s, --patience)"]
    report("a", None)  # a answers again; b, still failing, holds the outage open
    clock.sleep(1.0)
    notices.check()
    assert len(said) == 1 and outage.lasted_s() == 9.0
    outage.update({"run": "run1", "process": "b", "t": 0.5, "lasted_s": None, "busy": True, "reason": None})
    assert outage.lasted_s() == 9.0  # an old report of b's, arriving late
    report("b", 9.0, busy=False)  # b's task gave up: idle, its client still failing
    notices.check()
    assert said[1:] == ["client: host:1 answers again, after about 9 s without"]
    # Gone for good: failing processes whose tasks gave up end nothing.
    report("a", 0.0)
    for second in range(40):
        report("a", float(second), busy=second < 10)
        clock.sleep(1.0)
        notices.check()
    assert len(said) == 3 and "no answer" in said[2] and outage.lasted_s() >= 39.0
    # A busy process's failing report goes stale when it stops reporting (a lost worker); the
    # outage ends only on a process seen to answer again.
    report("a", 40.0, busy=True)
    clock.sleep(31.0)
    notices.check()
    assert len(said) == 3 and outage.lasted_s() >= 70.0
    report("b", None)
    report("b", 1.0), report("b", None)
    notices.check()
    assert said[3:] == ["client: host:1 answers again, after about 71 s without"]


def test_tiff_stack_in_a_local_cluster(server, stack, reference, tmp_path):
    """No --scheduler: the command starts its own LocalCluster (and stops it)."""
    tifffile.imwrite(tmp_path / "scan.tif", stack[0][:6])
    process = subprocess.run(dataset_cli(str(tmp_path / "scan.tif"), "--out", str(tmp_path / "o.zarr"), "--url",
                                         server.grpc_url, "--workers", "1"), stderr=subprocess.PIPE, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr
    assert_complete(tmp_path / "o.zarr", reference[0][:6], 2)


def set_environment(values: dict[str, str | None]) -> dict[str, str | None]:
    """Run on a worker: set (None: remove) environment variables; their previous values."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return previous


@contextlib.contextmanager
def workers_environment(dask_client, values: dict[str, str | None]):
    """Every worker with ``values`` in its environment (None: removed) while the block runs;
    then each worker's own values back, and its dataset clients (made with them) closed."""
    previous = dask_client.run(set_environment, values)
    try:
        yield
    finally:
        for address, values_before in previous.items():
            dask_client.run(set_environment, values_before, workers=[address])
        dask_client.run(close_worker_clients)


def close_worker_clients() -> int:
    """Run on a worker: close its dataset clients (and so their shared-memory regions)."""
    from client import datasets

    clients = list(datasets._CLIENTS.values())
    for client in clients:
        client.close()
    datasets._CLIENTS.clear()
    return len(clients)


def test_shared_memory_workers_use_the_token_given_to_the_command(server, cluster, stack, reference, tmp_path):
    """Workers with neither $SEGSERVE_TOKEN nor a token file register their regions with
    `--token` (shared memory is a restricted endpoint)."""
    from client.auth import TOKEN_ENV, TOKEN_FILE_ENV

    _, dask_client = cluster
    np.save(tmp_path / "frames.npy", stack[0][:4])
    with workers_environment(dask_client, {TOKEN_ENV: None, TOKEN_FILE_ENV: str(tmp_path / "no-token")}):
        code = client_main(["segment-dataset", str(tmp_path / "frames.npy"), "--out", str(tmp_path / "o.zarr"),
                            "--url", server.grpc_url, "--scheduler", dask_client.scheduler.address, "--transport",
                            "shm", "--token", server.config.token, "--frames-per-task", "2", "--no-progress"])
    assert code == 0
    assert_complete(tmp_path / "o.zarr", reference[0][:4], 2)


def test_workers_whose_own_server_is_down_hand_over_to_the_url_list(server, cluster, stack, reference, tmp_path):
    """$SEGSERVE_LOCAL_URL names a node server that does not answer: each task goes to the
    --url list at once (it raised out of the task before, on every retry of every task)."""
    from client.datasets import LOCAL_URL_ENV

    _, dask_client = cluster
    np.save(tmp_path / "frames.npy", stack[0][:4])
    with workers_environment(dask_client, {LOCAL_URL_ENV: f"127.0.0.1:{free_ports(1)[0]}"}):
        code = client_main(["segment-dataset", str(tmp_path / "frames.npy"), "--out", str(tmp_path / "o.zarr"),
                            "--url", server.grpc_url, "--scheduler", dask_client.scheduler.address,
                            "--frames-per-task", "2", "--task-retries", "0", "--no-progress"])
    assert code == 0
    assert_complete(tmp_path / "o.zarr", reference[0][:4], 2)


def test_paths_relative_to_the_command_reach_workers_elsewhere(server, cluster, stack, reference, tmp_path,
                                                               monkeypatch, capsys):
    """The workers' working directory is not the command's: they get absolute paths, and
    --resume compares the input's location, not its name."""
    _, dask_client = cluster
    np.save(tmp_path / "frames.npy", stack[0][:4])
    monkeypatch.chdir(tmp_path)
    assert set(dask_client.run(os.getcwd).values()) != {str(tmp_path)}
    common = ["--url", server.grpc_url, "--scheduler", dask_client.scheduler.address, "--frames-per-task", "2",
              "--no-progress"]
    assert client_main(["segment-dataset", "frames.npy", "--out", "o.zarr", *common]) == 0
    assert_complete(tmp_path / "o.zarr", reference[0][:4], 2)
    (tmp_path / "elsewhere").mkdir()
    np.save(tmp_path / "elsewhere" / "frames.npy", stack[0][4:8])
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert client_main(["segment-dataset", "frames.npy", "--out", "../o.zarr", "--resume", *common]) == 1
    assert "written with other settings (input_location" in capsys.readouterr().err  # another file, same name
    assert client_main(["segment-dataset", "../frames.npy", "--out", "../o.zarr", "--resume", *common]) == 0
    assert "2 already done, 0 to do" in capsys.readouterr().err  # the same file, named otherwise


def test_an_input_rewritten_between_runs_on_one_cluster_is_read_anew(server, cluster, stack, reference, tmp_path):
    """The run's end closes its HDF5 input on every worker (HDF5 locks an open file against
    writing), and the next run on the same workers reads the rewritten file, not a stale handle."""
    import h5py

    _, dask_client = cluster
    common = ["--url", server.grpc_url, "--scheduler", dask_client.scheduler.address, "--frames-per-task", "2",
              "--no-progress"]
    for run, frames in enumerate((slice(0, 4), slice(4, 10))):
        with h5py.File(tmp_path / "scan.h5", "w") as file:  # fails while a worker holds the file open
            file.create_dataset("/entry/data", data=stack[0][frames], chunks=(1, *FRAME))
        out = tmp_path / f"run{run}.zarr"
        assert client_main(["segment-dataset", f"{tmp_path / 'scan.h5'}:/entry/data", "--out", str(out), *common]) == 0
        assert_complete(out, reference[0][frames], 2 if run == 0 else 3)


def dataset_tasks(dask_scheduler, states=("queued", "waiting", "no-worker", "processing")) -> list:
    """Run on the scheduler: the keys of `segment-dataset` tasks in ``states``."""
    return [key for key, task in dask_scheduler.tasks.items() if str(key).startswith("run_task") and task.state in states]


def dataset_tasks_running(dask_worker) -> list:
    """Run on a worker: its `segment-dataset` tasks still executing (cancelled ones included)."""
    return [key for key, task in dask_worker.state.tasks.items()
            if str(key).startswith("run_task") and task.state in ("executing", "long-running", "cancelled")]


def wait_until_no_dataset_task_runs(dask_client, timeout_s: float) -> None:
    """Until no `segment-dataset` task is queued or processing on the scheduler nor executing
    on a worker (a cancelled task runs on there), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (dask_client.run_on_scheduler(dataset_tasks) or any(dask_client.run(dataset_tasks_running).values())) \
            and time.monotonic() < deadline:
        time.sleep(0.1)


def test_tasks_the_cluster_cancels_are_reported_and_resumed(server, cluster, stack, reference, tmp_path):
    """Tasks cancelled by the cluster (here: another client cancelling their keys) are listed
    as failed with the reason, the others still run, the run ends with exit 1 and its state,
    and --resume does exactly the unfinished ones."""
    from distributed import Future

    local, dask_client = cluster
    out = tmp_path / "out.zarr"
    process = start_one_frame_tasks(stack, out, urls(server), local)
    wait_for_done(out, 3, process)
    keys = dask_client.run_on_scheduler(dataset_tasks, states=("queued", "waiting", "no-worker"))
    assert keys, "no task left waiting to cancel"
    dask_client.cancel([Future(key, dask_client) for key in keys], force=True)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    cancelled = re.findall(r"client: error: task \d+ \[\d+:\d+\]: cancelled by the cluster", err)
    assert 1 <= len(cancelled) <= len(keys) and "Traceback" not in err, err
    assert f"{len(cancelled)} task(s) failed" in err and "rerun with --resume" in err, err
    state = zarr.open_group(out, mode="r").attrs["segment_dataset"]
    assert not state["complete"] and state["remaining_tasks"] >= 1
    wait_until_no_dataset_task_runs(dask_client, 60)  # one cancelled while starting may still be finishing
    remaining = 30 - done_count(out)
    resumed = subprocess.run(dataset_cli(str(stack[1]), "--out", str(out), "--url", urls(server), "--scheduler",
                                         local.scheduler_address, "--frames-per-task", "1", "--resume"),
                             stderr=subprocess.PIPE, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert remaining >= 1 and f"{30 - remaining} already done, {remaining} to do" in resumed.stderr
    assert_complete(out, reference[0], 30)


def test_an_interrupted_run_leaves_no_task_queued_and_its_input_writable(server, cluster, stack, reference, tmp_path):
    """SIGTERM (Ctrl-C's path) mid-run: exit 143 (128 + SIGTERM), the queued tasks are cancelled, the HDF5
    input is closed on every worker (it can be rewritten), and --resume finishes the rest."""
    import h5py

    local, dask_client = cluster
    path, out = tmp_path / "scan.h5", tmp_path / "out.zarr"
    with h5py.File(path, "w") as file:
        file.create_dataset("/entry/data", data=stack[0][:12], chunks=(1, *FRAME))
    common = ["--url", urls(server), "--scheduler", local.scheduler_address, "--frames-per-task", "1"]
    process = subprocess.Popen(dataset_cli(f"{path}:/entry/data", "--out", str(out), *common), stderr=subprocess.PIPE,
                               text=True)
    wait_for_done(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "interrupted; rerun with --resume" in err, err
    wait_until_no_dataset_task_runs(dask_client, 30)  # one running when the command stopped may still finish
    assert not dask_client.run_on_scheduler(dataset_tasks), "tasks of the interrupted run still queued"
    with h5py.File(path, "r+") as file:  # raises while a worker holds the file open
        file.attrs["rewritten"] = True
    resumed = subprocess.run(dataset_cli(f"{path}:/entry/data", "--out", str(out), *common, "--resume"),
                             stderr=subprocess.PIPE, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_complete(out, reference[0][:12], 12)


def _mask_in_forked_process(job, frame: np.ndarray) -> np.ndarray:
    from client import datasets

    results, _, _ = datasets.segment_items(job, [(0, frame)])
    return results[0].mask


def test_a_process_forked_after_the_dataset_clients_were_made_makes_its_own(server, rng):
    """A pool forked from a process that had used its dataset clients inherited them, and a
    client is refused in a process forked from the one that made it: every item failed."""
    import multiprocessing

    from client import datasets

    job = datasets.Job(source=None, output="", layout="stack", channels=False, urls=(server.grpc_url,),
                       model="segment_2d", network=None, transport="grpc", token=None, timeout_s=None, retries=0,
                       patience_s=0.0, inflight=1, options={}, outputs=("mask",))
    frame = make_stack(rng, 1, (70, 90))[0]
    try:
        expected = _mask_in_forked_process(job, frame)  # this process's clients, made
        with multiprocessing.get_context("fork").Pool(1) as pool:
            forked = pool.apply(_mask_in_forked_process, (job, frame))
    finally:
        close_worker_clients()
    assert np.array_equal(forked, expected)


def test_a_cluster_without_workers_is_said_to_have_none(server, stack, tmp_path):
    """Its batch jobs still queued: the bar sat at 0/1 and nothing said why."""
    with LocalCluster(n_workers=0, dashboard_address=":0") as empty:
        command = dataset_cli(str(stack[1]), "--out", str(tmp_path / "out.zarr"), "--url", server.grpc_url,
                              "--scheduler", empty.scheduler_address)
        with running_with_stderr(command) as (process, lines):
            deadline = time.monotonic() + 120
            notice = f"client: the cluster at {empty.scheduler_address} has no workers yet; the tasks wait until one joins"
            while not any(notice in line for line in lines):
                assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130, "".join(lines)
