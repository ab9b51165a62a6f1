"""`ce_export bench`: every row timed on the same inputs, each with its parity, in JSON, markdown and PNG."""

import json
import time

import pytest

from ce_export import bench

POINTS = (bench.Point("prefill", 1, 16), bench.Point("decode", 2, 16))


def test_bench_writes_side_by_side_results_with_parity(demo_build, tmp_path):
    data = bench.bench(demo_build, points=POINTS, budget_s=0.05, report=lambda line: None)
    files = bench.write_results(data, tmp_path)
    assert [f.name for f in files] == ["bench.json", "bench.md", "bench.png"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["runtime"] for r in rows} == {"PyTorch (ce_export op)", "ce_export fast path", "ONNX Runtime CPU (fp32)"}
    assert len(rows) == 3 * len(POINTS)
    for row in rows:
        assert row["median_ms"] > 0 and row["repetitions"] >= 3
        assert row["parity_max_rel"] < 1e-4
    table = (tmp_path / "bench.md").read_text()
    assert "| prefill b1 S=16 |" in table and "ONNX Runtime CPU" in table
    assert "Not run: transformers" in table  # said, not silently left out


def test_plain_model_bench_includes_transformers_rows(demo_plain_build):
    data = bench.bench(demo_plain_build, points=POINTS[:1], budget_s=0.05, report=lambda line: None)
    runtimes = [r["runtime"] for r in data["results"]]
    assert runtimes == ["transformers eager", "transformers grouped_mm", "transformers batched_mm",
                        "PyTorch (ce_export op)", "ce_export fast path",
                        "ONNX Runtime CPU (fp32)"]
    assert all(r["parity_max_rel"] < 1e-4 for r in data["results"])


def test_two_rows_called_in_turn_give_each_median_and_their_ratio(demo_build):
    from ce_export import bench

    rows = ("PyTorch (ce_export op)", "ONNX Runtime CPU (fp32)")
    result = bench.interleaved(demo_build, rows, bench.Point("prefill", 1, 8), rounds=3, report=lambda line: None)
    assert result["runtimes"] == list(rows) and result["rounds"] == 3 and result["label"] == "prefill b1 S=8"
    assert set(result["median_ms"]) == set(rows) and all(ms > 0 for ms in result["median_ms"].values())
    assert 0 < result["ratio_min"] <= result["ratio_median"] <= result["ratio_max"]
    with pytest.raises(ValueError, match="no row 'TensorRT'"):
        bench.interleaved(demo_build, ("TensorRT", rows[1]), bench.Point("prefill", 1, 8), report=lambda line: None)


def test_bench_times_pytorch_and_onnx_runtime_called_in_turn(demo_build, tmp_path):
    data = bench.bench(demo_build, points=POINTS, budget_s=0.05, in_turn_rounds=3, report=lambda line: None)
    called = data["called_in_turn"]
    assert [entry["label"] for entry in called] == [point.label for point in POINTS]
    for entry in called:
        assert entry["runtimes"] == ["PyTorch (ce_export op)", "ONNX Runtime CPU (fp32)"] and entry["rounds"] == 3
        assert all(ms > 0 for ms in entry["median_ms"].values())
        assert 0 < entry["ratio_min"] <= entry["ratio_median"] <= entry["ratio_max"]
    bench.write_results(data, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "Called in turn: PyTorch (ce_export op) and ONNX Runtime CPU (fp32) both resident" in table
    assert "| decode b2 C=16 |" in table.split("Called in turn")[1]


def test_called_in_turn_is_skipped_with_its_reason(demo_build, monkeypatch):
    assert bench.bench(demo_build, points=POINTS[:1], budget_s=0.05, report=lambda line: None)["called_in_turn"] == []
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 1024)
    data = bench.bench(demo_build, points=POINTS[:1], budget_s=0.05, in_turn_rounds=3, report=lambda line: None)
    assert data["called_in_turn"] == [] and "GiB available" in data["skipped"][bench.IN_TURN]
    assert "Not run: called in turn: both runtimes resident need" in bench.markdown_table(data)


def test_a_short_call_runs_as_a_burst_in_its_turn():
    counts = {"short": 0, "long": 0}

    def short():
        counts["short"] += 1

    def long():
        counts["long"] += 1
        time.sleep(0.03)

    result = bench.called_in_turn({"short": short, "long": long}, rounds=3, pause_s=0, turn_s=0.02)
    assert result["calls_per_turn"] == {"short": bench.MAX_BURST, "long": 1}
    assert counts == {"short": 1 + 3 * (1 + bench.MAX_BURST), "long": 1 + 3}  # warm-up, then per turn
    assert result["median_ms"]["long"] >= 30 and result["ratio_max"] < 1
    assert bench.called_in_turn({"short": short, "long": long}, rounds=1, pause_s=0)["calls_per_turn"] == \
        {"short": 1, "long": 1}
