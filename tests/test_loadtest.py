"""perf_analyzer smoke run against the real server: it runs, and every run has throughput."""

from __future__ import annotations

import csv

from scripts.loadtest import PERF_ANALYZER, RUNS, main as loadtest_main


def test_perf_analyzer_smoke_over_grpc_and_shared_memory(server, tmp_path, capsys):
    assert PERF_ANALYZER.exists(), "perf_analyzer missing: run `make setup`"
    assert loadtest_main(["--smoke", "--url", server.grpc_url, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    # The commands it prints (CI keeps them) name the token's variable, not the token.
    assert server.config.token not in printed.out + printed.err and "segserve-token:$SEGSERVE_TOKEN" in printed.out
    for run in RUNS:
        with open(tmp_path / f"{run.name}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(float(row["Inferences/Second"]) > 0 for row in rows), run.name
    assert (tmp_path / "loadtest.png").stat().st_size > 0
