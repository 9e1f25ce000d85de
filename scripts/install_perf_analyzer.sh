#!/usr/bin/env bash
# Installs perf_analyzer apart from the main environment, into .tools/perf_analyzer, with a
# wrapper at .tools/bin/perf_analyzer. The binary comes from the tritonclient 2.48.0 manylinux
# wheel (newer wheels' binaries need glibc 2.38); it needs libcudart.so.12 (PyPI
# nvidia-cuda-runtime-cu12) and libb64 (Debian libb64-0d, unpacked, so no root is needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
root=.tools/perf_analyzer
wrapper=.tools/bin/perf_analyzer
[ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1 && exit 0
rm -rf "$root" && mkdir -p "$root/download" "$root/bin" "$root/lib" .tools/bin
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$root/download" \
    tritonclient==2.48.0 nvidia-cuda-runtime-cu12==12.9.79
(cd "$root/download" && apt-get download libb64-0d 2>/dev/null)
unzip -q -o -j "$root"/download/tritonclient-2.48.0-*.whl 'tritonclient-2.48.0.data/data/bin/perf_analyzer' -d "$root/bin"
unzip -q -o -j "$root"/download/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$root/lib"
dpkg -x "$root"/download/libb64-0d_*.deb "$root/download/b64"
cp "$root"/download/b64/usr/lib/x86_64-linux-gnu/libb64.so.0d "$root/lib/"
rm -rf "$root/download"
cat > "$wrapper" <<'WRAP'
#!/usr/bin/env bash
here=$(cd "$(dirname "$0")/../perf_analyzer" && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"
WRAP
chmod +x "$wrapper" "$root/bin/perf_analyzer"
"$wrapper" --version >/dev/null 2>&1 || { echo "perf_analyzer installed but does not run: $wrapper" >&2; exit 1; }
echo "perf_analyzer ready: $wrapper"
