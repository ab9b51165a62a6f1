"""The MoE compression study's table in miniature, on the trained demo: quality against speed.

    python benchmarks/compression_study.py [--out benchmarks/results/compression-demo] [--lock F] [--quiet-file Q]

For the plain demo (top-4 of 8 experts) and its Compressed-Experts fine-tune (2 main + 2
compressed), each of
- no compression; for the plain model also its top-2 without CE or fine-tuning (what the CE
  fine-tune starts from);
- Expert Drop of 25% and 50% of the experts, global and per layer; Layer Drop of 1 and 2 MoE
  sub-layers; Block Drop of 1 block (`ce_calibrate.calibrate` on the checkpoint's calibration text,
  then `ce_calibrate.trim`, as `ce_export calibrate` / `trim` do);
- every weight quantization mode (`build --quantize`),
is built (`--target portable`, fp32; the build's own quality report) and timed in ONNX Runtime on
the CPU. Per row: exact-match accuracy on the task's 300 held-out problems and perplexity on their
text in ONNX Runtime (with PyTorch fp32's accuracy beside it), total and active parameters, weight
bytes as stored, and the median time of a prefill and of a decode step. Writes results.json,
results.md and study.png (accuracy against decode and prefill time).

Timing: ce_export.bench's ONNX Runtime row (IO binding, the same seeded inputs for every model),
median of repetitions over `--budget` seconds per point, after warm-up, all after every build. On a
shared machine `--lock` takes a lock file's flock for the timings and `--quiet-file` creates a
marker file while they run, so no other work shares the cores then.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "plugins"), str(REPO_ROOT / "calibrate")]

import torch  # noqa: E402

from ce_export import bench, pipeline  # noqa: E402
from ce_export.artifacts import write_json  # noqa: E402
from ce_export.demo import write_demo_checkpoint  # noqa: E402
from ce_export.errors import CeExportError  # noqa: E402
from ce_export.manifest import Manifest, Parity  # noqa: E402
from ce_export.quantize import QUANTIZATIONS  # noqa: E402
from ce_export.runners import OrtRunner  # noqa: E402
from ce_export.spec import MoeLayerSpec  # noqa: E402

POINTS = (bench.Point("prefill", 1, 128), bench.Point("decode", 1, 128))
CALIBRATION = dict(seq_len=64, num_sequences=128)  # 8k tokens of the checkpoint's calibration text
TRIMS = (  # (label, trim options)
    ("expert drop 25% global", dict(expert_drop=0.25, scope="global")),
    ("expert drop 25% per layer", dict(expert_drop=0.25, scope="layer")),
    ("expert drop 50% global", dict(expert_drop=0.5, scope="global")),
    ("expert drop 50% per layer", dict(expert_drop=0.5, scope="layer")),
    ("layer drop 1", dict(expert_drop=0.0, layer_drop=1)),
    ("layer drop 2", dict(expert_drop=0.0, layer_drop=2)),
    ("block drop 1", dict(expert_drop=0.0, block_drop=1)),
)


@dataclass
class Variant:
    model: str  # "plain" or "CE"
    method: str
    checkpoint: Path
    quantize: str | None = None
    row: dict = field(default_factory=dict)


def top2_without_ce(plain: Path, out: Path) -> Path:
    """The plain checkpoint routed to its top-2 (no renormalisation): what CE starts from."""
    import shutil

    shutil.copytree(plain, out)
    config = json.loads((out / "config.json").read_text())
    config["num_experts_per_tok"] = 2
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def variants(scratch: Path, report) -> list[Variant]:
    from ce_calibrate import calibrate, trim

    result = []
    for model, compressed in (("plain", False), ("CE", True)):
        checkpoint = write_demo_checkpoint(scratch / model, compressed=compressed)
        result.append(Variant(model, "none", checkpoint))
        if not compressed:
            result.append(Variant(model, "top-2 of its top-4, no CE", top2_without_ce(checkpoint, scratch / "plain-top2")))
        stats = scratch / f"{model}-calibration"
        calibrate(checkpoint, stats, progress=False, report=report, **CALIBRATION)
        for label, options in TRIMS:
            out = scratch / f"{model}-{label.replace(' ', '-').replace('%', '')}"
            trim(checkpoint, stats / "calibration.json", out, report=lambda line: None, **options)
            result.append(Variant(model, label, out))
        result += [Variant(model, f"quantize {mode}", checkpoint, quantize=mode) for mode in QUANTIZATIONS]
    return result


def build_and_score(variant: Variant, out: Path) -> dict:
    """The variant's build and what its quality report says (no timing)."""
    row = {"model": variant.model, "method": variant.method}
    try:
        pipeline.build(str(variant.checkpoint), out, pipeline.BuildOptions(quantize=variant.quantize),
                       report=lambda line: None)
    except CeExportError as error:  # a failed parity check still leaves the folder and its numbers
        row["error"] = str(error)
    parity = Parity.read(out)
    manifest = Manifest.read(out)
    quality, task = parity.quality, parity.quality.task
    row.update(parity_passed=parity.passed, accuracy_onnx=task.accuracy_onnx,
               accuracy_torch_fp32=task.accuracy_torch_fp32, per_task_onnx=task.per_task_onnx,
               perplexity_onnx=quality.perplexity_onnx, perplexity_torch_fp32=quality.perplexity_torch_fp32,
               total_parameters=quality.parameters.total,
               active_parameters=quality.parameters.active_per_token, weight_bytes=quality.weight_bytes,
               experts_per_layer=[layer.num_experts if isinstance(layer, MoeLayerSpec) else 0
                                  for layer in manifest.model.moe_layers],
               layers=manifest.model.num_layers)
    return row


