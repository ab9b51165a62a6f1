"""End-to-end latency of exported models vs PyTorch, on this machine, in one command.

    python benchmarks/end_to_end.py                       # CPU suite: demo and mid sizes, CE and plain
    python benchmarks/end_to_end.py --sizes olmoe-2-layers --points prefill:1:256 decode:1:256 --no-verify
                                                          # CPU suite at OLMoE-1B-7B width, 2 layers
                                                          # (--logits last: the LM head on the last position)
    python benchmarks/end_to_end.py --suite gpu           # GPU suite: OLMoE-1B-7B shapes, plain and CE, bf16

CPU suite: for each size it writes the checkpoint (random weights from a fixed seed, CE and plain),
builds it (`--target ort`: plain MoE layers through com.microsoft::MoE, CE layers through our
function bodies), runs `ce_export bench` and writes bench.json / bench.md / bench.png per model
plus a summary.md. It measures the CPU's memory bandwidth and fp32 matmul rate first; summary.md
gives each model's floor from them and issue 12's whole-model targets, the CE model's PyTorch /
ONNX Runtime prefill ratio also measured with the two rows called in turn (bench.interleaved).

GPU suite: an OLMoE-1B-7B-shaped model (hidden 2048, 64 experts, top-8, 16 layers; random weights
drawn on the GPU, no download), plain top-8 and CE (4 main + 4 compressed experts, sharing every
other weight), benchmarked on CUDA at batch 1 and 8 (`--batches`; prefill 128 / 512 / 2048 tokens,
decode at context 512 / 2048): transformers eager and grouped_mm (plain only: transformers cannot
run CE), the captured model, our fast path (static cache + CUDA-graph decode, bf16) and, when
ONNX Runtime has the device's execution provider, the fp16 `--target ort` export (`--export
auto`; without the provider nothing is exported: a 7B export takes minutes and would not be run).
The device's memory bandwidth (the faster of a copy and a read-only sum) and matmul rate are measured first; the floors divide by them. After
each model it rewrites headline.md / headline.png (batch 1 of every model benched so far into
`--out`, against the floor, with the issue's targets) and summary.md, so a run cut short keeps the
models it finished, and separate runs per model (`--models plain`, then `--models ce`, sharing
`--checkpoints`) add up. `--size tiny --device cpu` runs the same code on a small model without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ce_export import bench, pipeline
from ce_export.demo import demo_config, demo_tensors
from ce_export.dtypes import DTYPES

SIZES = {
    "demo": {},
    "mid": {"hidden_size": 512, "intermediate_size": 256, "num_experts": 16, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": 4096, "initializer_range": 0.05},
    # allenai/OLMoE-1B-7B-0924's shapes.
    "olmoe-1b-7b": {"hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
                    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                    "vocab_size": 50304, "max_position_embeddings": 4096, "initializer_range": 0.02},
    # OLMoE-1B-7B's layer width with 2 layers (1.05B parameters; CE 4 main + 4 compressed): the CPU
    # suite at real width.
    "olmoe-2-layers": {"hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
                       "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 16,
                       "vocab_size": 50304, "max_position_embeddings": 4096, "initializer_range": 0.02},
    # The GPU suite's code path on a model small enough for a CPU (tests, dry runs).
    "tiny": {"num_experts": 16, "num_experts_per_tok": 8, "num_hidden_layers": 2},
}
GPU_CE_MAIN, GPU_N_CE = 4, 4  # the CE model: top-8 routing, the best 4 run in full, 4 compressed
TARGETS = {"decode_ms_b1_c512": 1.5, "prefill_ms_b1_s2048": 12.0, "decode_x_eager": 50.0, "prefill_x_eager": 3.0,
           "ce_x_plain": 1.3}


def write_checkpoint(folder: Path, size: str, compressed: bool) -> Path:
    config = demo_config(compressed) | SIZES[size]
    if compressed and config["num_experts_per_tok"] == 8:
        config["n_ce"] = GPU_N_CE  # top-8 models: 4 main + 4 compressed, as the CE paper's OLMoE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(demo_tensors(config), str(folder / "model.safetensors"))
    return folder


def write_gpu_checkpoints(folder: Path, size: str, device: str) -> dict[str, Path]:
    """The plain and CE checkpoints of one random model: one shard of shared weights (bf16, drawn on
    `device`), and for CE a second shard with the compressed experts, joined by a safetensors index.
    Checkpoints already complete in `folder` (a `complete` marker, written last) are reused."""
    plain, ce = folder / "plain", folder / "ce"
    marker = folder / "complete"
    config = demo_config(True) | SIZES[size] | {"n_ce": GPU_N_CE, "dtype": "bfloat16"}
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return {"plain": plain, "ce": ce}
    shutil.rmtree(folder, ignore_errors=True)
    tensors = demo_tensors(config, seed=0, device=device, dtype=torch.bfloat16)
    ces = {name: tensors.pop(name) for name in list(tensors) if name.endswith("mlp.ces")}
    for path in (plain, ce):
        path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (plain / "config.json").write_text(json.dumps(config | {"use_ce": False, "n_ce": 0}))
    (ce / "config.json").write_text(json.dumps(config))
    os.symlink((plain / "model.safetensors").absolute(), ce / "model.safetensors")
    save_file(ces, str(ce / "ces.safetensors"), metadata={"format": "pt"})
    from safetensors import safe_open

    with safe_open(str(plain / "model.safetensors"), framework="pt") as handle:
        weight_map = {name: "model.safetensors" for name in handle.keys()}
    weight_map |= {name: "ces.safetensors" for name in ces}
    (ce / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    marker.write_text(json.dumps(config))
    return {"plain": plain, "ce": ce}


def run_cpu_suite(args, command: str) -> None:
    ceilings = bench.measure_ceilings("cpu", torch.float32)
    print(f"== cpu: memory {ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul "
          f"{ceilings['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (measured)", flush=True)
    summary = [f"Command: `{command}`", "", cpu_floor_text(ceilings), ""]
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            results = {}
            for compressed in (True, False):
                name = f"{size}-{'ce' if compressed else 'plain'}"
                print(f"== {name}", flush=True)
                checkpoint = write_checkpoint(Path(scratch) / name / "checkpoint", size, compressed)
                build_dir = Path(scratch) / name / "build"
                options = pipeline.BuildOptions(target="ort", verify=args.verify, logits=args.logits)
                manifest = pipeline.build(str(checkpoint), build_dir, options, report=print)
                data = bench.bench(build_dir, points=args.points or bench.CPU_POINTS, budget_s=args.budget)
                data["command"] = command
                data["build"] = f"{size} model, {'CE' if compressed else 'plain'}, --target ort (scratch folder)"
                data["ceilings"] = ceilings
                prefill = next((row for row in data["results"] if row["point"]["phase"] == "prefill"
                                and row["runtime"].startswith("ONNX Runtime")), None)
                if compressed and prefill:  # issue 12's ratio, both rows resident and called in turn
                    data["interleaved"] = bench.interleaved(build_dir, ("PyTorch (ce_export op)", prefill["runtime"]),
                                                            bench.Point(**prefill["point"]))
                bench.write_results(data, args.out / name)
                results["ce" if compressed else "plain"] = data
                config = json.loads((checkpoint / "config.json").read_text())
                points = list({row["label"]: row["point"] for row in data["results"]}.items())
                logits = manifest.onnx.logits
                floors = [f"{label} {floors_ms(config, compressed, **point, ceilings=ceilings, logits=logits):.1f} ms"
                          for label, point in points]
                summary += [f"## {name}", "", bench.markdown_table(data), "",
                            f"Floor (logits: {logits}): " + "; ".join(floors) + ".",
                            "", f"![{name}]({name}/bench.png)", ""]
            summary += [f"### {size}: issue 12's targets, from the rows above", ""]
            summary += [f"- {line}" for line in cpu_target_lines(results)] + [""]
    (args.out / "summary.md").write_text("\n".join(summary))


def cpu_floor_text(ceilings: dict) -> str:
    return (f"Floor: max(weight bytes read / {ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul FLOPs / "
            f"{ceilings['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s), the rates {ceilings['source']} (fp32); "
            "attention's scores and everything but the weight matmuls counted as free.")


def cpu_target_lines(results: dict) -> list[str]:
    """Issue 12's whole-model targets: CE in ONNX Runtime (our portable body) <= 0.9x plain top-8 in
    ONNX Runtime (com.microsoft::MoE), and >= 2x faster than the captured PyTorch model."""
    def ms(model: str, runtime: str, phase: str):
        rows = [row for row in results.get(model, {}).get("results", [])
                if row["runtime"].startswith(runtime) and row["point"]["phase"] == phase and "median_ms" in row]
        return rows[0]["median_ms"] if rows else None

    lines = []
    interleaved = results.get("ce", {}).get("interleaved")
    if interleaved:
        value = interleaved["ratio_median"]
        spread = f"{interleaved['ratio_min']:.2f}-{interleaved['ratio_max']:.2f}"
        lines.append(f"CE: PyTorch / ONNX Runtime, {interleaved['label']}, the two called in turn "
                     f"({interleaved['rounds']} rounds, {spread}): "
                     f"{value:.2f} (target >= 2.0: {'met' if value >= 2.0 else 'NOT met'})")
    for phase in ("prefill", "decode"):
        ce_ort, plain_ort, ce_torch = ms("ce", "ONNX Runtime", phase), ms("plain", "ONNX Runtime", phase), \
            ms("ce", "PyTorch", phase)
        for what, value, goal, better in (
                (f"CE / plain in ONNX Runtime, {phase}", ratio(ce_ort, plain_ort), 0.9, "<="),
                (f"CE: PyTorch / ONNX Runtime, {phase}", ratio(ce_torch, ce_ort), 2.0, ">=")):
            if value is None:
                continue
            target = ""
            if phase == "prefill":  # the issue sets targets on prefill only
                met = value <= goal if better == "<=" else value >= goal
                target = f" (target {better} {goal}: {'met' if met else 'NOT met'})"
            lines.append(f"{what}: {value:.2f}{target}")
    return lines


def gpu_points(batches, quick: bool) -> tuple:
    if quick:
        return (bench.Point("prefill", 1, 64), bench.Point("decode", 2, 32))
    return bench.gpu_points(batches)


def should_export(choice: str, device: str) -> tuple[bool, str]:
    """(export?, why not): `auto` exports only when ONNX Runtime has the device's provider."""
    if choice == "never":
        return False, "not exported (--export never)"
    if choice == "always":
        return True, ""
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    if provider in ort.get_available_providers():
        return True, ""
    return False, (f"not exported: onnxruntime {ort.__version__} has no {provider} here "
                   f"(providers: {', '.join(ort.get_available_providers())}), so no ONNX Runtime row could run it")


