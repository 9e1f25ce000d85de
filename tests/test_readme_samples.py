"""The README's sample-data block run as written against the real server: the files `make
samples` writes, then each command with the session server's ``--url`` appended, in a scratch
directory. A command or file name changed in one place and not the other fails here."""

from __future__ import annotations

import re
import shlex

import numpy as np
import tifffile
import zarr

from client.__main__ import main as client_main
from segserve.launcher import REPO_ROOT
from training import samples

SAMPLE_BLOCK = re.compile(r"<!-- sample-commands -->\n```bash\n(.*?)```", re.S)


def readme_sample_commands() -> list[list[str]]:
    block = SAMPLE_BLOCK.search((REPO_ROOT / "README.md").read_text()).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_readme_sample_commands_work_as_written(server, tmp_path, monkeypatch):
    commands = readme_sample_commands()
    assert commands[0] == ["make", "samples"]
    assert "samples: $(SETUP_STAMP)\n\t$(PY) -m training.samples --out samples\n" in (REPO_ROOT / "Makefile").read_text()
    monkeypatch.chdir(tmp_path)
    assert samples.main(["--out", "samples"]) == 0  # what `make samples` runs
    assert len(commands) == 4
    for command in commands[1:]:
        assert command[:3] == [".venv/bin/python", "-m", "client"], command
        assert client_main([*command[3:], "--url", server.grpc_url, "--no-progress"]) == 0, command
    results = tmp_path / "results"
    frame = tifffile.imread(results / "slice_640x480_uint8_mask.tif")
    stack = tifffile.imread(results / "stack_8x512x512_uint16_mask.tif")
    assert frame.shape == (480, 640) and stack.shape == (8, 512, 512)
    assert (results / "ct_80x160x160_int16_mask.nii.gz").exists()
    dataset_mask = zarr.open_group(results / "stack_seg.zarr", mode="r")["mask"][:]
    assert np.array_equal(dataset_mask, stack)  # the cluster's frames equal `segment`'s
    assert len(np.unique(stack)) > 1  # the samples are segmented into more than background
