#!/usr/bin/env bash
# The end-to-end GPU suite in one command, on a CUDA machine with PyTorch, Triton, transformers,
# onnx, onnxscript and onnx-ir installed (ce_export itself need not be installed: it runs from
# this checkout). ONNX Runtime CUDA rows appear when onnxruntime-gpu is importable (for example
# from wheels installed into /tmp/site, see benchmarks/README.md); otherwise the run says so.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [extra end_to_end.py arguments]
#
# OUT_DIR defaults to benchmarks/results/gpu-<gpu name>. Prints one line per stage and point,
# then the headline table; expect 6-9 minutes on an H100 (two 7B-parameter fp16 exports included).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PYTHONPATH="$repo:$repo/plugins:$repo/calibrate${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
gpu=$(python3 -c "
import re, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    model = re.search(r'\b([A-Z]+\d{2,4}[A-Z]?)\b', name)
    print((model.group(1) if model else re.sub(r'\W+', '-', name)).lower())
" 2>/dev/null || true)
if [ -z "$gpu" ]; then
  echo "gpu_suite.sh: no CUDA device visible to PyTorch; for a CPU dry run use" >&2
  echo "  python benchmarks/end_to_end.py --suite gpu --size tiny --device cpu --quick" >&2
  exit 2
fi
out=${1:-benchmarks/results/gpu-$gpu}
shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "onnx", "onnxscript", "onnx_ir", "onnxruntime"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError as error:
        print(f"{name}: not importable ({error})")
try:
    import onnxruntime
    print("onnxruntime providers:", onnxruntime.get_available_providers())
except ImportError:
    pass
EOF
python3 benchmarks/end_to_end.py --suite gpu --budget 0.3 --out "$out" --scratch "${SCRATCH:-/tmp}" "$@"
