"""trtexec benchmarks of DIR/model.plan: a ready script, the runner, and parsers of trtexec's reports.

    write_trtexec_script(DIR)  -> DIR/trtexec.sh: one trtexec command per shape point (prefill and
                                  decode), for TensorRT 10 and 11 flag sets, the major version found at
                                  run time from trtexec's banner ("[TensorRT v110100]")
    run_trtexec(DIR)           -> runs the same commands here, writes DIR/bench.json
    parse_trtexec_output(text) -> the "=== Performance summary ===" block and CUDA-graph status
    parse_export_times(data)   -> statistics of an --exportTimes JSON trace

Flags (notes: trt-ort-export.md section 6): TensorRT 11 trtexec has CUDA graphs on, data transfers
off and a separate profile run by default, and no precision flags (strong typing only); TensorRT 10
needs --useCudaGraph --noDataTransfers --separateProfileRun --stronglyTyped for the same measurement.
`trtexec --version` exits 1 on TensorRT 11 (it wants a model), so the banner is read from `--help`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ce_export.artifacts import write_json
from ce_export.engine import DECODE, PLAN, PREFILL, PLUGIN_LIBRARY_ENV
from ce_export.errors import BuildError
from ce_export.io_schema import TensorSpec, onnx_io, resolve_dims
from ce_export.manifest import Manifest, Profile, read_manifest

SCRIPT = "trtexec.sh"
BENCH = "bench.json"
LOG_DIR = "trtexec"
PERCENTILES = (50, 90, 99)
COMMON_FLAGS = [f"--percentile={','.join(str(p) for p in PERCENTILES)}"]
VERSION_FLAGS = {
    10: ["--useCudaGraph", "--noDataTransfers", "--separateProfileRun", "--stronglyTyped"],
    11: [],  # TensorRT 11 defaults: CUDA graph on, no data transfers, separate profile run; strongly typed only
}
BUILD_FLAGS = {10: ["--stronglyTyped"], 11: []}
PROFILE_INDEX = {PREFILL: 0, DECODE: 1}
DEFAULT_DURATION_S = 5
DEFAULT_WARMUP_MS = 500
DEFAULT_ITERATIONS = 100

_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[[A-Z]\]\s*")  # "[04/11/2025-15:15:52] [I] "
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"
_METRIC = re.compile(rf"^(?P<name>[A-Za-z][A-Za-z0-9 -]*?): min = (?P<min>{_NUMBER}) ms, max = (?P<max>{_NUMBER}) ms, "
                     rf"mean = (?P<mean>{_NUMBER}) ms, median = (?P<median>{_NUMBER}) ms(?P<rest>.*)$")
_PERCENTILE = re.compile(rf"percentile\((?P<p>{_NUMBER})%\) = (?P<v>{_NUMBER}) ms")
_BANNER = re.compile(r"TensorRT v(?P<code>\d{4,6})\]")
_VERSION_LINE = re.compile(r"TensorRT version: (?P<version>\d+\.\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class BenchPoint:
    """One benchmark shape: profile "prefill" (past 0) or "decode" (sequence 1)."""

    profile: str
    batch: int
    sequence: int
    past: int

    @property
    def name(self) -> str:
        if self.profile == PREFILL:
            return f"prefill_b{self.batch}_s{self.sequence}"
        return f"decode_b{self.batch}_past{self.past}"

    @property
    def profile_index(self) -> int:
        return PROFILE_INDEX[self.profile]

    def axis_values(self) -> dict[str, int]:
        return {"batch": self.batch, "sequence": self.sequence, "past_sequence": self.past,
                "total_sequence": self.past + self.sequence}


def default_points(limits: dict[str, int]) -> list[BenchPoint]:
    """Prefill: batch 1 at 128/512/2048 tokens; decode: batch 1 and 8 at past 512/2048 (capped at the limits)."""
    max_batch, max_seq, max_context = limits["max_batch"], limits["max_sequence"], limits["max_context"]
    points = [BenchPoint(PREFILL, 1, s, 0) for s in sorted({min(s, max_seq) for s in (128, 512, 2048)})]
    for batch in sorted({min(b, max_batch) for b in (1, 8)}):
        points += [BenchPoint(DECODE, batch, 1, p) for p in sorted({min(p, max_context) for p in (512, 2048)})]
    return points


def check_points(points: Iterable[BenchPoint], limits: dict[str, int]) -> list[BenchPoint]:
    points = list(points)
    for point in points:
        if point.profile not in PROFILE_INDEX:
            raise BuildError(f"bench point {point}: profile must be {PREFILL} or {DECODE}")
        if point.profile == PREFILL and point.past != 0 or point.profile == DECODE and point.sequence != 1:
            raise BuildError(f"bench point {point.name}: prefill has past 0, decode has sequence 1")
        if not (1 <= point.batch <= limits["max_batch"] and 1 <= point.sequence <= limits["max_sequence"]
                and 0 <= point.past <= limits["max_context"]):
            raise BuildError(f"bench point {point.name} is outside the engine's limits {limits}")
    return points


def shapes_arg(inputs: list[TensorSpec], point: BenchPoint) -> str:
    """trtexec --shapes value: every input, e.g. "input_ids:1x512,...,past_key_values.0.key:1x4x0x32"."""
    values = point.axis_values()
    return ",".join(f"{spec.name}:{'x'.join(str(d) for d in resolve_dims(spec, values))}" for spec in inputs)


def profile_shape_args(inputs: list[TensorSpec], profiles: list[Profile]) -> list[str]:
    """trtexec build flags for the engine's profiles: --profile=N --minShapes=... --optShapes=... --maxShapes=..."""
    args = []
    for profile in profiles:
        axes = profile.axes
        args.append(f"--profile={profile.index}")
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            values = {axis: v[i] for axis, v in axes.items()}
            args.append(f"{flag}=" + ",".join(
                f"{s.name}:{'x'.join(str(d) for d in resolve_dims(s, values))}" for s in inputs))
    return args


