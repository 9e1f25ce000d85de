"""The pipeline's own metrics (segserve.metrics) on the session server's metrics endpoint, read
with prometheus_client's parser (as differences: other tests' requests moved the counters
before): one request moves every counter by what the request did; refused
requests count by step and reason; the Grafana dashboard and the autoscaling rules only name
metrics the server exposes."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import yaml
from monai.inferers import sliding_window_inference
from prometheus_client.parser import text_string_to_metric_families

from segserve.launcher import REPO_ROOT
from segserve.metrics import FAMILIES, PipelineMetrics, refusal_reason
from tests.conftest import DEFAULT_NETWORK, Endpoint

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "segserve-dashboard.json"
ADAPTER_VALUES = REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
# Metrics the dashboard reads from elsewhere than this CPU-only test server, and why.
NOT_FROM_THIS_SERVER = {
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA's dcgm-exporter on GPU nodes",
    "DCGM_FI_DEV_FB_USED": "NVIDIA's dcgm-exporter on GPU nodes",
    "nv_gpu_utilization": "Triton exports GPU families only where it sees a GPU",
}
TILE = (128, 128)  # unet2d_particles


Samples = dict[tuple[str, frozenset], float]


def metrics_text(server) -> str:
    url = f"http://{server.config.host}:{server.config.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def scrape(server) -> Samples:
    """Every sample on the server's metrics endpoint: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics_text(server)) for s in family.samples}


def exposed_names(server) -> set[str]:
    """Sample names as Prometheus stores them. Not the parser's: prometheus_client renames a
    counter's samples to end in _total (Triton's nv_inference_request_success would read as
    nv_inference_request_success_total), while PromQL sees the names as exposed."""
    return {re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0)
            for line in metrics_text(server).splitlines() if line and not line.startswith("#")}


def exposed_names_after_a_frame(server, endpoint, timeout_s: float = 10.0) -> set[str]:
    """Names exposed once one small frame's updates have all arrived (the stubs' reporter
    threads send them in order, after the response): the frame's BLS-call count and the
    network's batch size are the last update each of the two stubs queues."""
    before = scrape(server)
    endpoint.infer({"IMAGE": np.zeros((1, 70, 90), np.float32)})
    scrape_until(server, before, {key("segserve_bls_calls_per_frame_count", pipeline="segment_2d"),
                                  key("segserve_network_batch_tiles_count", network=DEFAULT_NETWORK)}, timeout_s)
    return exposed_names(server)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def changes(before: Samples, after: Samples) -> dict[tuple[str, frozenset], float]:
    """Samples of the segserve_ families that moved, with the amount (bucket lines left out)."""
    moved = {}
    for key, new in after.items():
        name = key[0]
        if name.startswith("segserve_") and not name.endswith("_bucket"):
            delta = new - before.get(key, 0.0)
            if delta:
                moved[key] = delta
    return moved


def scrape_until(server, before: Samples, expected: set | dict, timeout_s: float = 10.0) -> Samples:
    """Scrape until every expected sample moved (a set of keys) or moved by at least its
    expected amount (a dict), at most ``timeout_s``: each stub's reporter thread sends its
    updates after the response, one message each, and the stubs' threads race each other."""
    minimum = expected if isinstance(expected, dict) else dict.fromkeys(expected, 0.0)
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(server)
        moved = changes(before, after)
        if all(key in moved and moved[key] >= amount for key, amount in minimum.items()) or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


def monai_tiles_and_batches(spatial: tuple[int, ...], sw_batch_size: int, overlap: float = 0.25) -> tuple[int, int]:
    """Tiles and predictor calls MONAI's sliding window makes for a frame of this size."""
    calls = []

    def predictor(tiles: torch.Tensor) -> torch.Tensor:
        calls.append(tiles.shape[0])
        return torch.zeros((tiles.shape[0], 1, *tiles.shape[2:]))

    sliding_window_inference(torch.zeros((1, 1, *spatial)), TILE, sw_batch_size, predictor, overlap=overlap)
    return sum(calls), len(calls)


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


@pytest.fixture
def grpc_endpoint(server):
    endpoint = Endpoint("grpc", server)
    yield endpoint
    endpoint.client.close()


