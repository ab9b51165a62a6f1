"""`python benchmarks/moe_layer.py --dry-run` works with no GPU: floors from the assumed H100
anchors for every T, and the list of planned comparisons."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "moe_layer.py"


def run_dry(*extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def floor_rows(stdout: str) -> dict[tuple[int, str], list[float]]:
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"\s*(\d+)\s+(CE km=4|top-8)\s+([\d.\s]+)$", line)
        if match:
            rows[(int(match.group(1)), match.group(2))] = [float(v) for v in match.group(3).split()]
    return rows


def test_dry_run_prints_floors_and_plan_without_a_gpu():
    result = run_dry()
    assert result.returncode == 0, result.stderr
    assert "assumed" in result.stdout
    rows = floor_rows(result.stdout)
    assert {t for t, _ in rows} == {1, 8, 64, 512, 4096}
    # columns: experts, MB, GFLOP, bytes ms, FLOPs ms, floor ms
    experts, _, gflop, bytes_ms, flops_ms, floor = rows[(1, "CE km=4")]
    assert experts == 4.0 and abs(floor - 0.0168) < 5e-4  # 4 experts * 12.6 MB at 3.0 TB/s
    assert abs(rows[(1, "top-8")][5] - 2 * floor) < 1e-3
    assert rows[(4096, "top-8")][5] == rows[(4096, "top-8")][4] > rows[(4096, "top-8")][3]  # FLOPs bound
    for key in ("released_loop", "reference", "kernels_eager", "kernels_graph", "hf_eager_top8",
                "hf_grouped_mm_top8", "grouped_mm_top8_graph", "grouped_mm_top4_graph", "floor"):
        assert re.search(rf"^\s+{key}\s", result.stdout, re.M), key


def test_dry_run_takes_other_token_counts():
    result = run_dry("--tokens", "3", "100")
    assert result.returncode == 0, result.stderr
    assert {t for t, _ in floor_rows(result.stdout)} == {3, 100}


def test_gpu_end_to_end_suite_runs_its_code_path_on_a_tiny_model_on_cpu(tmp_path):
    """The H100 suite's code, on a tiny model and the CPU: checkpoints (shared shard + CE shard),
    fp16 exports, every row with parity, the headline table with floors and the issue's targets."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import end_to_end
    finally:
        sys.path.pop(0)
    out = tmp_path / "results"
    assert end_to_end.main(["--suite", "gpu", "--size", "tiny", "--device", "cpu", "--quick", "--budget", "0.01",
                            "--scratch", str(tmp_path), "--out", str(out)]) == 0
    for name in ("headline.md", "headline.png", "summary.md", "tiny-plain/bench.json", "tiny-ce/bench.png"):
        assert (out / name).is_file(), name
    import json

    plain = json.loads((out / "tiny-plain" / "bench.json").read_text())
    ce = json.loads((out / "tiny-ce" / "bench.json").read_text())
    assert {r["runtime"] for r in plain["results"]} == {
        "transformers eager", "transformers grouped_mm", "transformers batched_mm", "PyTorch (ce_export op)",
        "ce_export fast path",
        "ONNX Runtime CPU (fp16)"}
    assert "transformers" in ce["skipped"]
    for row in plain["results"] + ce["results"]:
        limit = 5e-3 if "fp16" in row["runtime"] else 1e-4
        assert row["parity_max_rel"] < limit, row
    headline = (out / "headline.md").read_text()
    assert "ce_export fast path (ce)" in headline and "transformers eager (plain)" in headline
    assert "not measured in this run" in headline  # --quick has no context-512 point: said, not invented
    assert not any(p.name.startswith("tmp") for p in tmp_path.iterdir())  # scratch removed
