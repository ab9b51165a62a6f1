#!/usr/bin/env bash
# The prepared GPU check, one command on a lent GPU machine (issue 17), or its dry run on a CPU:
#
#   bash benchmarks/gpu_check.sh OUT              # on the GPU machine: bash benchmarks/gpu_check.sh "$OUT"
#   bash benchmarks/gpu_check.sh OUT --dry-run    # any machine: the same steps on the CPU, tiny sizes (CI)
#
# Steps, in this order, each under `timeout` and independent (a failed or timed-out step is recorded
# and the next one runs); estimates are for an H200 / H100 (basis: benchmarks/README.md, "GPU check"):
#
#   step        what                                                              estimate  limit
#   env         nvidia-smi, package versions, ONNX Runtime providers                  10 s    45 s
#   cuda-tests  GPU-only tests: kernels in bf16 / fp16 / fp32 at OLMoE shapes vs       60 s   120 s
#               the fp32 reference, the CUDA op on the kernels (strict), CUDA-graph
#               replay of the layer and of the fast path's decode
#   moe-layer   benchmarks/moe_layer.py: one layer, every implementation, floor         100 s   150 s
#   e2e-plain   end_to_end.py --suite gpu --models plain: writes the shared random     170 s   210 s
#               checkpoints (about 45 s), batch 1 and 8, headline after the model
#   e2e-ce      the same for the CE model, reusing the checkpoints                      90 s   150 s
#                                                                            total  ~430 s (7.2 min)
#
# No ONNX export unless ONNX Runtime has the device's execution provider (`end_to_end.py --export
# auto`): for the CUDA rows, install onnxruntime-gpu into /tmp/site first (../shared/tools/
# device-wheels.sh), which this script puts on PYTHONPATH; the two 7B exports then add about 2-3
# minutes, so run the end-to-end steps alone in that command: GPU_CHECK_STEPS=e2e-plain,e2e-ce (a
# comma-separated list of the steps to run; also the way to rerun a failed step). The script starts
# no step after its deadline (GPU_CHECK_BUDGET_S, default 540 s, each step's limit cut to what is
# left), so it ends inside the device's 10-minute command limit. Benchmarks run with
# CE_EXPORT_STRICT_KERNELS=1: a row whose MoE op would fall back to the reference math fails
# instead of timing it.
#
# Results: every file goes to a work folder outside OUT (/tmp/gpu-check/<device>/) and, after every
# step, OUT gets (the device returns at most 8 files, so the tree travels as one archive):
#   <device>-gpu-check.tar.gz   the whole work folder so far: logs/, tests/, moe_layer/, end_to_end/
#   <device>-steps.tsv          one line per step: status, exit code, seconds, estimate, limit
#   <device>-summary.md         the step table, the end-to-end headline so far, failed steps' log tails
#   <device>-console.log        everything printed, as it is printed
# <device> is the GPU model (h200, h100) or cpu-<cores>core. Exit code 0 when every step passed.
set -u
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [--dry-run]}
command="bash benchmarks/gpu_check.sh $*"
dry_run=0
[ "${2:-}" = "--dry-run" ] && dry_run=1
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONPATH="$repo:$repo/plugins:$repo/calibrate${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
export PYTHONUNBUFFERED=1 CE_EXPORT_STRICT_KERNELS=1 TRITON_DEFAULT_FP_FUSION=1
[ $dry_run = 1 ] && export CUDA_VISIBLE_DEVICES=""
python=${PYTHON:-python3}
started=$(date +%s)
deadline=$((started + ${GPU_CHECK_BUDGET_S:-540}))

device=$(timeout 120 "$python" -c "from ce_export.bench import device_slug; print(device_slug())" 2>/dev/null)
[ -n "$device" ] || device=unknown-device
work_root=${GPU_CHECK_WORK:-/tmp/gpu-check}
work=$work_root/$device
scratch=$work_root/scratch
rm -rf "$work" && mkdir -p "$work/logs" "$scratch"
exec > >(tee -a "$out/$device-console.log") 2>&1
console_tee=$!
steps_tsv=$work/steps.tsv
printf 'step\tstatus\texit_code\tseconds\testimate_s\tlimit_s\tdevice\n' >"$steps_tsv"
echo "gpu_check on $device, $(date -u +%Y-%m-%dT%H:%M:%SZ), $([ $dry_run = 1 ] && echo 'dry run on the CPU' || echo 'GPU run')"
echo "command: $command; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