def _engine_profiles(manifest: Manifest, limits: dict[str, int]) -> list[Profile]:
    if manifest.engine is not None and manifest.engine.profiles:
        return manifest.engine.profiles
    from ce_export.engine import profile_axes

    axes = profile_axes(limits["max_batch"], limits["max_sequence"], limits["max_context"])
    return [Profile(index=i, name=n, axes={a: list(v) for a, v in r.items()}) for i, (n, r) in enumerate(axes.items())]


def _recorded_plugin(manifest: Manifest, plugin_library: str | Path | None) -> str | None:
    if plugin_library:
        return str(plugin_library)
    plugin = manifest.engine.plugin if manifest.engine is not None else None
    return plugin.library if plugin is not None and plugin.bound else None


# ----------------------------------------------------------------------------------------- script


def write_trtexec_script(
    build_dir: str | Path,
    *,
    points: Iterable[BenchPoint] | None = None,
    plugin_library: str | Path | None = None,
    duration_s: int = DEFAULT_DURATION_S,
    warmup_ms: int = DEFAULT_WARMUP_MS,
    iterations: int = DEFAULT_ITERATIONS,
) -> Path:
    """Write DIR/trtexec.sh (executable, atomically): `bash trtexec.sh [--build] [POINT ...]`; the limits,
    profiles and plugin are the engine's recorded in manifest.json (else the export limits)."""
    build_dir = Path(build_dir)
    manifest = Manifest.read(build_dir)
    inputs, _ = onnx_io(build_dir / manifest.onnx.file)
    limits = manifest.engine_limits.model_dump()
    points = check_points(points if points is not None else default_points(limits), limits)
    plugin = _recorded_plugin(manifest, plugin_library)
    profiles = _engine_profiles(manifest, limits)

    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by ce_export (ce_export/trtexec.py) for {manifest.onnx.file}: trtexec benchmarks of {PLAN}.",
        "#   bash trtexec.sh [POINT ...]   run every point (default) or the named ones; logs + --exportTimes JSON in $OUT",
        "#   bash trtexec.sh --build        build model.plan from model.onnx with trtexec (both profiles) instead",
        "#   bash trtexec.sh --list         print the point names",
        "# Environment: TRTEXEC (else trtexec on PATH, else $TRT_ROOT/bin/trtexec), TRT_MAJOR (else read from the",
        f"# banner of `trtexec --help`), {PLUGIN_LIBRARY_ENV} (plugin .so, loaded with --staticPlugins), OUT,",
        "# DURATION (s), WARMUP (ms), ITERATIONS.",
        "# TensorRT 11 trtexec: CUDA graphs on, data transfers off, separate profile run, strong typing by default;",
        "# TensorRT 10 gets the flags that make the same measurement (--useCudaGraph --noDataTransfers ...).",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f'PLAN="${{PLAN:-$HERE/{PLAN}}}"',
        f'ONNX="${{ONNX:-$HERE/{manifest.onnx.file}}}"',
        f'OUT="${{OUT:-$HERE/{LOG_DIR}}}"',
        f'DURATION="${{DURATION:-{int(duration_s)}}}"',
        f'WARMUP="${{WARMUP:-{int(warmup_ms)}}}"',
        f'ITERATIONS="${{ITERATIONS:-{int(iterations)}}}"',
        f'PLUGIN_LIB="${{{PLUGIN_LIBRARY_ENV}-{plugin or ""}}}"',
        "",
        'if [[ -z "${TRTEXEC:-}" ]]; then',
        '  if command -v trtexec >/dev/null 2>&1; then TRTEXEC="$(command -v trtexec)"',
        '  elif [[ -n "${TRT_ROOT:-}" && -x "$TRT_ROOT/bin/trtexec" ]]; then TRTEXEC="$TRT_ROOT/bin/trtexec"',
        '  else echo "trtexec.sh: trtexec not found (put it on PATH, or set TRT_ROOT or TRTEXEC)" >&2; exit 2; fi',
        "fi",
        'if [[ -z "${TRT_MAJOR:-}" ]]; then',
        '  banner="$("$TRTEXEC" --help 2>&1 || true)"',
        '  if [[ $banner =~ TensorRT\\ v([0-9]{4,6})\\] ]]; then TRT_MAJOR=$(( 10#${BASH_REMATCH[1]} / 10000 ))',
        '  elif [[ $banner =~ TensorRT\\ version:\\ ([0-9]+) ]]; then TRT_MAJOR=${BASH_REMATCH[1]}',
        '  else echo "trtexec.sh: cannot read the TensorRT version from $TRTEXEC --help" >&2; exit 2; fi',
        "fi",
        'if (( TRT_MAJOR >= 11 )); then',
        f"  VERSION_FLAGS=({' '.join(q(f) for f in VERSION_FLAGS[11])})",
        f"  BUILD_FLAGS=({' '.join(q(f) for f in BUILD_FLAGS[11])})",
        "else",
        f"  VERSION_FLAGS=({' '.join(q(f) for f in VERSION_FLAGS[10])})",
        f"  BUILD_FLAGS=({' '.join(q(f) for f in BUILD_FLAGS[10])})",
        "fi",
        'PLUGIN_FLAGS=()',
        'if [[ -n "$PLUGIN_LIB" ]]; then PLUGIN_FLAGS=(--staticPlugins="$PLUGIN_LIB"); fi',
        'mkdir -p "$OUT"',
        "",
        "POINTS=(" + " ".join(p.name for p in points) + ")",
        "declare -A PROFILE SHAPES",
    ]
    for point in points:
        lines.append(f"PROFILE[{point.name}]={point.profile_index}")
        lines.append(f"SHAPES[{point.name}]={q(shapes_arg(inputs, point))}")
    lines += [
        "",
        "run_point() {",
        '  local name="$1"',
        '  echo "=== $name (TensorRT $TRT_MAJOR, profile ${PROFILE[$name]}) ==="',
        '  "$TRTEXEC" --loadEngine="$PLAN" --useProfile="${PROFILE[$name]}" --shapes="${SHAPES[$name]}" \\',
        f'    --warmUp="$WARMUP" --duration="$DURATION" --iterations="$ITERATIONS" {" ".join(q(f) for f in COMMON_FLAGS)} \\',
        '    --exportTimes="$OUT/$name.times.json" \\',
        '    ${VERSION_FLAGS[@]+"${VERSION_FLAGS[@]}"} ${PLUGIN_FLAGS[@]+"${PLUGIN_FLAGS[@]}"} 2>&1 | tee "$OUT/$name.log"',
        "}",
        "",
        "build_plan() {",
        '  "$TRTEXEC" --onnx="$ONNX" --saveEngine="$PLAN" --skipInference \\',
        "    " + " ".join(q(a) for a in profile_shape_args(inputs, profiles)) + " \\",
        '    ${BUILD_FLAGS[@]+"${BUILD_FLAGS[@]}"} ${PLUGIN_FLAGS[@]+"${PLUGIN_FLAGS[@]}"} 2>&1 | tee "$OUT/build.log"',
        "}",
        "",
        'case "${1:-}" in',
        "  --build) build_plan; exit ;;",
        '  --list) printf "%s\\n" "${POINTS[@]}"; exit ;;',
        "esac",
        'if [[ ! -f "$PLAN" ]]; then echo "trtexec.sh: $PLAN missing (build it first, or run: bash trtexec.sh --build)" >&2; exit 2; fi',
        'selected=("$@")',
        'if (( ${#selected[@]} == 0 )); then selected=("${POINTS[@]}"); fi',
        'for name in "${selected[@]}"; do',
        '  if [[ -z "${SHAPES[$name]+x}" ]]; then echo "trtexec.sh: unknown point $name (see --list)" >&2; exit 2; fi',
        '  run_point "$name"',
        "done",
        "",
    ]
    script = build_dir / SCRIPT
    partial = script.with_name(f".{SCRIPT}.partial")
    partial.write_text("\n".join(lines))
    partial.chmod(0o755)
    os.replace(partial, script)
    return script


