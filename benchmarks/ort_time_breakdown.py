"""Where ONNX Runtime's CPU prefill time goes in one exported model, and what bounds it.

    python benchmarks/ort_time_breakdown.py --out benchmarks/results/ort-breakdown-2core
        # issue 12's whole-model point: OLMoE-1B-7B width, 2 layers, CE (4 main + 4 compressed),
        # --target ort, --logits last, prefill of 256 tokens at batch 1
    python benchmarks/ort_time_breakdown.py --build DIR [--tokens 256]   # an fp32 build of --target ort or portable

1. Builds the model (end_to_end.py's random checkpoint of --size) unless --build names a build folder.
2. Times the captured PyTorch model and ONNX Runtime on the point, called in turn (bench.interleaved).
3. Profiles ONNX Runtime on the point (its own per-node profiler, --runs calls after a warm-up) and
   sorts every node's time into the classes of `classify`. Each GEMM's FLOPs come from the shapes
   the profiler records, so each GEMM class has a rate to hold against this machine's fp32 matmul
   rate, measured in the same run (bench.measure_ceilings).
4. Times one expert's gate and up projections for c tokens per expert, in the sparse body's form
   (the expert's [2, I, H] weights read in place, times c tokens' inputs transposed) and, called in
   turn with it, with the weights as prepacked constants (EXPERT_FORMS): the GEMM shape the experts
   run at, its rate against c, and the one alternative form ONNX Runtime's MLAS offers.
Writes breakdown.json, breakdown.md and breakdown.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import end_to_end  # noqa: E402
from ce_export import bench, pipeline  # noqa: E402
from ce_export.artifacts import write_json, write_text  # noqa: E402
from ce_export.load import load_checkpoint  # noqa: E402
from ce_export.manifest import read_manifest  # noqa: E402
from ce_export.runners import OrtRunner, threads_from_environment  # noqa: E402

EXPERT_GEMMS = "experts: GEMMs"
EXPERT_OPS = "experts: other ops"
EXPERT_CONTROL = "experts: Scan / If control"
FUSED_MOE = "com.microsoft::MoE"
WEIGHT_GEMMS = "weight GEMMs outside the experts"
OTHER_GEMMS = "other GEMMs"
OTHER_OPS = "other ops"
CLASSES = (EXPERT_GEMMS, WEIGHT_GEMMS, OTHER_GEMMS, FUSED_MOE, EXPERT_OPS, EXPERT_CONTROL, OTHER_OPS)
CLASS_NOTES = {
    EXPERT_GEMMS: "the MatMuls inside the experts body's Scan (gate and up, down)",
    EXPERT_OPS: "every other node inside the Scan: row gathers, transposes, the activation, padding",
    EXPERT_CONTROL: "the Scans' and Ifs' time beyond the nodes they ran (only the experts body has them)",
    FUSED_MOE: "ONNX Runtime's fused MoE op (plain layers of --target ort)",
    WEIGHT_GEMMS: "GEMMs by a weight matrix outside the Scan: attention projections, router, LM head",
    OTHER_GEMMS: "GEMMs of two activations or batched ones: attention scores, the experts function's mixing",
    OTHER_OPS: "everything else: norms, rotary, softmax, routing, gathers, KV concatenation",
}
GEMM_OPS = {"MatMul", "FusedMatMul", "Gemm"}
CONTROL_OPS = {"Scan", "If", "Loop"}
PYTORCH_ROW = "PyTorch (ce_export op)"
ORT_ROW = "ONNX Runtime CPU (fp32)"


def shapes(event: dict, key: str) -> list[list[int]]:
    return [next(iter(entry.values())) for entry in event["args"].get(key, [])]


def gemm_flops(event: dict) -> int:
    """2 x output elements x the inner dimension, read as A's last (A is never transposed in these
    files: ONNX Runtime fuses transposes into B, the weights or the keys)."""
    out = shapes(event, "output_type_shape")[0]
    return 2 * math.prod(out) * shapes(event, "input_type_shape")[0][-1]


def classify(events: list[dict], calls: int) -> dict:
    """ONNX Runtime profiler events of `calls` model calls -> per class, per call: ms, GEMM GFLOP and
    node count; plus the profiled call's median ms. Nodes run by a Scan or If (its subgraph's) are
    the ones whose span lies within the Scan's or If's: the CPU runs one node at a time."""
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    containers = sorted((e["ts"], e["ts"] + e["dur"]) for e in nodes if e["args"]["op_name"] in CONTROL_OPS)

    def contained(event: dict) -> bool:
        start, end = event["ts"], event["ts"] + event["dur"]
        return any(a <= start and end <= b and (a, b) != (start, end) for a, b in containers)

    totals = {name: {"ms": 0.0, "gflop": 0.0, "nodes": 0} for name in CLASSES}
    inner_leaf_us = 0.0
    outer_control_us = 0.0
    for event in nodes:
        op = event["args"]["op_name"]
        inside = contained(event)
        if op in CONTROL_OPS:
            totals[EXPERT_CONTROL]["nodes"] += 1
            if not inside:
                outer_control_us += event["dur"]
            continue
        if op == "MoE":
            name = FUSED_MOE
        elif op in GEMM_OPS:
            if inside:
                name = EXPERT_GEMMS
            else:
                operands = shapes(event, "input_type_shape")  # a prepacked weight is not listed
                name = WEIGHT_GEMMS if len(operands) < 2 or len(operands[1]) == 2 else OTHER_GEMMS
        else:
            name = EXPERT_OPS if inside else OTHER_OPS
        if inside:
            inner_leaf_us += event["dur"]
        totals[name]["ms"] += event["dur"] / 1e3
        totals[name]["nodes"] += 1
        if op in GEMM_OPS:
            totals[name]["gflop"] += gemm_flops(event) / 1e9
    totals[EXPERT_CONTROL]["ms"] += (outer_control_us - inner_leaf_us) / 1e3
    for entry in totals.values():
        for key in entry:
            entry[key] /= calls
    runs = [e["dur"] / 1e3 for e in events if e.get("name") == "model_run"]
    return {"classes": totals, "profiled_call_ms": statistics.median(runs[-calls:]) if runs else None}


EXPERT_FORMS = {
    "in_place": "the sparse body's form: the expert's [2, I, H] weights read in place (the left operand), "
                "times c tokens' inputs transposed",
    "prepacked": "the alternative: c tokens' inputs as rows (two Gemms, gate and up, transB), against the "
                 "expert's weights as constant initializers, which ONNX Runtime prepacks once at load "
                 "(a Scan cannot hand a MatMul a constant, so this form needs one node per expert)",
}


def expert_gemm_curve(hidden: int, intermediate: int, token_counts: list[int], experts: int = 64,
                      rounds: int = 5) -> list[dict]:
    """One expert's gate and up projections in each of EXPERT_FORMS, over `experts` distinct experts
    so the weights stream from memory as in the model, the two forms called in turn
    (bench.called_in_turn): for each c, ms per expert and GFLOP/s of each form."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    def session(nodes, inputs, outputs, initializers=()):
        graph = helper.make_graph(nodes, "expert_gate_up", inputs, outputs, initializer=list(initializers))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = threads_from_environment()
        if threads:
            options.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((2, intermediate, hidden), dtype=np.float32) for _ in range(experts)]
    in_place = session(
        [helper.make_node("Transpose", ["rows"], ["columns"], perm=[1, 2, 0])]
        + [helper.make_node("MatMul", [f"w{e}", "columns"], [f"y{e}"]) for e in range(experts)],
        [value(f"w{e}", [2, intermediate, hidden]) for e in range(experts)] + [value("rows", [None, 2, hidden])],
        [value(f"y{e}", None) for e in range(experts)])
    prepacked = session(
        [helper.make_node("Gemm", [f"x_{half}", f"w{e}_{half}"], [f"y{e}_{half}"], transB=1)
         for e in range(experts) for half in ("gate", "up")],
        [value("x_gate", [None, hidden]), value("x_up", [None, hidden])],
        [value(f"y{e}_{half}", None) for e in range(experts) for half in ("gate", "up")],
        [numpy_helper.from_array(weights[e][index], f"w{e}_{half}")
         for e in range(experts) for index, half in enumerate(("gate", "up"))])
    curve = []
    for count in token_counts:
        rows = rng.standard_normal((count, 2, hidden), dtype=np.float32)
        in_place_feeds = {f"w{e}": weights[e] for e in range(experts)} | {"rows": rows}
        prepacked_feeds = {"x_gate": np.ascontiguousarray(rows[:, 0]), "x_up": np.ascontiguousarray(rows[:, 1])}
        expected = in_place.run(["y0"], in_place_feeds)[0]  # [2, I, c]
        got = np.stack(prepacked.run(["y0_gate", "y0_up"], prepacked_feeds)).transpose(0, 2, 1)
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-3):
            raise AssertionError(f"the two forms disagree at c={count}: max |diff| {np.abs(got - expected).max():.3g}")
        turn = bench.called_in_turn({"in_place": lambda: in_place.run(None, in_place_feeds),
                                     "prepacked": lambda: prepacked.run(None, prepacked_feeds)}, rounds)
        flop = 2 * 2 * intermediate * hidden * count
        point = {"tokens": count}
        for form, ms in turn["median_ms"].items():
            point[form] = {"ms": ms / experts, "gflop_per_s": flop / (ms / experts / 1e3) / 1e9}
        curve.append(point)
    return curve


