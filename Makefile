# Segmentation service on Triton. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
PYTRITON := nvidia-pytriton==0.7.0
CHECKPOINT := training/checkpoints/unet2d_particles
NETWORK_ONNX := model_repository/unet2d_particles/1/model.onnx
CHECKPOINT_3D := training/checkpoints/unet3d_organs
NETWORK_3D_ONNX := model_repository/unet3d_organs/1/model.onnx

PERF_ANALYZER := .tools/bin/perf_analyzer

.PHONY: setup serve demo samples test test-fast lint bench bench-3d bench-transport loadtest soak train train-3d docker-build docker-run clean help

help:
	@echo "make setup  - virtual env with every dependency, default network exported (idempotent)"
	@echo "make serve  - run the server on 127.0.0.1 (gRPC 8001, HTTP 8000, metrics 8002) until Ctrl-C"
	@echo "make demo   - start the server, segment the sample frames into out/demo/, stop"
	@echo "make samples - sample data for the README's commands in samples/: frames, a TIFF stack, a CT volume, zarr"
	@echo "make test   - unit and integration tests against a real tritonserver"
	@echo "make test-fast - the tests that need no server (about a minute): the edit loop"
	@echo "make lint   - Python (ruff), Dockerfile (hadolint), entrypoint and Kubernetes manifests (schemas)"
	@echo "make docker-build / docker-run - server image on tritonserver:25.07; compose with a client demo (needs Docker + NVIDIA toolkit)"
	@echo "make bench  - server vs in-process MONAI on a 2048x2048 frame (fused and split layouts, per-step breakdown); 8192x8192 peak memory"
	@echo "make bench-3d - segment_3d vs in-process MONAI on a 256^3 volume; 512x512x256 peak memory"
	@echo "make bench-transport - latency per transport (gRPC, HTTP, shm) at 2048/4096; stream frames/s vs in-flight"
	@echo "make loadtest - perf_analyzer sweep (gRPC, shared memory) with real frames: CSV, PNG, table"
	@echo "make soak   - $(SOAK_SECONDS) s of load (gRPC + shm, concurrency 4): no failures, RSS growth < 10%, no shm left"
	@echo "make train  - retrain the default network (writes $(CHECKPOINT).pt/.json)"
	@echo "make train-3d - retrain the default 3D network (writes $(CHECKPOINT_3D).pt/.json)"

setup: $(SETUP_STAMP) $(NETWORK_ONNX) $(NETWORK_3D_ONNX) $(PERF_ANALYZER)

# perf_analyzer lives apart from the venv (tritonclient 2.48's binary; the venv keeps a current client).
$(PERF_ANALYZER): scripts/install_perf_analyzer.sh
	PYTHON=$(PY) bash scripts/install_perf_analyzer.sh

$(SETUP_STAMP): requirements.txt
	@# tcmalloc makes the server ~20% faster on the CPU (docs/benchmarks.md); optional.
	@if ! /sbin/ldconfig -p | grep -q libtcmalloc_minimal; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) >/dev/null || echo "note: could not install libtcmalloc-minimal4"; \
	  else echo "note: libtcmalloc-minimal4 missing (sudo apt-get install libtcmalloc-minimal4); the server will use glibc malloc"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(PYTRITON)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(NETWORK_ONNX): $(SETUP_STAMP) $(CHECKPOINT).pt $(CHECKPOINT).json export/network_export.py
	$(PY) -m export --spec $(CHECKPOINT).json --checkpoint $(CHECKPOINT).pt --name unet2d_particles --overwrite

$(NETWORK_3D_ONNX): $(SETUP_STAMP) $(CHECKPOINT_3D).pt $(CHECKPOINT_3D).json export/network_export.py
	$(PY) -m export --spec $(CHECKPOINT_3D).json --checkpoint $(CHECKPOINT_3D).pt --name unet3d_organs --overwrite

serve: setup
	$(PY) -m segserve serve

demo: setup
	$(PY) -m scripts.demo

samples: $(SETUP_STAMP)
	$(PY) -m training.samples --out samples

# Tiers (README "Tests"): test = everything (CI); test-fast = no server, about a minute.
test: setup
	$(PY) -m pytest tests

test-fast: $(SETUP_STAMP)
	$(PY) -m pytest tests -m "not server and not slow" -q

# Deployment files without Docker or a cluster: Dockerfile lint, entrypoint syntax, Kubernetes schemas.
K8S_MANIFESTS := $(filter-out deploy/k8s/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))
lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile
	bash -n docker/entrypoint.sh
	$(VENV)/bin/kubernetes-validate --strict --quiet -k 1.33 $(K8S_MANIFESTS)

IMAGE ?= segserve:latest
docker-build: setup
	docker build -f docker/Dockerfile -t $(IMAGE) .

docker-run:
	@test -n "$$SEGSERVE_TOKEN" || { echo "set SEGSERVE_TOKEN first: the restricted endpoints token (letters, digits, . _ ~ -)"; exit 2; }
	docker compose -f docker/compose.yaml up

bench: setup
	$(PY) -m scripts.bench_2d

bench-3d: setup
	$(PY) -m scripts.bench_3d

bench-transport: setup
	$(PY) -m scripts.bench_transport

SOAK_SECONDS ?= 600
soak: setup
	$(PY) -m scripts.soak --duration $(SOAK_SECONDS)

loadtest: setup
	$(PY) -m scripts.loadtest

train: $(SETUP_STAMP)
	$(PY) -m training.train_2d --out $(CHECKPOINT)

train-3d: $(SETUP_STAMP)
	$(PY) -m training.train_3d --out $(CHECKPOINT_3D)

clean:
	rm -rf out samples bench_results model_repository/unet2d_particles model_repository/unet3d_organs .tools

# segment-dataset on LocalClusters with 1 and 2 servers/workers, Dask overhead per task: bench_results/dataset.json
.PHONY: bench-dataset
bench-dataset: setup
	$(PY) -m scripts.bench_dataset
