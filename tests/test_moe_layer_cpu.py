"""`python benchmarks/moe_layer.py --device cpu` on a tiny layer: every row runs and matches the
reference, the floors are computed from ceilings measured in the run, both few-token forms are
measured, and the JSON, markdown and PNG are written with the machine and the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "moe_layer.py"


def test_cpu_layer_benchmark_on_a_tiny_layer(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--tokens", "1", "37",
                             "--budget-s", "0.01", "--out", str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe_layer_cpu.json", "moe_layer_cpu.md", "moe_layer_cpu.png"]
    data = json.loads((tmp_path / "moe_layer_cpu.json").read_text())
    assert data["ceilings"]["matmul_flops_per_s"] > 1e9 and data["ceilings"]["copy_bytes_per_s"] > 1e8
    for key, row in data["rows"].items():
        for tokens in ("1", "37"):
            cell = row["by_tokens"][tokens]
            assert "median_ms" in cell, (key, tokens, cell)
            assert cell["rel_err"] < 1e-5, (key, tokens, cell["rel_err"])
    for floor in data["floors"].values():
        assert all(entry["floor_ms"] > 0 for entry in floor.values())
    assert set(data["head_to_head"]) == {"1", "37"}
    assert all(entry["ratio_median"] > 0 and entry["rounds"] >= 5 for entry in data["head_to_head"].values())
    decode = data["decode_forms"]
    assert set(decode["gathered"]) == set(decode["scanned"]) == {str(t) for t in decode["tokens"]} == {"1", "2", "4"}
    markdown = (tmp_path / "moe_layer_cpu.md").read_text()
    assert "com.microsoft::MoE" in markdown and "--device cpu" in markdown and data["environment"]["machine"]