def profile_ort(build: Path, point: bench.Point, calls: int) -> dict:
    manifest = read_manifest(build)
    loaded = load_checkpoint(manifest.source.checkpoint(build))
    inputs = bench.point_inputs(point, loaded.spec, torch.float32, torch.device("cpu"))
    del loaded
    with tempfile.TemporaryDirectory() as folder:
        runner = OrtRunner(build / manifest.onnx.file, profile_dir=folder)
        step = runner.prepare(*inputs)
        step.run()
        for _ in range(calls):
            time.sleep(bench.TURN_PAUSE_S)
            step.run()
        events = runner.profile_events()
    # the warm-up call is in the profile too: classify the last `calls` model_run spans only
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    first = runs[-calls][0]
    return classify([e for e in events if e.get("ts", first) >= first], calls)


def gemm_budget(data: dict) -> dict:
    """The GEMM classes' share of the profiled call, applied to the call timed in turn without the
    profiler, and what 2x PyTorch's speed leaves for the rest. The profiler's cost is per node, so it
    inflates the many small nodes more than the few GEMMs: their share without it is at least this,
    and the time left for the rest at most this."""
    classes, turn = data["profile"]["classes"].values(), data["called_in_turn"]["median_ms"]
    profiled = sum(entry["ms"] for entry in classes)
    share = sum(entry["ms"] for entry in classes if entry["gflop"]) / profiled
    gemm_ms = share * turn[ORT_ROW]
    return {"gemm_share": share, "gemm_ms": gemm_ms, "rest_ms": turn[ORT_ROW] - gemm_ms,
            "two_x_ms": turn[PYTORCH_ROW] / 2, "left_for_rest_ms": turn[PYTORCH_ROW] / 2 - gemm_ms}


