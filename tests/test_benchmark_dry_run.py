"""The benchmarks' dry runs, with no GPU: `benchmarks/moe_layer.py --dry-run` (floors from the
assumed H100 anchors for every T, and the list of planned comparisons) and `benchmarks/gpu_check.sh
--dry-run` (every step of the prepared GPU run, on the CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
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


def test_gpu_check_dry_run_writes_every_result_file(tmp_path):
    """benchmarks/gpu_check.sh, the prepared GPU run, with --dry-run: every step on the CPU with tiny
    sizes (the GPU-only tests skip), the same result files in the same places: in OUT the archive,
    the step table, the summary and the console log, named after the device; in the archive the
    logs, the tests' JUnit XML, the layer benchmark's output and the end-to-end suite per model with
    its headline (the plain model exported for ONNX Runtime's CPU row, the CE one not)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    device = f"cpu-{os.cpu_count()}core"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{device}-{name}" for name in ("gpu-check.tar.gz", "steps.tsv", "summary.md", "console.log"))
    steps = [line.split("\t") for line in (out / f"{device}-steps.tsv").read_text().splitlines()[1:]]
    assert [(s[0], s[1], s[6]) for s in steps] == [(name, "ok", device) for name in
                                                  ("env", "cuda-tests", "moe-layer", "e2e-plain", "e2e-ce")]
    assert "gpu_check done" in (out / f"{device}-console.log").read_text()

    with tarfile.open(out / f"{device}-gpu-check.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    tree = tmp_path / "unpacked" / device
    e2e = tree / "end_to_end"
    for name in ("steps.tsv", "summary.md", "tests/junit.xml", "moe_layer/moe_layer-dry-run.txt",
                 *(f"logs/{step}.log" for step, *_ in steps), "end_to_end/headline.md", "end_to_end/headline.png",
                 "end_to_end/summary.md", *(f"end_to_end/tiny-{m}/bench.{x}" for m in ("plain", "ce")
                                            for x in ("json", "md", "png"))):
        assert (tree / name).is_file() and (tree / name).stat().st_size > 0, name
    assert 'skipped="' in (tree / "tests" / "junit.xml").read_text()  # collected, skipped without CUDA
    assert re.search(r"^\s+1\s+CE km=4", (tree / "moe_layer" / "moe_layer-dry-run.txt").read_text(), re.M)

    plain = json.loads((e2e / "tiny-plain" / "bench.json").read_text())
    ce = json.loads((e2e / "tiny-ce" / "bench.json").read_text())
    assert {r["runtime"] for r in plain["results"]} == {
        "transformers eager", "transformers grouped_mm", "transformers batched_mm", "PyTorch (ce_export op)",
        "ce_export fast path", "ONNX Runtime CPU (fp16)"}
    assert {r["runtime"] for r in ce["results"]} == {"PyTorch (ce_export op)", "ce_export fast path"}
    assert "transformers" in ce["skipped"] and "--export never" in ce["skipped"]["ONNX Runtime"]
    for data in (plain, ce):
        assert data["ceilings"]["device"] == device and data["ceilings"]["copy_bytes_per_s"] > 0
        for row in data["results"]:
            assert row["parity_max_rel"] < (5e-3 if "fp16" in row["runtime"] else 1e-4), row
    headline = (e2e / "headline.md").read_text()
    assert "ce_export fast path (ce)" in headline and "transformers eager (plain)" in headline
    assert f"measured on {device} in this run" in headline
    assert "not measured in this run" in headline  # --quick has no context-512 point: said, not invented
    assert "| e2e-ce | ok |" in (out / f"{device}-summary.md").read_text()


def test_gpu_check_keeps_going_past_a_failing_step_and_says_so(tmp_path):
    """A step that fails (here: no time left for any step) is recorded, the others still run, and the
    exit code says the check did not pass."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "GPU_CHECK_BUDGET_S": "0"}
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    device = f"cpu-{os.cpu_count()}core"
    steps = (out / f"{device}-steps.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[:2] for line in steps] == [[name, "skipped"] for name in
                                                        ("env", "cuda-tests", "moe-layer", "e2e-plain", "e2e-ce")]
    assert "## e2e-ce: skipped" in (out / f"{device}-summary.md").read_text()