def run_gpu_suite(args, command: str) -> None:
    points = gpu_points(args.batches, args.quick)
    max_tokens = max(p.tokens for p in points)
    started = time.perf_counter()
    export, no_export_reason = should_export(args.export, args.device)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    ceilings = bench.measure_ceilings(args.device, dtype)
    print(f"== {ceilings['device']}: memory {ceilings['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, "
          f"{ceilings['dtype']} matmul {ceilings['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s (measured)", flush=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        checkpoint_dir = args.checkpoints or Path(scratch) / "checkpoints"
        print(f"== the {args.size} checkpoints in {checkpoint_dir} (random bf16 weights drawn on {args.device})",
              flush=True)
        checkpoints = write_gpu_checkpoints(checkpoint_dir, args.size, args.device)
        print(f"   {time.perf_counter() - started:.0f} s", flush=True)
        for name in args.models:
            model_started = time.perf_counter()
            onnx = None
            if export:
                build_dir = Path(scratch) / name / "build"
                print(f"== {name}: export (fp16, --target ort)", flush=True)
                options = pipeline.BuildOptions(target="ort", dtype="fp16", verify=False,
                                                max_batch=max(p.batch for p in points), max_seq=max_tokens,
                                                max_context=2 * max_tokens)
                manifest = pipeline.build(str(checkpoints[name]), build_dir, options, report=print)
                onnx = bench.OnnxFile.of_build(build_dir, manifest)
            print(f"== {name}: bench on {args.device} ({time.perf_counter() - started:.0f} s so far)", flush=True)
            data = bench.bench_checkpoint(checkpoints[name], points=points, budget_s=args.budget, device=args.device,
                                          dtype=args.dtype, compile_decode=args.compile, onnx=onnx,
                                          no_onnx_reason=no_export_reason)
            data["command"] = command
            data["build"] = (f"{args.size}-shaped {name} model, random weights"
                             + (", --target ort --dtype fp16" if onnx else f"; {no_export_reason}"))
            data["ceilings"] = ceilings
            bench.write_results(data, args.out / f"{args.size}-{name}")
            shutil.rmtree(Path(scratch) / name, ignore_errors=True)  # an fp16 7B export is 14 GB of disk
            write_headline(args.out, args.size, command)
            print(f"== {name}: done in {time.perf_counter() - model_started:.0f} s; headline: "
                  f"{args.out / 'headline.md'}", flush=True)
    print((args.out / "headline.md").read_text())
    print(f"GPU suite done in {time.perf_counter() - started:.0f} s")


def write_headline(out: Path, size: str, command: str) -> None:
    """headline.md / .png and summary.md from every `{size}-{model}/bench.json` under `out`."""
    results = {}
    for name in ("plain", "ce"):
        path = out / f"{size}-{name}" / bench.BENCH_JSON
        if path.is_file():
            results[name] = json.loads(path.read_text())
    headline = headline_table(results, size)
    (out / "headline.md").write_text(f"Command: `{command}`\n\n{headline}")
    plot_headline(results, out / "headline.png")
    summary = [f"Command: `{command}`", "", headline]
    for name, data in results.items():
        summary += [f"## {size}-{name}", "", bench.markdown_table(data), f"![{name}]({size}-{name}/bench.png)", ""]
    (out / "summary.md").write_text("\n".join(summary))


def floors_ms(config: dict, compressed: bool, batch: int, tokens: int, phase: str, ceilings: dict,
              logits: str = "all") -> float:
    """max(active weight bytes / bandwidth, active FLOPs / matmul rate) for one point, in the rows'
    dtype, with the rates measured on the device in the same run (`ceilings`). `logits`: "last"
    when the model computes the LM head on each sequence's last position only."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    experts_run = config["num_experts_per_tok"] - (config["n_ce"] if compressed else 0)
    attention = 4 * hidden * hidden
    lm_head = config["vocab_size"] * hidden
    new_tokens = batch * (tokens if phase == "prefill" else 1)
    logits_rows = batch if logits == "last" else new_tokens
    # Weight bytes: every expert some token picks is read once; at batch 1 decode that is the active set.
    distinct_experts = min(config["num_experts"], experts_run * new_tokens)
    element_bytes = torch.finfo(getattr(torch, ceilings["dtype"])).bits // 8
    weight_bytes = element_bytes * (layers * (attention + distinct_experts * 3 * hidden * inter)
                                    + lm_head)
    flops = 2 * (layers * (attention + experts_run * 3 * hidden * inter) * new_tokens + lm_head * logits_rows)
    return 1e3 * max(weight_bytes / ceilings["bandwidth_bytes_per_s"], flops / ceilings["matmul_flops_per_s"])


def headline_table(results: dict, size: str) -> str:
    config = demo_config(True) | SIZES[size] | {"n_ce": GPU_N_CE}
    rows = []  # (runtime label, model, result row)
    for name, data in results.items():
        for row in data["results"]:
            if row["point"]["batch"] == 1 and "median_ms" in row:
                rows.append((f"{row['runtime']} ({name})", name, row))
    labels = list(dict.fromkeys(r[2]["label"] for r in rows))
    runtimes = list(dict.fromkeys(r[0] for r in rows))
    cell = {(r[2]["label"], r[0]): r[2] for r in rows}
    first = next(iter(results.values()), {})
    machine, tools, ceilings = first.get("machine", {}), first.get("tools", {}), first.get("ceilings")
    if ceilings:
        floor_text = (f"Floor: bytes / {ceilings.get('bandwidth_bytes_per_s', ceilings['copy_bytes_per_s']) / 1e12:.2f} TB/s or FLOPs / "
                      f"{ceilings['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s ({ceilings['dtype']}), whichever is "
                      f"larger; both rates measured on {ceilings['device']} in this run.")
    else:
        floor_text = "No floor: no device ceilings were measured."
    lines = [f"{size} shapes, batch 1, random weights; {machine_label(first)}, torch {tools.get('torch_runtime')}, "
             f"triton {tools.get('triton_runtime', '-')}, onnxruntime {tools.get('onnxruntime_runtime', '-')}, "
             f"{time.strftime('%Y-%m-%d')}. Median ms (parity: max relative error of the last position's logits "
             f"vs the fp32 reference). {floor_text}",
             "", "| point | " + " | ".join(runtimes) + " | floor plain / CE |", "|---|" + "---|" * (len(runtimes) + 1)]
    for label in labels:
        point = next(r[2]["point"] for r in rows if r[2]["label"] == label)
        floor = " / ".join(
            f"{floors_ms(config, ce, 1, point['tokens'], point['phase'], results[name]['ceilings']):.2f}"
            if name in results and results[name].get("ceilings") else "-"
            for ce, name in ((False, "plain"), (True, "ce")))
        cells = [f"{cell[label, rt]['median_ms']:.2f} ({cell[label, rt]['parity_max_rel']:.0e})"
                 if (label, rt) in cell else "-" for rt in runtimes]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {floor} |")
    lines += ["", "Targets (issue 6), from the rows above:", ""] + [f"- {line}" for line in target_lines(cell)]
    return "\n".join(lines) + "\n"


def target_lines(cell: dict) -> list[str]:
    def ms(label, runtime, model):
        """The fastest measured row of `runtime` (its plain and + compile variants) on `model`."""
        times = [row["median_ms"] for (row_label, name), row in cell.items()
                 if row_label == label and name.startswith(runtime) and name.endswith(f"({model})")]
        return min(times) if times else None

    fast, eager = "ce_export fast path", "transformers eager"
    decode, prefill = "decode b1 C=512", "prefill b1 S=2048"
    checks = []
    for what, value, goal, better in (
            ("CE fast path decode, context 512 (ms/token)", ms(decode, fast, "ce"), TARGETS["decode_ms_b1_c512"], "<="),
            ("CE fast path prefill 2048 (ms)", ms(prefill, fast, "ce"), TARGETS["prefill_ms_b1_s2048"], "<="),
            ("decode speedup vs transformers eager (plain)",
             ratio(ms(decode, eager, "plain"), ms(decode, fast, "ce")), TARGETS["decode_x_eager"], ">="),
            ("prefill speedup vs transformers eager (plain)",
             ratio(ms(prefill, eager, "plain"), ms(prefill, fast, "ce")), TARGETS["prefill_x_eager"], ">="),
            ("CE vs plain decode on our path", ratio(ms(decode, fast, "plain"), ms(decode, fast, "ce")),
             TARGETS["ce_x_plain"], ">="),
            ("CE vs plain prefill on our path", ratio(ms(prefill, fast, "plain"), ms(prefill, fast, "ce")),
             TARGETS["ce_x_plain"], ">=")):
        if value is None:
            checks.append(f"{what}: not measured in this run (target {better} {goal})")
            continue
        met = value <= goal if better == "<=" else value >= goal
        checks.append(f"{what}: {value:.2f} (target {better} {goal}: {'met' if met else 'NOT met'})")
    return checks


def machine_label(data: dict) -> str:
    return bench.machine_name(data) if data else "no results"


def ratio(slow, fast):
    return slow / fast if slow and fast else None


def plot_headline(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, phase in zip(axes, ("prefill", "decode")):
        series = {}
        for name, data in results.items():
            for row in data["results"]:
                if row["point"]["phase"] == phase and row["point"]["batch"] == 1 and "median_ms" in row:
                    series.setdefault(f"{row['runtime']} ({name})", {})[row["point"]["tokens"]] = row["median_ms"]
        for label, values in series.items():
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens" if phase == "prefill" else "context tokens")
        ax.set_ylabel("median ms" + (" per token" if phase == "decode" else ""))
        ax.set_title(f"{phase}, batch 1")
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_point(text: str) -> bench.Point:
    phase, batch, tokens = text.split(":")
    if phase not in ("prefill", "decode"):
        raise argparse.ArgumentTypeError(f"{text}: phase must be prefill or decode")
    return bench.Point(phase, int(batch), int(tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sizes", nargs="+", choices=("demo", "mid", "olmoe-2-layers"), default=["demo", "mid"],
                        help="CPU suite sizes")
    parser.add_argument("--points", nargs="+", type=parse_point, metavar="PHASE:BATCH:TOKENS",
                        help="CPU suite points, e.g. prefill:1:256 decode:1:256 (default: bench.CPU_POINTS)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="CPU suite: build without the parity check (each row still reports its parity)")
    parser.add_argument("--logits", choices=("all", "last"), default="all",
                        help="CPU suite: export logits for every position or the last only (the PyTorch rows compute "
                             "the same positions)")
    parser.add_argument("--size", choices=("olmoe-1b-7b", "tiny"), default="olmoe-1b-7b", help="GPU suite size")
    parser.add_argument("--models", nargs="+", choices=("plain", "ce"), default=["plain", "ce"], help="GPU suite models")
    parser.add_argument("--device", default="cuda", help="GPU suite device (cpu with --size tiny for a dry run)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="GPU suite PyTorch rows (default bf16 on cuda)")
    parser.add_argument("--quick", action="store_true", help="GPU suite: two small points instead of the full grid")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="GPU suite batch sizes")
    parser.add_argument("--export", choices=("auto", "always", "never"), default="auto",
                        help="GPU suite: export to ONNX (auto: only when ONNX Runtime has the device's provider)")
    parser.add_argument("--checkpoints", type=Path,
                        help="GPU suite: keep the random checkpoints here and reuse them (default: a temp folder)")
    parser.add_argument("--compile", action="store_true", help="GPU suite: add a fast-path row with torch.compile'd decode")
    parser.add_argument("--scratch", help="where checkpoints and exports go (default: the system temp folder)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repetitions per row and point")
    args = parser.parse_args(argv)
    if args.out is None:
        host = platform.node() or "host"
        args.out = Path("benchmarks/results") / (f"cpu-{host}" if args.suite == "cpu" else bench.device_slug(args.device))
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite == "cpu":
        run_cpu_suite(args, command)
    else:
        run_gpu_suite(args, command)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