def time_build(row: dict, out: Path, quantized: bool, budget_s: float) -> None:
    """ONNX Runtime CPU median ms of each point into `row`."""
    manifest = Manifest.read(out)
    loaded = pipeline.load_checkpoint(manifest.source.checkpoint(out))
    runner = OrtRunner(out / manifest.onnx.file, exact_dequantize=quantized)
    for point in POINTS:
        step = runner.prepare(*bench.point_inputs(point, loaded.spec, torch.float32, torch.device("cpu")))
        timing = bench.time_ms(step.run, torch.device("cpu"), budget_s=budget_s)
        row[f"{point.phase}_ms"], row[f"{point.phase}_repetitions"] = timing["median_ms"], timing["repetitions"]


@contextmanager
def exclusive(lock: Path | None):
    """Hold `lock`'s flock (a shared machine's lock for timing work) while the block runs."""
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def marker(path: Path | None):
    """`path` exists while the block runs (a shared machine's sign that timing is under way), then not."""
    if path is None:
        yield
        return
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def markdown(rows: list[dict], command: str, machine: dict, seconds: float) -> str:
    prefill, decode = POINTS
    lines = [f"Command: `{command}`; {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} cores, "
             f"{machine['platform']}; onnxruntime {machine['onnxruntime']}; {seconds / 60:.0f} min in all, the "
             f"timings {machine['timing_seconds'] / 60:.1f} min of it (1-min load average "
             f"{machine['load_average_1min_before_timing']:.2f} when they began).",
             "",
             f"Exact match on the demo task's held-out problems and perplexity on their text, both in ONNX "
             f"Runtime (PyTorch fp32 in brackets); parameters total / active per token; weights as stored; "
             f"ONNX Runtime CPU median ms of a {prefill.label} and a {decode.label} (fp32 builds, --target portable).",
             "",
             "| model | compression | exact match | perplexity | parameters (active) | weights | experts per layer "
             "| prefill ms | decode ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        experts = "/".join(str(n) for n in r["experts_per_layer"]) + (f" ({r['layers']} blocks)" if r["layers"] != 4 else "")
        lines.append(f"| {r['model']} | {r['method']} | {r['accuracy_onnx']:.1%} ({r['accuracy_torch_fp32']:.1%}) | "
                     f"{r['perplexity_onnx']:.3f} ({r['perplexity_torch_fp32']:.3f}) | "
                     f"{r['total_parameters'] / 1e6:.3f}M ({r['active_parameters'] / 1e6:.3f}M) | "
                     f"{r['weight_bytes'] / 1e6:.2f} MB | {experts} | {r['prefill_ms']:.3f} | {r['decode_ms']:.3f} |"
                     + (f" parity: {r['error']}" if r.get("error") else ""))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "tab:blue", "CE": "tab:red"}
    markers = {"none": "*", "top-2": "P", "expert": "o", "layer": "s", "block": "D", "quantize": "^"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 11), sharex="col", sharey="row")
    quality = (("accuracy_onnx", "exact match on held-out problems, ONNX Runtime (%)", 100),
               ("perplexity_onnx", "perplexity on their text, ONNX Runtime", 1))
    for row_axes, (key, label, scale) in zip(axes, quality):
        for ax, phase in zip(row_axes, ("decode", "prefill")):
            for r in rows:
                marker = markers[r["method"].split()[0]]
                ax.scatter(r[f"{phase}_ms"], scale * r[key], color=colors[r["model"]], marker=marker,
                           s=110 if marker == "*" else 45, alpha=0.8, edgecolors="black", linewidths=0.4)
                ax.annotate(f"{r['model']} {r['method'].replace('quantize ', '')}", (r[f"{phase}_ms"], scale * r[key]),
                            fontsize=6, xytext=(3, 2), textcoords="offset points")
            point = POINTS[0] if phase == "prefill" else POINTS[1]
            ax.set_xlabel(f"ONNX Runtime CPU, {point.label}: median ms")
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel(label)
    axes[1][0].set_yscale("log")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], color="gray", marker=mk, linestyle="", label=name) for name, mk in markers.items()]
    fig.legend(handles=handles, fontsize=8, loc="center right")
    fig.suptitle("Compression of the trained demo MoE: task quality against ONNX Runtime CPU time", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.91, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "compression-demo")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed repetitions per point")
    parser.add_argument("--lock", type=Path, metavar="PATH",
                        help="take this file's flock for the timings (only): a shared machine's lock for timing work")
    parser.add_argument("--quiet-file", type=Path, metavar="PATH",
                        help="a file to create while (only while) the timings run: a shared machine's sign "
                             "for others to hold off starting work")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    import onnxruntime

    machine = {**bench.machine_facts(), "onnxruntime": onnxruntime.__version__}
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        builds = []
        for index, variant in enumerate(variants(scratch, report=lambda line: None)):
            out = scratch / f"build{index}"
            row = build_and_score(variant, out)
            builds.append((row, out, bool(variant.quantize)))
            print(f"built {row['model']:<6} {row['method']:<28} exact match {row['accuracy_onnx']:.1%} "
                  f"(PyTorch {row['accuracy_torch_fp32']:.1%}), perplexity {row['perplexity_onnx']:.3f}, "
                  f"{row['active_parameters'] / 1e6:.3f}M active, {row['weight_bytes'] / 1e6:.2f} MB"
                  + (f"  [{row['error']}]" if row.get("error") else ""), flush=True)
        timing_start = time.perf_counter()
        with exclusive(args.lock), marker(args.quiet_file):
            machine["load_average_1min_before_timing"] = os.getloadavg()[0]
            for row, out, quantized in builds:
                time_build(row, out, quantized, args.budget)
                rows.append(row)
                print(f"timed {row['model']:<6} {row['method']:<28} prefill {row['prefill_ms']:.3f} ms, "
                      f"decode {row['decode_ms']:.3f} ms", flush=True)
        machine["timing_seconds"] = time.perf_counter() - timing_start
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"command": command, "machine": machine, "seconds": seconds,
                                           "points": [p.label for p in POINTS], "tools": pipeline.tool_versions(),
                                           "rows": rows})
    (args.out / "results.md").write_text(markdown(rows, command, machine, seconds))
    plot(rows, args.out / "study.png")
    print(f"results: {args.out} ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
