"""trtexec script, runner and parsers (ce_export/trtexec.py).

The stdout parser is checked on real trtexec output from public repositories, kept under
tests/fixtures/trtexec/ (first line of each file: source and version). No real TensorRT 11.x log
was found; 11.x is covered by its banner format and flag set (the summary block is printed by the
same printEpilog code). The runner and the script are driven by a fake trtexec that prints a real
log and writes an --exportTimes file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ce_export.artifacts import MANIFEST, read_json, write_json
from ce_export.engine import DECODE, PLAN, PREFILL
from ce_export.errors import BuildError
from ce_export.io_schema import onnx_io
from ce_export.trtexec import (BENCH, SCRIPT, VERSION_FLAGS, BenchPoint, check_points, default_points,
                               find_trtexec, parse_export_times, parse_trtexec_output, run_trtexec, shapes_arg,
                               trtexec_percentile, version_from_banner, write_trtexec_script)
from checkpoints import trt_demo

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"
def fixture_log(name: str) -> str:
    """A fixture without its header comment line(s)."""
    return "\n".join(line for line in (FIXTURES / name).read_text().splitlines() if not line.startswith("# "))




@pytest.fixture
def build_copy(tmp_path_factory, tmp_path) -> Path:
    """A copy of the trt demo build folder (manifest without engine record) with a stand-in model.plan."""
    source = trt_demo(tmp_path_factory)
    folder = tmp_path / "build"
    folder.mkdir()
    shutil.copy(source / "model.onnx", folder / "model.onnx")
    manifest = read_json(source / MANIFEST)
    manifest.pop("engine", None)
    write_json(folder / MANIFEST, manifest)
    (folder / PLAN).write_bytes(b"stand-in plan: the fake trtexec never reads it")
    return folder


# ------------------------------------------------------------------------------ parsers, real output


def test_parses_trtexec_10_13_summary_without_cuda_graph():
    result = parse_trtexec_output(fixture_log("trtexec-10.13-no-cuda-graph.log"))
    assert result["tensorrt_version"] == "10.13.0" and result["passed"] is True and result["summary"]
    assert result["throughput_qps"] == pytest.approx(0.562059)
    assert set(result["metrics"]) == {"latency", "enqueue_time", "h2d_latency", "gpu_compute_time", "d2h_latency"}
    gpu = result["metrics"]["gpu_compute_time"]
    assert gpu == {"min": 1655.52, "max": 1673.94, "mean": 1666.2, "median": 1667.19,
                   "percentiles": {"90": 1672.56, "95": 1673.94, "99": 1673.94}}
    assert result["gpu_compute_median_ms"] == 1667.19
    assert result["metrics"]["d2h_latency"]["percentiles"]["90"] == pytest.approx(0.0654297)
    assert result["total_host_walltime_s"] == pytest.approx(17.7917)
    assert result["total_gpu_compute_s"] == pytest.approx(16.662)
    assert result["cuda_graph"] == "not_reported"
    assert result["warnings"] == ["Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU "
                                  "may be under-utilized."]


def test_parses_trtexec_10_7_summary_with_cuda_graph():
    result = parse_trtexec_output(fixture_log("trtexec-10.7-cuda-graph.log"))
    assert result["tensorrt_version"] == "10.7.0"  # from "TensorRT version: 10.7.0" (no banner in the excerpt)
    assert result["passed"] is None
    assert result["cuda_graph"] == "captured"
    assert result["throughput_qps"] == pytest.approx(32.7494)
    assert result["gpu_compute_median_ms"] == pytest.approx(30.1722)
    assert result["metrics"]["gpu_compute_time"]["percentiles"] == {"90": 30.2061, "95": 30.6002, "99": 30.9484}
    assert result["metrics"]["enqueue_time"]["min"] == pytest.approx(0.00305176)
    assert result["metrics"]["latency"]["median"] == pytest.approx(30.7695)
    assert result["total_gpu_compute_s"] == pytest.approx(3.05129) and result["warnings"] == []


def test_cuda_graph_capture_failure_is_reported():
    # The two warnings trtexec prints when capture fails (samples/common/sampleInference.cpp: TensorRT 10.x
    # "...flag has been ignored...", newer "CUDA graph capture failed..."); no real log of it was found.
    old = fixture_log("trtexec-10.7-cuda-graph.log").replace(
        "[I] Successfully captured CUDA graph for the current execution context",
        "[W] The built TensorRT engine contains operations that are not permitted under CUDA graph capture mode.")
    assert parse_trtexec_output(old)["cuda_graph"] == "capture_failed"
    new = "[11/23/2026-10:00:00] [W] CUDA graph capture failed. The inference will be launched without using CUDA graph.\n"
    assert parse_trtexec_output(new)["cuda_graph"] == "capture_failed"
    empty = parse_trtexec_output("&&&& FAILED TensorRT.trtexec [TensorRT v110100] [b106] # trtexec\n")
    assert empty["summary"] is False and empty["passed"] is False and empty["gpu_compute_median_ms"] is None


@pytest.mark.parametrize("text, version", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help", "11.1.0"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110000] [b114]", "11.0.0"),
    ("&&&& PASSED TensorRT.trtexec [TensorRT v101300] [b35] # trtexec", "10.13.0"),
    ("&&&& PASSED TensorRT.trtexec [TensorRT v100001] # ./trtexec", "10.0.1"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", "8.6.1"),
    ("[I] TensorRT version: 10.7.0", "10.7.0"),
    ("no version here", None),
])
def test_version_from_banner(text, version):
    assert version_from_banner(text) == version


def test_export_times_statistics():
    # The layout trtexec's exportJSONTrace writes (samples/common/sampleReporting.cpp); values synthetic.
    records = [{"startEnqMs": i * 1.0, "endEnqMs": i + 0.01, "startH2dMs": i * 1.0, "endH2dMs": i * 1.0,
                "startComputeMs": i * 1.0, "endComputeMs": i + 0.5, "startD2hMs": i + 0.5, "endD2hMs": i + 0.5,
                "h2dMs": 0.0, "computeMs": float(i), "d2hMs": 0.0, "latencyMs": float(i) + 0.25, "endToEndMs": 1.0}
               for i in range(1, 101)]
    stats = parse_export_times(records)
    assert stats["inferences"] == 100 and stats["warmup_dropped"] == 0
    compute = stats["compute_ms"]
    assert compute["median"] == 50.5 and compute["min"] == 1.0 and compute["max"] == 100.0
    # trtexec's float32 arithmetic: p90 drops int(0.100000024 * 100) = 10 -> 90; p99 drops int(0.00999999 * 100)
    # = 0 -> the maximum.
    assert compute["percentiles"] == {"90": 90.0, "99": 100.0}
    assert stats["latency_ms"]["median"] == 50.75
    dropped = parse_export_times(records, warmup_ms=11)  # inferences that started computing before 11 ms
    assert dropped["inferences"] == 90 and dropped["warmup_dropped"] == 10
    assert dropped["compute_ms"]["min"] == 11.0


def test_trtexec_percentile_definition():
    values = [float(v) for v in range(1, 11)]
    assert trtexec_percentile(values, 90) == 9.0 and trtexec_percentile(values, 99) == 10.0
    assert trtexec_percentile(values, 50) == 5.0 and trtexec_percentile([], 99) == float("inf")
    assert trtexec_percentile([float(v) for v in range(1, 1001)], 99) == 991.0  # drops int(9.99999) = 9


def test_export_times_file_errors(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("[{")
    with pytest.raises(BuildError, match="exportTimes"):
        parse_export_times(bad)


# ------------------------------------------------------------------------------ points and the script


def test_default_points_stay_inside_the_limits():
    points = default_points({"max_batch": 64, "max_sequence": 4096, "max_context": 4096})
    assert [p.name for p in points] == ["prefill_b1_s128", "prefill_b1_s512", "prefill_b1_s2048",
                                        "decode_b1_past512", "decode_b1_past2048", "decode_b8_past512",
                                        "decode_b8_past2048"]
    small = default_points({"max_batch": 4, "max_sequence": 64, "max_context": 128})
    assert [p.name for p in small] == ["prefill_b1_s64", "decode_b1_past128", "decode_b4_past128"]
    with pytest.raises(BuildError, match="outside the engine's limits"):
        check_points([BenchPoint(DECODE, 8, 1, 128)], {"max_batch": 4, "max_sequence": 64, "max_context": 128})
    with pytest.raises(BuildError, match="decode has sequence 1"):
        check_points([BenchPoint(DECODE, 1, 2, 10)], {"max_batch": 4, "max_sequence": 64, "max_context": 128})


def test_shapes_name_every_input(build_copy):
    inputs, _ = onnx_io(build_copy / "model.onnx")
    decode = shapes_arg(inputs, BenchPoint(DECODE, 2, 1, 100))
    entries = dict(item.split(":") for item in decode.split(","))
    assert list(entries) == [s.name for s in inputs]
    assert entries["input_ids"] == "2x1" and entries["attention_mask"] == "2x101"
    heads, head_dim = inputs[3].dims[1], inputs[3].dims[3]
    assert entries["past_key_values.0.key"] == f"2x{heads}x100x{head_dim}"
    prefill = dict(item.split(":") for item in shapes_arg(inputs, BenchPoint(PREFILL, 1, 64, 0)).split(","))
    assert prefill["position_ids"] == "1x64" and prefill["past_key_values.3.value"] == f"1x{heads}x0x{head_dim}"


FAKE_TRTEXEC = """#!/usr/bin/env bash
# Stand-in for trtexec: --help prints a banner (exit code $FAKE_HELP_RC, as TensorRT 11's --version
# exits non-zero); otherwise it records its arguments, writes --exportTimes and prints a real log.
if [[ "$1" == "--help" ]]; then
  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_CODE}] [b1] # trtexec --help"
  exit "${FAKE_HELP_RC:-0}"
