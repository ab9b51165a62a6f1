"""One MoE layer at OLMoE-1B-7B shapes (H 2048, I 1024, E 64, K 8, CE n_ce 4), fp32, on the CPU:
ONNX Runtime running our portable function body (sparse form) for CE and for plain top-8, beside
ONNX Runtime's fused com.microsoft::MoE top-8, the fixed-shape body that the trt target carries,
the PyTorch reference op and transformers' OLMoE experts, in one run, against the floor from this
machine's fp32 matmul rate and memory bandwidth measured in the same run (bench.measure_ceilings).

    python benchmarks/moe_layer.py --device cpu [--tokens 1 8 64 256 2048] [--out DIR]

Also measures, at decode-sized token counts, the two ways to run few tokens: the sparse form's scan
over the experts (weights read in place) and gathering the selected experts' weights (what the
fixed-shape form does while T x slots <= E); the sparse form has no gathered branch because the
scan measured faster at every count here.

Method: random weights and inputs (never zeros), one intra-op thread per core, wall-clock median
over repetitions within a time budget (at least 3); every output compared with moe_math.py in
fp32 with the same routing (CE rows vs the CE reference, top-8 rows vs plain top-8). The rows are
timed one after another; the headline ratio, CE's sparse form against com.microsoft::MoE top-8, is
also measured interleaved (both sessions resident, called in turn), which a drifting machine
cannot bias.
Writes moe_layer_cpu.json, moe_layer_cpu.md, moe_layer_cpu.png.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "plugins")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moe_layer import LayerShape  # noqa: E402

DEFAULT_TOKENS = (1, 8, 64, 256, 2048)
DECODE_TOKENS = (1, 2, 4, 8, 16)  # T x 4 main slots <= 64 experts: the fixed-shape form gathers
BYTES_FP32 = 4


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    reference: str  # "ce" or "top8"
    experts_per_token: int


ROWS = [
    Row("ort_ce_sparse", "CE, ONNX Runtime, portable body (sparse form)", "ce", 4),
    Row("ort_ce_fixed", "CE, ONNX Runtime, fixed-shape body (trt target's; the portable body before)", "ce", 4),
    Row("torch_reference_ce", "CE, PyTorch, ce_export::moe reference op", "ce", 4),
    Row("ort_top8_ms", "top-8, ONNX Runtime com.microsoft::MoE", "top8", 8),
    Row("ort_top8_sparse", "top-8, ONNX Runtime, portable body (sparse form)", "top8", 8),
    Row("hf_eager_top8", "top-8, transformers OlmoeExperts eager", "top8", 8),
    Row("hf_grouped_mm_top8", "top-8, transformers OlmoeExperts grouped_mm", "top8", 8),
]


def threads() -> int:
    return os.cpu_count() or 1


def ort_session(model_proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    options.log_severity_level = 3
    return ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def layer_model(kind: str, weights: dict, shape: LayerShape):
    """The ONNX model of one layer for a row: our node and functions, or com.microsoft::MoE made by
    the exporter's own lowering (export.lower_plain_moe_to_ort)."""
    import onnx_ir as ir

    from ce_export import export, onnx_functions

    form = onnx_functions.FIXED_SHAPE if kind == "fixed" else onnx_functions.SPARSE
    routing = {"top_k": shape.top_k, "norm_topk_prob": 0, "routing_scale": 1.0}
    if kind in ("sparse_top8", "ms_top8"):
        model = onnx_functions.layer_model("MoE", routing, weights["gate_up"], weights["down"], form=form)
        if kind == "ms_top8":
            model_ir = ir.from_proto(model)
            export.lower_plain_moe_to_ort(model_ir)
            model = ir.to_proto(model_ir)
        return model
    return onnx_functions.layer_model("CompressedMoE", {**routing, "n_ce": shape.n_ce}, weights["gate_up"],
                                      weights["down"], weights["ces"], form=form)