def test_one_frame_moves_the_counters_by_what_it_did(server, grpc_endpoint):
    frame = np.random.default_rng(5).integers(0, 60000, size=(1, 300, 200), dtype=np.uint16)
    sw_batch_size = 5
    tiles, batches = monai_tiles_and_batches(frame.shape[1:], sw_batch_size)
    assert batches == math.ceil(tiles / sw_batch_size) and batches > 1
    exposed_names_after_a_frame(server, grpc_endpoint)  # every step's metrics exist, all updates in
    before = scrape(server)
    grpc_endpoint.infer({"IMAGE_UINT16": frame}, parameters={"sw_batch_size": sw_batch_size})
    expected = {
        key("segserve_frames_total", pipeline="segment_2d", dtype="uint16"): 1,
        key("segserve_pixels_total", pipeline="segment_2d", dtype="uint16"): 300 * 200,
        key("segserve_tiles_per_frame_count", pipeline="segment_2d"): 1,
        key("segserve_tiles_per_frame_sum", pipeline="segment_2d"): tiles,
        key("segserve_bls_calls_per_frame_count", pipeline="segment_2d"): 1,
        key("segserve_bls_calls_per_frame_sum", pipeline="segment_2d"): batches,
        # One frame's BLS calls go one after another: the batcher has nothing to merge them with.
        key("segserve_network_batch_tiles_count", network=DEFAULT_NETWORK): batches,
        key("segserve_network_batch_tiles_sum", network=DEFAULT_NETWORK): tiles,
        # One Python step: preprocessing, sliding window and postprocessing in one process.
        key("segserve_step_seconds_count", step="segment_2d"): 1,
        key("segserve_step_seconds_count", step=DEFAULT_NETWORK): batches,
    }
    after = scrape_until(server, before, expected)
    moved = changes(before, after)
    seconds = {k: v for k, v in moved.items() if k[0] == "segserve_step_seconds_sum"}
    assert {k: v for k, v in moved.items() if k[0] != "segserve_step_seconds_sum"} == expected
    assert {dict(k[1])["step"] for k in seconds} == {"segment_2d", DEFAULT_NETWORK}
    assert all(0 < v < 60 for v in seconds.values()), seconds
    # The sliding window waits for the network inside its step: its time covers the network's.
    assert seconds[key("segserve_step_seconds_sum", step="segment_2d")] > \
        seconds[key("segserve_step_seconds_sum", step=DEFAULT_NETWORK)]
    # Histogram buckets: the one frame's tile count falls in the buckets at and above it.
    bucket = key("segserve_tiles_per_frame_bucket", pipeline="segment_2d", le="+Inf")
    assert after[bucket] - before.get(bucket, 0) == 1


@pytest.mark.parametrize("case, step, reason", [
    ("nan_pixels", "segment_2d", "input_error"),
    ("bad_option", "segment_2d", "option_error"),
    ("unknown_network", "segment_2d", "network_config_error"),
])
def test_refused_requests_count_by_step_and_reason(server, grpc_endpoint, case, step, reason):
    """Every refusal happens before the frame is accepted (options and network are checked
    before the frame is read; NaN pixels fail validation), so no frame or pixel counts."""
    image, parameters = np.random.default_rng(1).random((1, 64, 64), dtype=np.float32), {}
    if case == "nan_pixels":
        image[0, 3, 4] = np.nan
    elif case == "bad_option":
        parameters = {"overlap": 1.5}
    else:
        parameters = {"network": "no_such_network"}
    before = scrape(server)
    with pytest.raises(grpcclient.InferenceServerException):
        grpc_endpoint.infer({"IMAGE": image}, parameters=parameters)
    expected = {key("segserve_refused_requests_total", step=step, reason=reason): 1,
                key("segserve_step_seconds_count", step=step): 1}
    after = scrape_until(server, before, expected)
    moved = {k: v for k, v in changes(before, after).items() if k[0] != "segserve_step_seconds_sum"}
    assert moved == expected