def markdown(data: dict) -> str:
    ceilings, profile, turn = data["ceilings"], data["profile"], data["called_in_turn"]
    peak = ceilings["matmul_flops_per_s"] / 1e9
    ort_ms, torch_ms = turn["median_ms"][ORT_ROW], turn["median_ms"][PYTORCH_ROW]
    lines = [f"Command: `{data['command']}`", "",
             f"Model: {data['model']}. Point: {data['point']}. Machine: {bench.machine_name(data)}.", "",
             f"Called in turn ({turn['rounds']} rounds): {PYTORCH_ROW} {torch_ms:.1f} ms, ONNX Runtime "
             f"{ort_ms:.1f} ms; PyTorch / ONNX Runtime {turn['ratio_median']:.2f}x "
             f"({turn['ratio_min']:.2f}-{turn['ratio_max']:.2f}). Half of PyTorch's time (2x): {torch_ms / 2:.1f} ms.",
             f"Floor: {data['floor_ms']:.1f} ms (end_to_end.floors_ms, rates measured in this run: "
             f"{ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul {peak:.0f} GFLOP/s).", "",
             f"ONNX Runtime's profile, per call (median profiled call {profile['profiled_call_ms']:.1f} ms; "
             "the profiler adds its own time):", "",
             "| class | ms | share | GFLOP | GFLOP/s | of the matmul rate | nodes | what |", "|---|---|---|---|---|---|---|---|"]
    total = sum(entry["ms"] for entry in profile["classes"].values())
    for name, entry in profile["classes"].items():
        if entry["nodes"] == 0 and entry["ms"] == 0:
            continue
        rate = entry["gflop"] / (entry["ms"] / 1e3) if entry["gflop"] else None
        lines.append(f"| {name} | {entry['ms']:.1f} | {100 * entry['ms'] / total:.0f}% | "
                     + (f"{entry['gflop']:.1f} | {rate:.0f} | {100 * rate / peak:.0f}%" if rate else "- | - | -")
                     + f" | {entry['nodes']:.0f} | {CLASS_NOTES[name]} |")
    budget = gemm_budget(data)
    lines += ["", f"GEMMs: {100 * budget['gemm_share']:.0f}% of the profiled call, so at least "
              f"{budget['gemm_ms']:.1f} ms of the {ort_ms:.1f} ms call timed in turn (the profiler's cost is per node "
              f"and weighs more on the small ones). At 2x PyTorch's speed a call has {budget['two_x_ms']:.1f} ms: "
              + (f"the GEMMs alone, at the rates above, take {-budget['left_for_rest_ms']:.1f} ms more."
                 if budget["left_for_rest_ms"] < 0 else
                 f"the GEMMs, at the rates above, leave at most {budget['left_for_rest_ms']:.1f} ms for everything "
                 f"else ({budget['rest_ms']:.1f} ms now, by the same share)."), ""]
    curve = data["expert_gemm_curve"]
    lines += [f"One expert's gate and up projections, [2, {data['intermediate']}, {data['hidden']}] weights times "
              "c tokens, in two forms called in turn (ms per expert over 64 experts, median of the rounds):", ""]
    lines += [f"- {form}: {note}." for form, note in EXPERT_FORMS.items()]
    lines += ["", "| c | " + " | ".join(str(p["tokens"]) for p in curve) + " |", "|---|" + "---|" * len(curve)]
    for form in EXPERT_FORMS:
        lines += [f"| {form} ms | " + " | ".join(f"{p[form]['ms']:.2f}" for p in curve) + " |",
                  f"| {form} GFLOP/s | " + " | ".join(f"{p[form]['gflop_per_s']:.0f}" for p in curve) + " |"]
    lines += ["", "![breakdown](breakdown.png)", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    start = 0.0
    colors = plt.get_cmap("tab10").colors
    for index, (name, entry) in enumerate(data["profile"]["classes"].items()):
        if entry["ms"] <= 0:
            continue
        left.barh([0], [entry["ms"]], left=start, color=colors[index], label=f"{name} ({entry['ms']:.0f} ms)")
        start += entry["ms"]
    torch_ms = data["called_in_turn"]["median_ms"][PYTORCH_ROW]
    ort_ms = data["called_in_turn"]["median_ms"][ORT_ROW]
    for x, label, style in ((data["floor_ms"], "floor", ":"), (torch_ms / 2, "half of PyTorch's time (2x)", "--"),
                            (ort_ms, "ONNX Runtime without the profiler", "-.")):
        left.axvline(x, color="black", linestyle=style)
        left.text(x, 0.4, f" {label}: {x:.0f} ms", rotation=90, va="top", fontsize=8, backgroundcolor="white")
    left.set_yticks([])
    left.set_xlabel("ms per prefill call (ONNX Runtime's profile)")
    left.set_title(f"ONNX Runtime, {data['point']}")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, ncol=2)
    curve = data["expert_gemm_curve"]
    for form in EXPERT_FORMS:
        right.plot([p["tokens"] for p in curve], [p[form]["gflop_per_s"] for p in curve], marker="o",
                   label=f"one expert's gate + up, {form}")
    right.axhline(data["ceilings"]["matmul_flops_per_s"] / 1e9, color="black", linestyle=":",
                  label="2048^3 fp32 matmul, this run")
    right.set_xlabel("tokens per expert c")
    right.set_ylabel("GFLOP/s")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    right.set_title("expert GEMM rate vs tokens per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(end_to_end.SIZES), default="olmoe-2-layers")
    parser.add_argument("--plain", action="store_true", help="the plain model instead of CE")
    parser.add_argument("--build", type=Path, help="an existing fp32 build folder (no checkpoint is written)")
    parser.add_argument("--logits", choices=("all", "last"), default="last")
    parser.add_argument("--tokens", type=int, default=256, help="prefill length (batch 1)")
    parser.add_argument("--runs", type=int, default=5, help="profiled calls")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the PyTorch / ONNX Runtime timing")
    parser.add_argument("--curve-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 17, 20, 24, 32, 33, 48, 64])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ort-breakdown")
    args = parser.parse_args(argv)
    command = "python benchmarks/ort_time_breakdown.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    point = bench.Point("prefill", 1, args.tokens)
    ceilings = bench.measure_ceilings("cpu", torch.float32)
    print(f"== cpu: memory {ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul "
          f"{ceilings['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (measured)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        build = args.build
        if build is None:
            checkpoint = end_to_end.write_checkpoint(Path(scratch) / "checkpoint", args.size, not args.plain)
            build = Path(scratch) / "build"
            pipeline.build(str(checkpoint), build, pipeline.BuildOptions(target="ort", verify=False, logits=args.logits),
                           report=print)
        manifest = read_manifest(build)
        if manifest.dtype != "fp32" or manifest.target not in ("ort", "portable"):
            parser.error(f"{build}: an fp32 build of --target ort or portable is needed "
                         f"(this one: {manifest.dtype}, --target {manifest.target})")
        config = json.loads((manifest.source.checkpoint(build) / "config.json").read_text())
        compressed = bool(config.get("use_ce") and config.get("n_ce"))
        print(f"== {point.label}: PyTorch and ONNX Runtime called in turn", flush=True)
        turn = bench.interleaved(build, (PYTORCH_ROW, ORT_ROW), point, rounds=args.rounds)
        print(f"== {point.label}: ONNX Runtime's profile, {args.runs} calls", flush=True)
        profile = profile_ort(build, point, args.runs)
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    print(f"== one expert's gate and up GEMM, c in {args.curve_tokens}", flush=True)
    curve = expert_gemm_curve(hidden, intermediate, args.curve_tokens)
    data = {"command": command, "machine": bench.machine_facts(torch.device("cpu")), "device": "cpu",
            "versions": bench.runtime_versions(), "ceilings": ceilings, "point": point.label,
            "model": (f"{args.size if args.build is None else args.build.name}, {'CE' if compressed else 'plain'}, "
                      f"--target {manifest.target}, logits {manifest.onnx.logits}"),
            "hidden": hidden, "intermediate": intermediate,
            "floor_ms": end_to_end.floors_ms(config, compressed, 1, args.tokens, "prefill", ceilings,
                                             logits=manifest.onnx.logits),
            "called_in_turn": turn, "profile": profile, "expert_gemm_curve": curve}
    data["gemm_budget"] = gemm_budget(data)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "breakdown.json", data)
    write_text(args.out / "breakdown.md", markdown(data))
    plot(data, args.out / "breakdown.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