# ----------------------------------------------------------------------------------------- parsers


def version_from_banner(text: str) -> str | None:
    """"[TensorRT v101300]" -> "10.13.0", "[TensorRT v8601]" -> "8.6.1"; else "TensorRT version: X.Y.Z"."""
    match = _BANNER.search(text)
    if match:
        code = int(match.group("code"))
        if code >= 100000:  # TensorRT >= 10: MMmmpp
            return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
        return f"{code // 1000}.{code // 100 % 10}.{code % 100}"  # 8.x / 9.x: Mmpp
    match = _VERSION_LINE.search(text)
    return match.group("version") if match else None


def _float(text: str) -> float:
    return float(text)


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse_trtexec_output(text: str) -> dict:
    """The performance summary of trtexec's stdout (TensorRT 8.6 .. 11), times in ms.

    Returns {"tensorrt_version", "passed", "summary": bool, "throughput_qps", "metrics": {snake name:
    {min, max, mean, median, percentiles: {"90": ..}}}, "gpu_compute_median_ms", "total_host_walltime_s",
    "total_gpu_compute_s", "cuda_graph": "captured" | "capture_failed" | "not_reported", "warnings"}.
    """
    result: dict = {
        "tensorrt_version": version_from_banner(text),
        "passed": True if "&&&& PASSED" in text else False if "&&&& FAILED" in text else None,
        "summary": False,
        "throughput_qps": None,
        "metrics": {},
        "gpu_compute_median_ms": None,
        "total_host_walltime_s": None,
        "total_gpu_compute_s": None,
        "cuda_graph": "not_reported",
        "warnings": [],
        "errors": [],
    }
    if "Successfully captured CUDA graph" in text:
        result["cuda_graph"] = "captured"
    if "CUDA graph capture failed" in text or "not permitted under CUDA graph capture mode" in text:
        result["cuda_graph"] = "capture_failed"
    in_summary = False
    for raw in text.splitlines():
        tag = re.match(r"^\[[^\]]*\]\s*\[(?P<tag>[A-Z])\]", raw)
        line = _PREFIX.sub("", raw).strip()
        if tag and tag.group("tag") == "E":
            result["errors"].append(line)
        if line == "=== Performance summary ===":
            in_summary, result["summary"] = True, True
            continue
        if not in_summary:
            continue
        if line.startswith("&&&&") or line.startswith("=== "):
            in_summary = False
            continue
        if line.startswith("Throughput:"):
            match = re.search(rf"({_NUMBER}) qps", line)
            result["throughput_qps"] = _float(match.group(1)) if match else None
        elif line.startswith("Total Host Walltime:"):
            result["total_host_walltime_s"] = _float(re.search(rf"({_NUMBER}) s", line).group(1))
        elif line.startswith("Total GPU Compute Time:"):
            result["total_gpu_compute_s"] = _float(re.search(rf"({_NUMBER}) s", line).group(1))
        elif line.startswith("* "):
            result["warnings"].append(line[2:].strip())
        else:
            match = _METRIC.match(line)
            if match:
                result["metrics"][_snake(match.group("name"))] = {
                    "min": _float(match.group("min")), "max": _float(match.group("max")),
                    "mean": _float(match.group("mean")), "median": _float(match.group("median")),
                    "percentiles": {_percent_key(m.group("p")): _float(m.group("v"))
                                    for m in _PERCENTILE.finditer(match.group("rest"))},
                }
    gpu = result["metrics"].get("gpu_compute_time")
    result["gpu_compute_median_ms"] = gpu["median"] if gpu else None
    return result


