"""Stage 6, bench: end-to-end latency of a build folder, every runtime side by side, with parity.

Rows (each on the same inputs, each with its relative error vs the fp32 PyTorch reference):
    transformers eager          stock transformers model, eager experts loop (plain MoE models only:
                                transformers cannot run compressed experts)
    transformers fastest        stock transformers, its fastest experts implementation here
    PyTorch (ce_export op)      the captured model; MoE blocks through torch.ops.ce_export.moe
    ONNX Runtime <provider>     the exported model.onnx
Points: prefill of S tokens (past 0) and one decode step at context C, per batch size. A decode
step is timed by feeding the same past of length C repeatedly, so every repetition sees context C.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ce_export.artifacts import MANIFEST, checkpoint_of, read_json, write_json
from ce_export.capture import build_torch_model
from ce_export.load import load_checkpoint
from ce_export.verify import OrtDecoder, TorchDecoder, compare

BENCH_JSON, BENCH_MD, BENCH_PNG = "bench.json", "bench.md", "bench.png"


@dataclass(frozen=True)
class Point:
    phase: str  # "prefill" or "decode"
    batch: int
    tokens: int  # prefill: sequence length; decode: context (past) length

    @property
    def label(self) -> str:
        return f"{self.phase} b{self.batch} {'S' if self.phase == 'prefill' else 'C'}={self.tokens}"


CPU_POINTS = tuple(Point("prefill", b, s) for b in (1, 4) for s in (128, 512)) + \
    tuple(Point("decode", b, c) for b in (1, 4) for c in (128, 512))


def point_inputs(point: Point, spec, dtype, gen: torch.Generator):
    seq, past = (point.tokens, 0) if point.phase == "prefill" else (1, point.tokens)
    ids = torch.randint(0, spec.vocab_size, (point.batch, seq), generator=gen)
    mask = torch.ones(point.batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(point.batch, -1).contiguous()
    past_kv = tuple(torch.randn(shape, generator=gen).to(dtype) for shape in spec.past_shapes(point.batch, past))
    return ids, mask, positions, past_kv


def median_seconds(fn: Callable[[], object], min_reps: int = 5, budget_s: float = 1.0, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
            "repetitions": len(times)}


def runners_for(folder: Path, manifest: dict, loaded) -> list[tuple[str, Callable]]:
    rows = []
    checkpoint = checkpoint_of(folder, manifest)
    if not loaded.spec.use_ce and loaded.spec.architecture == "olmoe" and all(l.kind == "moe" for l in loaded.spec.moe_layers):
        from transformers import AutoModelForCausalLM

        for name, experts in (("transformers eager", "eager"), ("transformers grouped_mm", "grouped_mm")):
            hf = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager",
                                                      experts_implementation=experts).eval()
            rows.append((name, TorchDecoder(hf)))
    rows.append(("PyTorch (ce_export op)", TorchDecoder(build_torch_model(loaded))))
    rows.append(("ONNX Runtime CPU", OrtDecoder(folder / manifest["onnx"]["file"])))
    return rows


def bench(folder: str | Path, points=CPU_POINTS, budget_s: float = 1.0, report: Callable[[str], None] = print) -> dict:
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "manifest (is this a ce_export build folder?)")
    if manifest["dtype"] != "fp32":
        report(f"note: benchmarking a {manifest['dtype']} ONNX file on CPU; PyTorch rows run fp32")
    loaded = load_checkpoint(checkpoint_of(folder, manifest))
    reference = TorchDecoder(build_torch_model(loaded))
    rows = runners_for(folder, manifest, loaded)
    ort_dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(manifest["dtype"], torch.float32)
    results = []
    gen = torch.Generator().manual_seed(0)
    for point in points:
        inputs = point_inputs(point, loaded.spec, torch.float32, gen)
        expected = reference(*inputs)[0]
        for name, runner in rows:
            feed = inputs if not isinstance(runner, OrtDecoder) else (*inputs[:3], tuple(t.to(ort_dtype) for t in inputs[3]))
            parity = compare(expected, runner(*feed)[0].float())
            timing = median_seconds(lambda: runner(*feed), budget_s=budget_s)
            tokens = point.batch * (point.tokens if point.phase == "prefill" else 1)
            results.append({"point": asdict(point), "label": point.label, "runtime": name, **timing,
                            "tokens_per_s": tokens / (timing["median_ms"] / 1e3), "parity_max_rel": parity["max_rel"]})
            report(f"  {point.label:<22} {name:<26} {timing['median_ms']:9.3f} ms   parity max rel {parity['max_rel']:.1e}")
    data = {"build": str(folder.absolute()), "model": manifest["model"]["architecture"],
            "compressed": manifest["model"]["use_ce"], "target": manifest["target"], "dtype": manifest["dtype"],
            "machine": machine_facts(), "tools": manifest["tools"] | {"torch_threads": torch.get_num_threads()},
            "results": results}
    return data


def machine_facts() -> dict:
    import os

    facts = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def markdown_table(data: dict) -> str:
    runtimes = list(dict.fromkeys(r["runtime"] for r in data["results"]))
    labels = list(dict.fromkeys(r["label"] for r in data["results"]))
    cell = {(r["label"], r["runtime"]): r for r in data["results"]}
    lines = [f"Model: {data['model']} ({'CE' if data['compressed'] else 'plain MoE'}), target {data['target']}, "
             f"{data['dtype']}; machine: {data['machine'].get('cpu_model', data['machine']['processor'])} "
             f"({data['machine']['cpu_count']} cores). Median ms (parity: max relative error of logits vs fp32 PyTorch).",
             "", "| point | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]
    for label in labels:
        cells = [f"{cell[label, rt]['median_ms']:.3f} ({cell[label, rt]['parity_max_rel']:.0e})" for rt in runtimes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = list(dict.fromkeys(r["runtime"] for r in data["results"]))
    labels = list(dict.fromkeys(r["label"] for r in data["results"]))
    cell = {(r["label"], r["runtime"]): r["median_ms"] for r in data["results"]}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(labels)), 4.5))
    width = 0.8 / len(runtimes)
    for i, runtime in enumerate(runtimes):
        ax.bar([x + i * width for x in range(len(labels))], [cell[label, runtime] for label in labels], width, label=runtime)
    ax.set_xticks([x + width * (len(runtimes) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median latency (ms, log scale)")
    ax.set_title(f"{data['model']} {'CE' if data['compressed'] else 'plain'} {data['dtype']} on "
                 f"{data['machine'].get('gpu') or data['machine'].get('cpu_model', 'CPU')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(data: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / BENCH_JSON, data)
    (out_dir / BENCH_MD).write_text(markdown_table(data))
    plot(data, out_dir / BENCH_PNG)
    return [out_dir / BENCH_JSON, out_dir / BENCH_MD, out_dir / BENCH_PNG]
