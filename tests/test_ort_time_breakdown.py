"""benchmarks/ort_time_breakdown.py: ONNX Runtime's profile sorted into classes (nodes inside a
Scan or If are the experts body's; control time is the container's beyond its nodes; GEMM FLOPs
from the recorded shapes), OrtRunner's profiler, and the whole script on the demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "ort_time_breakdown.py"
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import ort_time_breakdown as breakdown  # noqa: E402


def node(name, op, ts, dur, inputs=(), outputs=()):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "input_type_shape": [{"float": list(s)} for s in inputs],
                     "output_type_shape": [{"float": list(s)} for s in outputs]}}


def test_classify_sorts_nodes_into_classes_per_call():
    events = [
        {"name": "model_run", "ts": 0, "dur": 1000},
        node("proj", "MatMul", 0, 100, [(4, 8)], [(4, 16)]),            # prepacked weight: one operand listed
        node("scores", "MatMul", 100, 50, [(1, 2, 4, 3), (1, 2, 3, 4)], [(1, 2, 4, 4)]),
        node("norm", "Pow", 150, 10),
        node("scan", "Scan", 200, 500),
        node("if", "If", 210, 300),
        node("gate_up", "FusedMatMul", 220, 200, [(2, 16, 8), (5, 2, 8)], [(2, 16, 5)]),
        node("gather", "Gather", 430, 40),
        node("pad", "Pad", 600, 20),
        node("moe", "MoE", 700, 100),
    ]
    result = breakdown.classify(events + [dict(e, ts=e["ts"] + 2000) for e in events], calls=2)
    classes = result["classes"]
    assert classes[breakdown.EXPERT_GEMMS] == pytest.approx({"ms": 0.2, "gflop": 2 * 2 * 16 * 5 * 8 / 1e9, "nodes": 1})
    assert classes[breakdown.EXPERT_OPS]["ms"] == pytest.approx(0.06) and classes[breakdown.EXPERT_OPS]["nodes"] == 2
    assert classes[breakdown.EXPERT_CONTROL] == pytest.approx({"ms": 0.5 - 0.26, "gflop": 0, "nodes": 2})  # If in Scan
    assert classes[breakdown.WEIGHT_GEMMS] == pytest.approx({"ms": 0.1, "gflop": 2 * 4 * 16 * 8 / 1e9, "nodes": 1})
    assert classes[breakdown.OTHER_GEMMS] == pytest.approx({"ms": 0.05, "gflop": 2 * 32 * 3 / 1e9, "nodes": 1})
    assert classes[breakdown.OTHER_OPS]["ms"] == pytest.approx(0.01)
    assert classes[breakdown.FUSED_MOE]["ms"] == pytest.approx(0.1)
    assert result["profiled_call_ms"] == 1.0
    # every microsecond of the model's nodes lands in exactly one class
    assert sum(entry["ms"] for entry in classes.values()) == pytest.approx((100 + 50 + 10 + 500 + 100) / 1e3)


def test_ort_runner_profile(tmp_path):
    from ce_export.runners import OrtRunner

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    runner = OrtRunner(path, profile_dir=tmp_path)
    runner.session.run(None, {"x": np.ones((2, 4), np.float32)})
    events = runner.profile_events()
    assert any(e.get("cat") == "Node" and e["args"]["op_name"] == "MatMul" for e in events)
    with pytest.raises(ValueError, match="profile_dir"):
        OrtRunner(path).profile_events()


def test_script_on_the_demo_model(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT), "--size", "demo", "--tokens", "16", "--runs", "2",
                             "--rounds", "3", "--curve-tokens", "2", "8", "--out", str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breakdown.json", "breakdown.md", "breakdown.png"]
    data = json.loads((tmp_path / "breakdown.json").read_text())
    classes = data["profile"]["classes"]
    assert classes[breakdown.EXPERT_GEMMS]["nodes"] > 0 and classes[breakdown.EXPERT_GEMMS]["gflop"] > 0
    assert classes[breakdown.FUSED_MOE]["nodes"] == 0  # CE layers run the function body
    assert sum(entry["ms"] for entry in classes.values()) <= 1.05 * data["profile"]["profiled_call_ms"]
    assert [point["tokens"] for point in data["expert_gemm_curve"]] == [2, 8]
    assert all(point[form]["ms"] > 0 for point in data["expert_gemm_curve"] for form in breakdown.EXPERT_FORMS)
    assert data["called_in_turn"]["ratio_median"] > 0 and data["floor_ms"] > 0
    markdown = (tmp_path / "breakdown.md").read_text()
    assert "--size demo" in markdown and "cores)" in markdown and "![breakdown](breakdown.png)" in markdown
