"""The CLI reads TIFF, PNG and NPY frames and writes masks, probabilities and overlays."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import tifffile
from PIL import Image

from client.__main__ import main as client_main
from client.api import SegmentationClient
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
    assert "bad.npy" in capsys.readouterr().out
    assert (tmp_path / "out" / "good_mask.tif").exists()


def test_cli_reports_server_errors_in_one_line(server, tmp_path, rng, capsys):
    np.save(tmp_path / "f.npy", rng.random((64, 64), dtype=np.float32))
    code = client_main(["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path), "--url", server.grpc_url, "--overlap", "1.5"])
    assert code == 1
    assert "overlap must be in [0, 1)" in capsys.readouterr().out


def test_cli_without_server_says_so(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.zeros((8, 8), np.float32))
    assert client_main(["segment", str(tmp_path / "f.npy"), "--url", "127.0.0.1:1"]) == 1
    assert "not ready" in capsys.readouterr().err


def test_cli_help_documents_every_option():
    help_text = subprocess.run([sys.executable, "-m", "client", "segment", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--url", "--network", "--overlap", "--blend", "--sw-batch-size", "--intensity-min", "--intensity-max",
                   "--keep-largest", "--probabilities", "--contour", "--format", "--no-overlay", "--timeout", "--debug"):
        assert option in help_text
