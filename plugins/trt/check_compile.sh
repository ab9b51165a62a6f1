#!/usr/bin/env bash
# Compile check of the TensorRT plugin, its host smoke test and the C++ example against TensorRT
# headers, on a machine with no GPU and no TensorRT runtime (-Wall -Wextra -Werror, TensorRT and
# CUDA headers as -isystem), then an nvcc front-end pass over the same sources, then the tests that
# need no GPU (logic unit tests, host smoke test of both libraries).
#
#   plugins/trt/check_compile.sh [BUILD_DIR]
#
# Environment:
#   TensorRT_ROOT        folder with include/NvInferRuntime.h (default: /tmp/trt_headers when present;
#                        the public NVIDIA/TensorRT repository's include/ folder is enough)
#   CE_KERNELS_AOT_DIR   ce_kernels.aot output folder(s) to embed (;-separated); default: embed none
#                        (CE_TRT_EMBED_KERNELS=OFF), which compiles the same code paths
#   CE_TRT_CHECK_NVCC=0  skip the nvcc pass
#   CE_TRT_HOST_TEST_KERNELS  fixture|any|no: what the embedded kernels are, for the host smoke test
#                        (default: "any" with CE_KERNELS_AOT_DIR, else "no"; "fixture" when the folder
#                        holds tests/fixtures/ce_k4_nce2_e8.inc as its kernel_set.inc)
#
# Prints "TensorRT headers not found: skipping the plugin compile check" and exits 0 without headers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${1:-${TMPDIR:-/tmp}/ce_trt_compile_check}"
root="${TensorRT_ROOT:-}"
if [[ -z "$root" && -f /tmp/trt_headers/include/NvInferRuntime.h ]]; then
  root=/tmp/trt_headers
fi
if [[ -z "$root" || ! -f "$root/include/NvInferRuntime.h" ]]; then
  echo "TensorRT headers not found: skipping the plugin compile check"
  exit 0
fi
version_file="$root/include/NvInferVersion.h"
version="unknown"
if [[ -f "$version_file" ]]; then
  version="$(awk '/#define (TRT|NV_TENSORRT)_(MAJOR|MINOR|PATCH|BUILD)(_ENTERPRISE)? [0-9]/ {printf "%s%s", sep, $3; sep="."}' "$version_file")"
fi
echo "TensorRT headers: $root/include (TensorRT $version)"
echo "compiler: $(c++ --version | head -n 1)"

generator=()
if command -v ninja > /dev/null; then
  generator=(-G Ninja)
fi
embed=(-DCE_TRT_EMBED_KERNELS=OFF)
kernels=no
if [[ -n "${CE_KERNELS_AOT_DIR:-}" ]]; then
  embed=(-DCE_TRT_EMBED_KERNELS=ON "-DCE_KERNELS_AOT_DIR=${CE_KERNELS_AOT_DIR}")
  kernels=any
fi
kernels="${CE_TRT_HOST_TEST_KERNELS:-$kernels}"

echo "== cmake configure + build ($build)"
cmake -S "$here" -B "$build" "${generator[@]}" -DTensorRT_ROOT="$root" -DCE_TRT_WERROR=ON "${embed[@]}" > "$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
grep -E "TensorRT (headers|library)" "$build.configure.log" || true
cmake --build "$build" -j "$(nproc)"
for artifact in libce_export_trt.so libce_export_trt_dynamic.so ce_plugin_host_test ce_moe_logic_tests; do
  if [[ ! -e "$build/$artifact" ]]; then
    echo "missing build output: $artifact (were the TensorRT headers picked up?)"
    exit 1
  fi
done
echo "built: libce_export_trt.so libce_export_trt_dynamic.so ce_plugin_host_test ce_moe_logic_tests + examples/run_engine.cpp (compiled$([[ -e "$build/ce_run_engine" ]] && echo ", linked" || echo "; not linked: no libnvinfer"))"

echo "== exported symbols"
dynamic_exports="$(nm -D --defined-only "$build/libce_export_trt_dynamic.so" | awk '{print $3}' | sort | tr '\n' ' ')"
static_exports="$(nm -D --defined-only "$build/libce_export_trt.so" | awk '{print $3}' | sort | tr '\n' ' ')"
echo "libce_export_trt_dynamic.so: ${dynamic_exports:-none}"
echo "libce_export_trt.so: ${static_exports:-none}"
[[ "$dynamic_exports" == "getCreators setLoggerFinder " ]] || { echo "unexpected exports"; exit 1; }
[[ -z "$static_exports" ]] || { echo "unexpected exports"; exit 1; }

if [[ "${CE_TRT_CHECK_NVCC:-1}" != "0" ]] && command -v nvcc > /dev/null; then
  echo "== nvcc front end: $(nvcc --version | tail -n 2 | head -n 1)"
  for source in src/moe_plugin.cpp src/kernel_runtime.cpp src/cuda_driver.cpp src/register_static.cpp \
                src/register_dynamic.cpp src/moe_plugin_logic.cpp examples/run_engine.cpp; do
    nvcc -x cu -std=c++17 -arch=sm_90 -Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror \
      -isystem "$root/include" -I "$here/src" -c "$here/$source" -o "$build/nvcc_$(basename "$source").o"
    echo "nvcc ok: $source"
  done
else
  echo "== nvcc pass skipped"
fi

echo "== tests that need no GPU"
"$build/ce_moe_logic_tests"
"$build/ce_plugin_host_test" "$build/libce_export_trt.so" "$build/libce_export_trt_dynamic.so" --kernels "$kernels"
echo "plugin compile check passed (TensorRT $version headers; nothing was run on a GPU)"