def _percent_key(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else str(value)


def trtexec_percentile(sorted_values: list[float], percentile: float) -> float:
    """trtexec's definition (sampleReporting.cpp findPercentile): drop the top (1 - p/100) share, take the next.

    The share is computed in float32 as trtexec does, so the result matches its summary exactly
    (e.g. p99 of 100 samples is the maximum: float32 (1 - 0.99) * 100 truncates to 0).
    """
    count = len(sorted_values)
    if count == 0:
        return math.inf
    share = np.float32(1) - np.float32(percentile) / np.float32(100)
    exclude = int(share * np.float32(count))
    return sorted_values[max(count - 1 - exclude, 0)]


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    count = len(values)
    if count == 0:
        return {"count": 0}
    middle = count // 2
    median = values[middle] if count % 2 else (values[middle - 1] + values[middle]) / 2
    return {"count": count, "min": values[0], "max": values[-1], "mean": sum(values) / count, "median": median,
            "percentiles": {str(p): trtexec_percentile(values, p) for p in PERCENTILES if p != 50}}


def parse_export_times(data: str | Path | list, warmup_ms: float | None = None) -> dict:
    """Statistics of an --exportTimes trace (a JSON list, one dict per inference with computeMs/latencyMs).

    trtexec exports the warm-up inferences too; with `warmup_ms` the ones that started computing before
    it are dropped, as trtexec's own summary does. Percentiles use trtexec's definition.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise BuildError(f"{path}: cannot read trtexec --exportTimes JSON ({error})") from None
    else:
        records = data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BuildError("trtexec --exportTimes JSON: expected a list of objects")
    kept = [r for r in records if warmup_ms is None or float(r.get("startComputeMs", math.inf)) >= warmup_ms]
    return {
        "inferences": len(kept),
        "warmup_dropped": len(records) - len(kept),
        "compute_ms": _stats([float(r["computeMs"]) for r in kept if "computeMs" in r]),
        "latency_ms": _stats([float(r["latencyMs"]) for r in kept if "latencyMs" in r]),
    }


# ----------------------------------------------------------------------------------------- runner


def find_trtexec(explicit: str | Path | None = None) -> Path:
    """trtexec: `explicit`, else $TRTEXEC, else on PATH, else $TRT_ROOT/bin/trtexec; BuildError if none."""
    candidates = [explicit, os.environ.get("TRTEXEC"), shutil.which("trtexec")]
    if os.environ.get("TRT_ROOT"):
        candidates.append(Path(os.environ["TRT_ROOT"]) / "bin" / "trtexec")
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise BuildError("trtexec not found: put TensorRT's bin/trtexec on PATH, or set TRT_ROOT (or TRTEXEC)")


def trtexec_version(trtexec: str | Path, timeout_s: float = 60) -> tuple[int, str]:
    """(major, "X.Y.Z") from the banner `trtexec --help` prints (its exit code is ignored)."""
    try:
        done = subprocess.run([str(trtexec), "--help"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{trtexec}: cannot run ({error})") from None
    version = version_from_banner(done.stdout + done.stderr)
    if version is None:
        raise BuildError(f"{trtexec}: no TensorRT version in the banner of --help")
    return int(version.split(".")[0]), version


def trtexec_flags(major: int) -> list[str]:
    return list(VERSION_FLAGS[11] if major >= 11 else VERSION_FLAGS[10])


def trtexec_command(trtexec: Path, major: int, plan: Path, point: BenchPoint, shapes: str, times: Path, *,
                    plugin: str | None, duration_s: int, warmup_ms: int, iterations: int) -> list[str]:
    command = [str(trtexec), f"--loadEngine={plan}", f"--useProfile={point.profile_index}", f"--shapes={shapes}",
               f"--warmUp={warmup_ms}", f"--duration={duration_s}", f"--iterations={iterations}", *COMMON_FLAGS,
               f"--exportTimes={times}", *trtexec_flags(major)]
    if plugin:
        command.append(f"--staticPlugins={plugin}")
    return command


def run_trtexec(
    build_dir: str | Path,
    *,
    points: Iterable[BenchPoint] | None = None,
    trtexec: str | Path | None = None,
    plugin_library: str | Path | None = None,
    duration_s: int = DEFAULT_DURATION_S,
    warmup_ms: int = DEFAULT_WARMUP_MS,
    iterations: int = DEFAULT_ITERATIONS,
    timeout_s: float = 600,
    out: str | Path | None = None,
    report: Callable[[str], None] = print,
) -> dict:
    """Benchmark DIR/model.plan with trtexec at each point; writes DIR/bench.json (atomically) and returns it.

    Every point's log and --exportTimes JSON stay in DIR/trtexec/. Raises BuildError when trtexec is
    missing, the plan is missing, or a point fails (bench.json is written first, with the failure).
    The limits and plugin library are the engine's recorded in manifest.json.
    `out`: where the JSON goes (default DIR/bench.json; note ce_export.bench writes that name too).
    """
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    plan = build_dir / PLAN
    if not plan.is_file():
        raise BuildError(f"{plan}: missing engine (build with --target trt first)")
    executable = find_trtexec(trtexec)
    major, version = trtexec_version(executable)
    inputs, _ = onnx_io(build_dir / manifest.onnx.file)
    limits = manifest.engine_limits.model_dump()
    points = check_points(points if points is not None else default_points(limits), limits)
    plugin = _recorded_plugin(manifest, plugin_library)
    log_dir = build_dir / LOG_DIR
    log_dir.mkdir(exist_ok=True)

    rows = []
    for point in points:
        times = log_dir / f"{point.name}.times.json"
        times.unlink(missing_ok=True)
        command = trtexec_command(executable, major, plan, point, shapes_arg(inputs, point), times, plugin=plugin,
                                  duration_s=duration_s, warmup_ms=warmup_ms, iterations=iterations)
        report(f"[trtexec {point.name}] ...")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
            output, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as error:
            output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
            returncode = None
        except OSError as error:
            raise BuildError(f"{executable}: cannot run ({error})") from None
        (log_dir / f"{point.name}.log").write_text(output)
        parsed = parse_trtexec_output(output)
        row = {**asdict(point), "name": point.name, "profile_index": point.profile_index,
               "command": shlex.join(command), "returncode": returncode, "log": f"{LOG_DIR}/{point.name}.log",
               **{k: parsed[k] for k in ("throughput_qps", "gpu_compute_median_ms", "cuda_graph", "metrics",
                                         "total_host_walltime_s", "total_gpu_compute_s", "warnings")}}
        if times.is_file():
            row["times"] = parse_export_times(times, warmup_ms=warmup_ms)
            row["times_file"] = f"{LOG_DIR}/{times.name}"
        row["passed"] = returncode == 0 and parsed["summary"]
        if not row["passed"]:
            reason = "timed out" if returncode is None else (parsed["errors"][-1] if parsed["errors"] else
                                                              f"exit code {returncode}, no performance summary")
            row["error"] = reason
            report(f"[trtexec {point.name}] FAILED: {reason}")
        else:
            report(f"[trtexec {point.name}] GPU compute median {row['gpu_compute_median_ms']:.4g} ms, "
                   f"{row['throughput_qps']:.4g} qps, CUDA graph {row['cuda_graph']}")
        rows.append(row)

    bench = {
        "tool": "trtexec",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "trtexec": str(executable),
        "tensorrt": version,
        "major": major,
        "flags": COMMON_FLAGS + trtexec_flags(major),
        "plan": PLAN,
        "plugin_library": plugin,
        "headline": "gpu_compute_median_ms (trtexec GPU Compute Time median; Latency adds H2D/D2H)",
        "limits": limits,
        "points": rows,
        "passed": all(r["passed"] for r in rows),
    }
    out = Path(out) if out is not None else build_dir / BENCH
    write_json(out, bench)
    failed = [r for r in rows if not r["passed"]]
    if failed:
        raise BuildError(f"{out}: trtexec failed at {len(failed)} of {len(rows)} points "
                         f"(first: {failed[0]['name']}: {failed[0]['error']})")
    return bench