def test_a_request_whose_client_gave_up_stops_at_its_next_tile_batch(server, grpc_endpoint):
    """A client's deadline shorter than the frame's compute: the server stops the frame at its
    next tile batch (it computed every tile for nobody, and each retry another frame's worth)."""
    frame = np.random.default_rng(6).integers(0, 60000, size=(1, 2048, 2048), dtype=np.uint16)
    sw_batch_size = 4
    tiles, _ = monai_tiles_and_batches(frame.shape[1:], sw_batch_size)
    exposed_names_after_a_frame(server, grpc_endpoint)
    before = scrape(server)
    image = grpc_endpoint.tensor("IMAGE_UINT16", frame)
    try:
        grpc_endpoint.client.infer("segment_2d", [image], parameters={"sw_batch_size": sw_batch_size},
                                   client_timeout=1.0)
        pytest.skip(f"this machine segments a 2048² frame ({tiles} tiles) within the 1 s deadline")
    except grpcclient.InferenceServerException as error:
        assert "Deadline" in str(error), error
    cancelled = key("segserve_refused_requests_total", step="segment_2d", reason="request_cancelled")
    frame_tiles = key("segserve_tiles_per_frame_sum", pipeline="segment_2d")
    # The frame's tile count follows its step time (none when it stopped before its first batch).
    after = scrape_until(server, before, {cancelled: 1, key("segserve_step_seconds_count", step="segment_2d"): 1},
                         timeout_s=300)
    moved = changes(before, after)
    assert moved.get(cancelled) == 1, moved
    assert 0 <= moved.get(frame_tiles, 0) < tiles, (moved.get(frame_tiles), tiles)


def test_refusal_reasons_and_a_missing_metrics_api():
    """Outside Triton (no pb_utils) every method is a no-op; reasons are bounded class names."""
    class NetworkCallError(RuntimeError):
        pass

    assert refusal_reason(NetworkCallError("x")) == "network_call_error"
    assert refusal_reason(torch.cuda.OutOfMemoryError("x")) == "out_of_memory_error"
    metrics = PipelineMetrics(metric_api=None)
    metrics.bind("segment_2d")
    metrics.frame_accepted(np.zeros((1, 4, 4), np.uint8))
    metrics.refused(ValueError("x"))
    assert metrics.timed(lambda r: r + 1, 1) == 2
    assert metrics.network_call(lambda t: t * 2, torch.ones(3, 1, 2, 2)).sum() == 24


def promql_metric_names(expression: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers followed by ``{`` or ``[`` or standing
    alone, minus functions, keywords and label names."""
    without_strings = re.sub(r'"[^"]*"', '""', expression)
    without_groupings = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_strings)
    without_labels = re.sub(r"\{[^}]*\}", "{}", re.sub(r"\[[^\]]*\]", "[]", without_groupings))
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", without_labels):
        following = without_labels[match.end():].lstrip()[:1]
        if following == "(":
            continue  # a function or aggregation
        word = match.group(0)
        if word in {"by", "without", "on", "ignoring", "bool", "and", "or", "unless", "offset", "le", "Inf", "inf"}:
            continue
        if word.startswith("__"):
            continue
        names.add(word)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_query_names_a_metric_the_server_exposes(server, grpc_endpoint):
    exposed = exposed_names_after_a_frame(server, grpc_endpoint)
    queries = dashboard_queries()
    assert len(queries) >= 8
    named = set()
    for query in queries:
        names = promql_metric_names(query)
        assert names, f"no metric in {query!r}"
        named |= names
    unknown = {name for name in named - exposed if name not in NOT_FROM_THIS_SERVER}
    assert not unknown, f"dashboard queries name metrics the server does not expose: {sorted(unknown)}"
    assert set(NOT_FROM_THIS_SERVER) <= named, "the exceptions list names panels the dashboard no longer has"
    # Every family of the pipeline is on the dashboard.
    for family in FAMILIES:
        assert any(name.startswith(family.removesuffix("_total")) for name in named), family


def test_promql_name_extraction():
    query = 'histogram_quantile(0.95, sum by (le, step) (rate(segserve_step_seconds_bucket{step=~"pre.*"}[5m])))'
    assert promql_metric_names(query) == {"segserve_step_seconds_bucket"}
    assert promql_metric_names("rate(x_total[$__rate_interval]) / clamp_min(y, 0.001) offset 5m") == {"x_total", "y"}
    assert promql_metric_names("sum(rate(a_total[1m])) / ignoring(x) sum(b{c=\"d\"})") == {"a_total", "b"}


def test_autoscaling_rule_reads_metrics_the_server_exposes(server, grpc_endpoint):
    exposed = exposed_names_after_a_frame(server, grpc_endpoint)
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rules
    for rule in rules:
        names = promql_metric_names(rule["metricsQuery"].replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "pod"))
        names |= promql_metric_names(rule["seriesQuery"])
        assert names and names <= exposed, sorted(names - exposed)