publish() {  # copy the work folder into OUT: one archive plus the small files people read first
  cp "$steps_tsv" "$out/$device-steps.tsv"
  {
    echo "# GPU check on $device"
    echo
    echo "Command: \`$command\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - started )) s so far."
    echo
    echo "| step | status | exit code | seconds | estimate (s) | limit (s) |"
    echo "|---|---|---|---|---|---|"
    tail -n +2 "$steps_tsv" | while IFS=$'\t' read -r step status rc seconds estimate limit _; do
      echo "| $step | $status | $rc | $seconds | $estimate | $limit |"
    done
    if [ -f "$work/end_to_end/headline.md" ]; then
      echo; echo "## End-to-end headline"; echo; cat "$work/end_to_end/headline.md"
    fi
    tail -n +2 "$steps_tsv" | while IFS=$'\t' read -r step status _; do
      if [ "$status" != ok ]; then
        echo; echo "## $step: $status (last lines of logs/$step.log)"; echo; echo '```'
        tail -n 30 "$work/logs/$step.log" 2>/dev/null; echo '```'
      fi
    done
  } >"$work/summary.md"
  cp "$work/summary.md" "$out/$device-summary.md"
  tar -czf "$out/.$device-gpu-check.tar.gz.partial" -C "$work_root" "$device" \
    && mv "$out/.$device-gpu-check.tar.gz.partial" "$out/$device-gpu-check.tar.gz"
}

failed=0
selected() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]; }
step() {  # step NAME ESTIMATE_S LIMIT_S FUNCTION [ARGS]: run under timeout, log to logs/NAME.log, record, publish
  local name=$1 estimate=$2 limit=$3
  shift 3
  selected "$name" || return 0
  local left=$((deadline - $(date +%s) - 15))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, no time left before the deadline"
    printf '%s\tskipped\t-\t0\t%s\t%s\t%s\n' "$name" "$estimate" "$limit" "$device" >>"$steps_tsv"
    failed=1
    publish
    return
  fi
  echo "== $name (estimate ${estimate} s on an H200, limit ${limit} s): $*"
  local begin rc status
  begin=$(date +%s)
  # A child bash runs the step's function; timeout signals its whole process group.
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee "$work/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local seconds=$(( $(date +%s) - begin ))
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout; failed=1 ;;
    *) status=failed; failed=1 ;;
  esac
  echo "== $name: $status (exit code $rc) in ${seconds} s (estimate ${estimate} s)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$estimate" "$limit" "$device" >>"$steps_tsv"
  publish
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    || echo "nvidia-smi: not available"
  "$python" - <<'EOF'
import importlib, platform
print(f"python {platform.python_version()}")
for name in ("torch", "triton", "transformers", "numpy", "onnx", "onnxscript", "onnx_ir", "onnxruntime"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError as error:
        print(f"{name}: not importable ({error})")
import torch
print("cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0), torch.version.cuda)
try:
    import onnxruntime
    print("onnxruntime providers:", onnxruntime.get_available_providers())
except ImportError:
    pass
from ce_export import ort_support
print("onnxruntime loads IR <=", ort_support.max_ir_version(), "| com.microsoft::MoE fp32:",
      ort_support.moe_lowering_blocker("fp32") or "lowered")
EOF
}

cuda_tests() {
  mkdir -p "$work/tests"
  "$python" -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_runtime.py \
    -k "on_gpu or cuda_graph or cuda_op" --junitxml="$work/tests/junit.xml"
}

moe_layer() {
  mkdir -p "$work/moe_layer"
  if [ $dry_run = 1 ]; then
    "$python" benchmarks/moe_layer.py --dry-run | tee "$work/moe_layer/moe_layer-dry-run.txt"
  else
    "$python" benchmarks/moe_layer.py --out "$work/moe_layer" --budget-s 0.25
  fi
}

end_to_end() {
  local model=$1
  local options=(--budget 0.25)
  # The dry run exports the plain model (ONNX Runtime's CPU provider is there) and not the CE one,
  # so CI goes through both branches of --export auto.
  [ $dry_run = 1 ] && options=(--size tiny --device cpu --quick --budget 0.01 --export "$([ "$model" = plain ] && echo auto || echo never)")
  "$python" benchmarks/end_to_end.py --suite gpu --models "$model" "${options[@]}" --out "$work/end_to_end" \
    --checkpoints "$scratch/checkpoints" --scratch "$scratch"
}

export work scratch dry_run python
export -f environment cuda_tests moe_layer end_to_end
step env 10 45 environment
step cuda-tests 60 120 cuda_tests
step moe-layer 100 150 moe_layer
step e2e-plain 170 210 end_to_end plain
step e2e-ce 90 150 end_to_end ce
rm -rf "$scratch"
echo "gpu_check done in $(( $(date +%s) - started )) s (estimate 430 s on an H200); results in $out:"
ls -l "$out"
exec >&- 2>&-
wait "$console_tee"  # the console log complete before the command returns
exit $failed
