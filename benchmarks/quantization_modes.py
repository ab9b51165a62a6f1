"""Parity, weight bytes and quality cost of every quantization mode on the demo model, per dtype.

    python benchmarks/quantization_modes.py [--out benchmarks/results/quantization-demo]

Builds the demo (`--target portable`) once per mode and dtype and collects each parity.json: the
logits statistic the dtype is judged by, greedy generation, weight bytes as stored, and the quality
report: exact match on the demo task's held-out problems in ONNX Runtime, and perplexity on their
text, beside unquantized PyTorch fp32's. Writes results.json and results.md (docs/quantization.md's
modes table is generated from results.json by benchmarks/docs_tables.py). int4-g128 also runs on the demo with hidden size 256 (random weights, no
task: perplexity on the built-in corpus), where rows hold two groups of 128.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "plugins"), str(REPO_ROOT / "calibrate"), str(REPO_ROOT / "tests")]

from ce_export import pipeline  # noqa: E402
from ce_export.demo import write_demo_checkpoint  # noqa: E402
from ce_export.errors import CeExportError  # noqa: E402
from ce_export.manifest import Parity  # noqa: E402
from ce_export.quantize import QUANTIZATIONS  # noqa: E402


def measure(checkpoint: Path, mode: str | None, dtype: str, out: Path) -> dict:
    row = {"mode": mode or "unquantized", "dtype": dtype}
    try:
        pipeline.build(str(checkpoint), out, pipeline.BuildOptions(quantize=mode, dtype=dtype), report=lambda line: None)
    except CeExportError as error:
        row["error"] = str(error)
    parity = Parity.read(out)
    quality, task = parity.quality, parity.quality.task
    rows = parity.generation.rows
    return row | {"passed": parity.passed, "statistic": parity.logits.statistic,
                  "worst": parity.logits.worst, "max_rel": parity.logits.max_rel,
                  "generation_identical_rows": sum(r.identical for r in rows), "generation_rows": len(rows),
                  "weight_bytes": quality.weight_bytes, "perplexity_onnx": quality.perplexity_onnx,
                  "perplexity_torch_fp32": quality.perplexity_torch_fp32,
                  "perplexity_delta": quality.perplexity_delta,
                  "accuracy_onnx": task.accuracy_onnx if task is not None else None,
                  "accuracy_torch_fp32": task.accuracy_torch_fp32 if task is not None else None}


def accuracy(row: dict) -> str:
    if row["accuracy_onnx"] is None:
        return "-"
    return f"{row['accuracy_onnx']:.2%} ({row['accuracy_torch_fp32']:.2%})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "quantization-demo")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        demo = write_demo_checkpoint(scratch / "demo")
        from checkpoints import demo_resized

        wide = demo_resized(scratch / "demo_h256", hidden_size=256)
        runs = [(demo, None, dtype) for dtype in ("fp32", "fp16", "bf16")]
        runs += [(demo, mode, dtype) for mode in QUANTIZATIONS for dtype in ("fp32", "fp16", "bf16")]
        runs += [(wide, "int4-g128", "fp32")]
        for index, (checkpoint, mode, dtype) in enumerate(runs):
            row = measure(checkpoint, mode, dtype, scratch / f"build{index}")
            row["model"] = "demo" if checkpoint == demo else "demo, hidden 256"
            results.append(row)
            print(f"{row['model']:<17} {row['mode']:<12} {dtype:<5} {row['statistic']} {row['worst']:.1e} "
                  f"{'passed' if row['passed'] else 'FAILED'}  weights {row['weight_bytes'] / 1e6:.2f} MB  "
                  f"exact match {accuracy(row)}  perplexity {row['perplexity_onnx']:.4f} "
                  f"({row['perplexity_delta']:+.4f})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine,
                                                       "tools": pipeline.tool_versions(), "results": results}, indent=1))
    lines = [f"Command: `{command}` ({machine['platform']}). Logits statistic (worst of 8 shapes; fp32 max_rel, "
             "fp16/bf16 mean_rel), greedy rows identical to PyTorch, weight bytes as stored; the quality report: "
             "exact match on the demo task's held-out problems (300) in ONNX Runtime (unquantized PyTorch fp32 in "
             "brackets), perplexity on their text and its delta vs unquantized PyTorch fp32 (the hidden-256 model "
             "has random weights: its perplexity, on the built-in corpus, says nothing).", "",
             "| model | mode | dtype | statistic | passed | identical rows | weight MB | exact match | perplexity (delta) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['statistic']} {r['worst']:.1e} | "
                     f"{r['passed']} | {r['generation_identical_rows']}/{r['generation_rows']} | "
                     f"{r['weight_bytes'] / 1e6:.2f} | {accuracy(r)} | "
                     f"{r['perplexity_onnx']:.4f} ({r['perplexity_delta']:+.4f}) |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
