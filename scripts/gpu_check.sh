#!/usr/bin/env bash
# The whole GPU check in one call, on a GPU machine with no package registry (the device tool):
# installs the wheels carried in .whl/, exports the default networks, runs the test suite with
# the pipeline on the GPU, then the 2D and 3D benchmarks (GPU vs CPU pre/postprocessing
# included), and prints short tables last.
#
#   .whl/ must hold: nvidia_pytriton-0.7.0 (manylinux, 55 MB), monai-1.6.1, tritonclient-2.73.0
#   (py3-none-any), and for the client's HDF5 stacks and CUDA shared memory h5py-3.16.0,
#   cuda_python-13.4.4, cuda_bindings-13.4.4 and cuda_pathfinder (cp312 manylinux; `pip download
#   --only-binary=:all: --python-version 3.12 --no-deps`), nibabel-5.4.2 (NIfTI volumes); the
#   rest (torch, onnx, onnxruntime, numpy, ...) comes with the GPU image. Optional: cucim-cu12
#   (GPU connected components; without it keep_largest labels on the CPU), kubernetes-validate
#   and PyYAML (the deployment tests skip without them).
#   Results go to $OUT (the device tool's folder) or ./gpu_results. Carry .tools/ too for the
#   short load test (perf_analyzer); the device tool's 64 MiB limit may force a separate call.
#   GPU_CHECK_TESTS=<pytest -k expr>, GPU_CHECK_BENCH=0, GPU_CHECK_LOADTEST=0, GPU_CHECK_LARGE=<side>,
#   GPU_CHECK_TRANSPORT=0 (skips the per-transport benchmark, CUDA shared memory included)
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-gpu_results}
mkdir -p "$results"
# Into the image's own environment: the Python-backend stub finds packages through the python3
# on PATH, not through PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"
python3 -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
python3 -m export --spec training/checkpoints/unet2d_particles.json --checkpoint training/checkpoints/unet2d_particles.pt \
    --name unet2d_particles --overwrite 2>&1 | grep -v -i warn
python3 -m export --spec training/checkpoints/unet3d_organs.json --checkpoint training/checkpoints/unet3d_organs.pt \
    --name unet3d_organs --overwrite 2>&1 | grep -v -i warn
python3 -m scripts.gpu_network_probe 2>&1 | grep -v -i warn
python3 -m pytest tests -q -p no:cacheprovider ${GPU_CHECK_TESTS:+-k "$GPU_CHECK_TESTS"} 2>&1 | tee "$results/tests.log" | tail -25
tests_status=${PIPESTATUS[0]}
[ "${GPU_CHECK_BENCH:-1}" = 1 ] && python3 -m scripts.bench_2d --repeats 5 --large-size "${GPU_CHECK_LARGE:-8192}" --out "$results" 2>&1 | grep -v -i warn | tail -3
[ "${GPU_CHECK_BENCH:-1}" = 1 ] && python3 -m scripts.bench_3d --repeats 3 --out "$results" 2>&1 | grep -v -i warn | tail -4
[ "${GPU_CHECK_TRANSPORT:-1}" = 1 ] && python3 -m scripts.bench_transport --repeats 3 --out "$results" 2>&1 | grep -v -i warn | tail -30
# A short load test when perf_analyzer travelled along (.tools/, from `make setup`; about 21 MB).
if [ "${GPU_CHECK_LOADTEST:-1}" = 1 ] && .tools/bin/perf_analyzer --version >/dev/null 2>&1; then
    python3 -m scripts.loadtest --size 2048 --concurrency 1,4 --request-count 20 --out "$results/loadtest" 2>&1 | grep -v -i warn | tail -8
else
    echo "(load test skipped: .tools/bin/perf_analyzer not carried or GPU_CHECK_LOADTEST=0)"
fi
echo "=== GPU check: tests exit $tests_status ==="
[ -f "$results/bench_2d.md" ] && cat "$results/bench_2d.md"
[ -f "$results/bench_3d.md" ] && cat "$results/bench_3d.md"
exit "$tests_status"