fi
printf '%s\\n' "$*" >> "$FAKE_CALLS"
for arg in "$@"; do
  case "$arg" in --exportTimes=*) cp "$FAKE_TIMES" "${arg#--exportTimes=}" ;; esac
done
cat "$FAKE_LOG"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_trtexec(tmp_path, monkeypatch):
    tool = tmp_path / "bin" / "trtexec"
    tool.parent.mkdir()
    tool.write_text(FAKE_TRTEXEC)
    tool.chmod(0o755)
    log = tmp_path / "run.log"
    log.write_text(fixture_log("trtexec-10.7-cuda-graph.log") + "\n")
    times = tmp_path / "times.json"
    times.write_text(json.dumps([{"startComputeMs": 600.0 + i, "computeMs": 30.0 + i, "latencyMs": 31.0 + i}
                                 for i in range(5)]))
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_TIMES", str(times))
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_TRT_CODE", "100700")
    monkeypatch.delenv("TRT_MAJOR", raising=False)
    monkeypatch.delenv("CE_EXPORT_PLUGIN_LIB", raising=False)
    return tool, calls


def _run_script(folder: Path, tool: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRTEXEC=str(tool))
    return subprocess.run(["bash", str(folder / SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_script_is_valid_bash_and_lists_points(build_copy, fake_trtexec):
    script = write_trtexec_script(build_copy)
    assert script == build_copy / SCRIPT and os.access(script, os.X_OK)
    assert not list(build_copy.glob(".*partial*"))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for flag in ("--percentile=50,90,99", "--exportTimes=", "--useProfile=", "--staticPlugins=",
                 *VERSION_FLAGS[10], "--loadEngine="):
        assert flag in text
    listed = _run_script(build_copy, fake_trtexec[0], "--list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["prefill_b1_s64", "decode_b1_past128", "decode_b4_past128"]


@pytest.mark.parametrize("code, help_rc, major", [("100700", "0", 10), ("110100", "1", 11)])
def test_script_picks_flags_by_major_version(build_copy, fake_trtexec, monkeypatch, code, help_rc, major):
    tool, calls = fake_trtexec
    monkeypatch.setenv("FAKE_TRT_CODE", code)
    monkeypatch.setenv("FAKE_HELP_RC", help_rc)
    monkeypatch.setenv("CE_EXPORT_PLUGIN_LIB", "/opt/plugins/libce_export_trt.so")
    write_trtexec_script(build_copy)
    done = _run_script(build_copy, tool)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 3
    inputs, _ = onnx_io(build_copy / "model.onnx")
    for line, point in zip(lines, default_points({"max_batch": 4, "max_sequence": 64, "max_context": 128})):
        args = line.split()
        assert f"--loadEngine={build_copy / PLAN}" in args
        assert f"--useProfile={point.profile_index}" in args
        assert f"--shapes={shapes_arg(inputs, point)}" in args
        assert "--percentile=50,90,99" in args
        assert f"--exportTimes={build_copy / 'trtexec' / (point.name + '.times.json')}" in args
        assert "--staticPlugins=/opt/plugins/libce_export_trt.so" in args
        for flag in VERSION_FLAGS[10]:
            assert (flag in args) == (major == 10)
        assert (build_copy / "trtexec" / f"{point.name}.log").is_file()
        assert (build_copy / "trtexec" / f"{point.name}.times.json").is_file()


def test_script_build_mode_passes_both_profiles(build_copy, fake_trtexec):
    tool, calls = fake_trtexec
    write_trtexec_script(build_copy)
    done = _run_script(build_copy, tool, "--build")
    assert done.returncode == 0, done.stderr
    args = calls.read_text().split()
    assert f"--onnx={build_copy / 'model.onnx'}" in args and f"--saveEngine={build_copy / PLAN}" in args
    assert "--profile=0" in args and "--profile=1" in args and "--stronglyTyped" in args
    shapes = [a for a in args if a.startswith(("--minShapes=", "--optShapes=", "--maxShapes="))]
    assert len(shapes) == 6
    assert "attention_mask:4x129" in shapes[5]  # decode max: batch 4, past 128 + 1


def test_script_without_trtexec_says_so(build_copy, tmp_path):
    write_trtexec_script(build_copy)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(build_copy / SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "trtexec not found" in done.stderr


# ------------------------------------------------------------------------------ the runner


def test_run_trtexec_writes_bench_json(build_copy, fake_trtexec):
    tool, calls = fake_trtexec
    bench = run_trtexec(build_copy, trtexec=tool, duration_s=1, warmup_ms=500, report=lambda line: None)
    assert read_json(build_copy / BENCH) == bench
    assert bench["tensorrt"] == "10.7.0" and bench["major"] == 10 and bench["passed"] is True
    assert bench["flags"] == ["--percentile=50,90,99", *VERSION_FLAGS[10]]
    assert [p["name"] for p in bench["points"]] == ["prefill_b1_s64", "decode_b1_past128", "decode_b4_past128"]
    for point in bench["points"]:
        assert point["gpu_compute_median_ms"] == pytest.approx(30.1722) and point["cuda_graph"] == "captured"
        assert point["times"]["inferences"] == 5 and point["times"]["compute_ms"]["median"] == 32.0
        assert (build_copy / point["log"]).is_file() and "--useCudaGraph" in point["command"]
    assert len(calls.read_text().splitlines()) == 3
    assert not list(build_copy.glob(".*partial*"))
    other = build_copy / "bench_trtexec.json"
    run_trtexec(build_copy, trtexec=tool, points=[BenchPoint(PREFILL, 1, 8, 0)], out=other, report=lambda line: None)
    assert read_json(other)["points"][0]["name"] == "prefill_b1_s8" and read_json(build_copy / BENCH) == bench


def test_run_trtexec_failure_is_one_line(build_copy, fake_trtexec, monkeypatch, tmp_path):
    tool, _ = fake_trtexec
    log = tmp_path / "failed.log"
    log.write_text("&&&& RUNNING TensorRT.trtexec [TensorRT v100700] # trtexec\n"
                   "[11/23/2026-10:00:00] [E] Error[1]: engine deserialization failed (stand-in message)\n"
                   "&&&& FAILED TensorRT.trtexec [TensorRT v100700] # trtexec\n")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_RC", "1")
    points = [BenchPoint(DECODE, 1, 1, 16)]
    with pytest.raises(BuildError, match="trtexec failed at 1 of 1 points .*decode_b1_past16.*deserialization"):
        run_trtexec(build_copy, trtexec=tool, points=points, report=lambda line: None)
    bench = read_json(build_copy / BENCH)
    assert bench["passed"] is False and bench["points"][0]["returncode"] == 1


def test_missing_trtexec_is_a_build_error(build_copy, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TRT_ROOT", raising=False)
    monkeypatch.delenv("TRTEXEC", raising=False)
    with pytest.raises(BuildError, match="trtexec not found"):
        find_trtexec()
    with pytest.raises(BuildError, match="trtexec not found"):
        run_trtexec(build_copy, report=lambda line: None)
    (build_copy / PLAN).unlink()
    with pytest.raises(BuildError, match="missing engine"):
        run_trtexec(build_copy, report=lambda line: None)