def time_ms(fn: Callable[[], object], budget_s: float, min_reps: int = 3, max_reps: int = 50) -> dict:
    fn()  # warm-up: first-call allocations and prepacking
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    reps = int(max(min_reps, min(max_reps, budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "reps": reps}


def floor_ms(shape: LayerShape, tokens: int, experts_per_token: int, touched: int, ceilings: dict) -> dict:
    h, i = shape.hidden, shape.intermediate
    total_bytes = touched * 3 * h * i * BYTES_FP32 + tokens * (2 * h + shape.experts) * BYTES_FP32
    flops = 2 * tokens * experts_per_token * 3 * h * i
    bytes_ms = total_bytes / ceilings["bandwidth_bytes_per_s"] * 1e3
    flops_ms = flops / ceilings["matmul_flops_per_s"] * 1e3
    return {"bytes": total_bytes, "flops": flops, "bytes_ms": bytes_ms, "flops_ms": flops_ms,
            "floor_ms": max(bytes_ms, flops_ms), "touched_experts": touched}


def make_weights(shape: LayerShape, seed: int = 0) -> dict:
    gen = np.random.default_rng(seed)
    h, i, e = shape.hidden, shape.intermediate, shape.experts
    return {"gate_up": (gen.standard_normal((e, 2 * i, h), dtype=np.float32) * h ** -0.5),
            "down": (gen.standard_normal((e, h, i), dtype=np.float32) * i ** -0.5),
            "ces": (1.0 + 0.3 * gen.standard_normal((e, 3, h), dtype=np.float32))}


def references(weights: dict, hidden: torch.Tensor, logits: torch.Tensor, shape: LayerShape) -> dict:
    from ce_export.moe_math import moe_reference

    gate_up, down = torch.from_numpy(weights["gate_up"]), torch.from_numpy(weights["down"])
    return {"ce": moe_reference(hidden, logits, gate_up, down, torch.from_numpy(weights["ces"]), shape.top_k,
                                shape.n_ce, False),
            "top8": moe_reference(hidden, logits, gate_up, down, None, shape.top_k, 0, False)}


def relative_error(actual, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(actual).float()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def hf_experts(shape: LayerShape, implementation: str, weights: dict):
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    config = OlmoeConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_experts=shape.experts, num_experts_per_tok=shape.top_k, hidden_act="silu")
    config._experts_implementation = implementation
    with torch.device("meta"):
        experts = OlmoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(torch.from_numpy(weights["gate_up"]), requires_grad=False)
    experts.down_proj = torch.nn.Parameter(torch.from_numpy(weights["down"]), requires_grad=False)
    return experts


def run_rows(shape: LayerShape, tokens: list[int], budget_s: float, weights: dict, ceilings: dict,
             report: Callable[[str], None]) -> dict:
    from ce_export.moe_math import moe_reference, route_softmax_topk

    gen = torch.Generator().manual_seed(1)
    inputs = {t: (torch.randn(t, shape.hidden, generator=gen), torch.randn(t, shape.experts, generator=gen))
              for t in tokens}
    rows = {row.key: {"label": row.label, "reference": row.reference, "by_tokens": {}} for row in ROWS}
    floors = {"ce": {}, "top8": {}}
    refs = {}
    for t, (hidden, logits) in inputs.items():
        refs[t] = references(weights, hidden, logits, shape)
        _, experts = route_softmax_topk(logits, shape.top_k, False)
        floors["ce"][t] = floor_ms(shape, t, shape.km, experts[:, :shape.km].unique().numel(), ceilings)
        floors["top8"][t] = floor_ms(shape, t, shape.top_k, experts.unique().numel(), ceilings)

    def record(row: Row, t: int, fn: Callable[[], object]):
        cell = rows[row.key]["by_tokens"]
        try:
            timing = time_ms(fn, budget_s)
            timing["rel_err"] = relative_error(fn(), refs[t][row.reference])
            cell[t] = timing
            report(f"  T={t:>5} {row.key:<20} {timing['median_ms']:10.2f} ms  (err {timing['rel_err']:.1e}, "
                   f"{timing['reps']} reps)")
        except Exception as error:  # recorded, and the run goes on
            cell[t] = {"error": f"{type(error).__name__}: {error}"[:300]}
            report(f"  T={t:>5} {row.key:<20} failed: {cell[t]['error']}")

    ort_rows = {"ort_ce_sparse": "sparse_ce", "ort_ce_fixed": "fixed", "ort_top8_ms": "ms_top8",
                "ort_top8_sparse": "sparse_top8"}
    for row in ROWS:
        report(f"{row.label}")
        if row.key in ort_rows:
            start = time.perf_counter()
            session = ort_session(layer_model(ort_rows[row.key], weights, shape))
            report(f"  session created in {time.perf_counter() - start:.1f} s")
            for t, (hidden, logits) in inputs.items():
                feeds = {"hidden": hidden.numpy(), "router_logits": logits.numpy()}
                record(row, t, lambda: session.run(None, feeds)[0])
            del session
        elif row.key == "torch_reference_ce":
            gate_up, down = torch.from_numpy(weights["gate_up"]), torch.from_numpy(weights["down"])
            ces = torch.from_numpy(weights["ces"])
            for t, (hidden, logits) in inputs.items():
                record(row, t, lambda: moe_reference(hidden, logits, gate_up, down, ces, shape.top_k, shape.n_ce, False))
        else:
            experts = hf_experts(shape, "eager" if row.key == "hf_eager_top8" else "grouped_mm", weights)
            for t, (hidden, logits) in inputs.items():
                routing_weights, ids = route_softmax_topk(logits, shape.top_k, False)
                with torch.no_grad():
                    record(row, t, lambda: experts(hidden, ids, routing_weights))
        gc.collect()
    return {"rows": rows, "floors": floors}


def run_head_to_head(shape: LayerShape, tokens: list[int], budget_s: float, weights: dict,
                     report: Callable[[str], None]) -> dict:
    """CE's sparse form against com.microsoft::MoE top-8 with both sessions resident, timed by
    bench.called_in_turn, so that a slow spell of a shared machine (its timings drift between
    minutes) falls on both: per T, each implementation's median and the median of the rounds' ratios."""
    from ce_export.bench import called_in_turn

    gen = torch.Generator().manual_seed(1)  # run_rows's inputs
    inputs = {t: (torch.randn(t, shape.hidden, generator=gen), torch.randn(t, shape.experts, generator=gen))
              for t in tokens}
    sessions = {"ce_sparse": ort_session(layer_model("sparse_ce", weights, shape)),
                "ms_top8": ort_session(layer_model("ms_top8", weights, shape))}
    result = {}
    for t, (hidden, logits) in inputs.items():
        feeds = {"hidden": hidden.numpy(), "router_logits": logits.numpy()}
        calls = {name: (lambda session=session: session.run(None, feeds)) for name, session in sessions.items()}
        once = 0.0
        for call in calls.values():
            call()  # warm-up
            start = time.perf_counter()
            call()
            once += time.perf_counter() - start
        timed = called_in_turn(calls, rounds=int(max(5, min(50, 2 * budget_s / once))))
        result[t] = {**{f"{name}_median_ms": ms for name, ms in timed.pop("median_ms").items()}, **timed}
        report(f"  interleaved T={t:>5}: CE sparse / com.microsoft::MoE {timed['ratio_median']:.2f}x "
               f"(rounds {timed['rounds']}, {timed['ratio_min']:.2f}-{timed['ratio_max']:.2f})")
    del sessions
    gc.collect()
    return result


def run_decode_forms(shape: LayerShape, budget_s: float, weights: dict, report: Callable[[str], None]) -> dict:
    """CE at decode-sized T: the sparse form's scan vs gathering the selected experts' weights."""
    gen = torch.Generator().manual_seed(2)
    tokens = [t for t in DECODE_TOKENS if t * shape.km <= shape.experts]
    inputs = [(torch.randn(t, shape.hidden, generator=gen), torch.randn(t, shape.experts, generator=gen)) for t in tokens]
    result = {"tokens": tokens, "scanned": {}, "gathered": {}}
    for name, kind in (("scanned", "sparse_ce"), ("gathered", "fixed")):
        session = ort_session(layer_model(kind, weights, shape))
        for t, (hidden, logits) in zip(tokens, inputs):
            feeds = {"hidden": hidden.numpy(), "router_logits": logits.numpy()}
            result[name][t] = time_ms(lambda: session.run(None, feeds), budget_s)
            report(f"  decode forms: {name:<9} T={t:>2} {result[name][t]['median_ms']:8.2f} ms")
        del session
        gc.collect()
    result["gathered_faster_at_tokens"] = [t for t in tokens if result["gathered"][t]["median_ms"] <
                                           result["scanned"][t]["median_ms"]]
    return result


def environment(argv: list[str]) -> dict:
    import onnxruntime
    import transformers

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": f"{cpu}, {threads()} cores, {platform.machine()}", "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "threads": threads(), "command": " ".join(["python benchmarks/moe_layer.py", *argv])}


def markdown(results: dict, tokens: list[int]) -> str:
    from ce_export.bench import TURN_PAUSE_S

    lines = ["| implementation | " + " | ".join(f"T={t}" for t in tokens) + " |", "|" + "---|" * (len(tokens) + 1)]
    for row in ROWS:
        cells = []
        for t in tokens:
            cell = results["rows"][row.key]["by_tokens"].get(t, {})
            cells.append(f"{cell['median_ms']:.2f} ({cell['rel_err']:.0e})" if "median_ms" in cell else "failed")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    for name, label in (("ce", "floor, CE (4 main experts)"), ("top8", "floor, top-8")):
        lines.append(f"| {label} | " + " | ".join(f"{results['floors'][name][t]['floor_ms']:.2f}" for t in tokens) + " |")
    ce, ms = results["rows"]["ort_ce_sparse"]["by_tokens"], results["rows"]["ort_top8_ms"]["by_tokens"]
    ratios = [f"{ce[t]['median_ms'] / ms[t]['median_ms']:.2f}x" if "median_ms" in ce.get(t, {}) and "median_ms" in
              ms.get(t, {}) else "-" for t in tokens]
    lines.append("| CE sparse / com.microsoft::MoE top-8, from the rows above | " + " | ".join(ratios) + " |")
    interleaved = results.get("head_to_head", {})
    lines.append("| **CE sparse / com.microsoft::MoE top-8, interleaved** | " + " | ".join(
        f"{interleaved[t]['ratio_median']:.2f}x" if t in interleaved else "-" for t in tokens) + " |")
    c = results["ceilings"]
    lines += ["", f"Milliseconds per layer call, median (max relative error vs moe_math.py with the same routing). "
              f"Floor = max(bytes of the touched experts / {c['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, FLOPs / "
              f"{c['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s), both {c['source']}. Interleaved: the two sessions "
              f"resident and called in turn, each call after a {TURN_PAUSE_S} s pause, the median of the rounds' "
              f"ratios (the rows above are timed one after another, and this machine's speed drifts between "
              f"minutes).", ""]
    decode = results.get("decode_forms")
    if decode:
        lines += ["Few tokens, CE (ms): the sparse form's scan over the experts vs gathering the selected experts' "
                  "weights (the fixed-shape form at T x 4 <= 64)", "", "| T | scan (sparse form) | gather |",
                  "|---|---|---|"]
        lines += [f"| {t} | {decode['scanned'][t]['median_ms']:.2f} | {decode['gathered'][t]['median_ms']:.2f} |"
                  for t in decode["tokens"]]
        lines += ["", f"The gather was faster at T = {decode['gathered_faster_at_tokens'] or 'none of these'}."]
    env = results["environment"]
    lines += ["", f"Machine: {env['machine']}; onnxruntime {env['onnxruntime']}, torch {env['torch']}, "
              f"transformers {env['transformers']}. Command: `{env['command']}`."]
    return "\n".join(lines) + "\n"


def plot(results: dict, tokens: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for row in ROWS:
        cells = results["rows"][row.key]["by_tokens"]
        points = [(t, cells[t]["median_ms"]) for t in tokens if "median_ms" in cells.get(t, {})]
        if points:
            ax.plot(*zip(*points), "-o" if row.reference == "ce" else "--s", label=row.label, markersize=4)
    for name, label in (("ce", "floor, CE (4 main)"), ("top8", "floor, top-8")):
        ax.plot(tokens, [results["floors"][name][t]["floor_ms"] for t in tokens], ":k" if name == "ce" else ":",
                label=label, linewidth=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("ms per MoE layer (median)")
    ax.set_title(f"One MoE layer, OLMoE-1B-7B shapes, fp32, CPU ({results['environment']['threads']} threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cpu(tokens: list[int], budget_s: float, out_dir: Path, argv: list[str],
            shape: LayerShape = LayerShape()) -> dict:
    def report(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    torch.set_num_threads(threads())
    from ce_export.bench import measure_ceilings

    small = shape.hidden < LayerShape().hidden  # a code-path check: quick, approximate ceilings
    ceilings = measure_ceilings("cpu", torch.float32, budget_s=0.1 if small else 1.0)
    report(f"measured: fp32 matmul {ceilings['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, "
           f"memory {ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (the faster of a copy's read + written "
           f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} and a sum's read {ceilings['read_bytes_per_s'] / 1e9:.1f})")
    weights = make_weights(shape)
    results = run_rows(shape, tokens, budget_s, weights, ceilings, report)
    results["head_to_head"] = run_head_to_head(shape, tokens, budget_s, weights, report)
    results["decode_forms"] = run_decode_forms(shape, budget_s, weights, report)
    results.update(ceilings=ceilings, environment=environment(argv), shape=asdict(shape), dtype="fp32",
                   tokens=tokens, elapsed_s=time.perf_counter() - started)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "moe_layer_cpu.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "moe_layer_cpu.md").write_text(markdown(results, tokens))
    plot(results, tokens, out_dir / "moe_layer_cpu.png")
    report(markdown(results, tokens))
    report(f"wrote {out_dir}/moe_layer_cpu.{{json,md,png}} in {results['elapsed_s']:.0f} s")
    return results
