"""One MoE layer at OLMoE-1B-7B shapes (H 2048, I 1024, E 64, K 8, n_ce 4, bf16): every
implementation side by side in one run, against the physical floor measured in the same run.

    python benchmarks/moe_layer.py [--out benchmarks/results] [--tokens 1 8 64 512 4096]
    python benchmarks/moe_layer.py --dry-run     # no GPU needed: floors from assumed H100 anchors
    python benchmarks/moe_layer.py --device cpu  # fp32 on the CPU, ONNX Runtime rows (moe_layer_cpu.py)

Method: random (never zero) inputs; router logits in fp32, because in bf16 they tie often and
tie order is implementation-defined, which would make "same routing" untrue. CUDA-event timing,
median over many repetitions with L2 flushed before each. Every output is compared with an fp32
reference that uses the same routing (CE rows: top-8 with 4 compressed; top-8 rows: plain top-8;
top-4 rows: plain top-4). Floor = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both
measured here; bytes = weights of the experts the routing actually touched + activations (+ the
touched ces rows), FLOPs = 2 * T * experts per token * 3 * H * I. Writes moe_layer.json,
moe_layer.md and moe_layer.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "plugins")]  # runs from a plain checkout too

import torch  # noqa: E402

ASSUMED_H100 = {"copy_bytes_per_s": 3.0e12, "bf16_flops_per_s": 790e12,
                "source": "assumed: H100 anchors from shared/notes/environment.md, not measured"}
DEFAULT_TOKENS = (1, 8, 64, 512, 4096)
BYTES_BF16 = 2


@dataclass(frozen=True)
class LayerShape:
    hidden: int = 2048
    intermediate: int = 1024
    experts: int = 64
    top_k: int = 8
    n_ce: int = 4

    @property
    def km(self) -> int:
        return self.top_k - self.n_ce


@dataclass(frozen=True)
class Implementation:
    key: str
    label: str
    reference: str  # which fp32 reference it is compared with: "ce", "top8" or "top4"
    experts_per_token: int


IMPLEMENTATIONS = [
    Implementation("released_loop", "CE, released-style loop over experts (host syncs)", "ce", 4),
    Implementation("reference", "CE, moe_math.moe_reference", "ce", 4),
    Implementation("custom_op", "CE, ce_export::moe custom op as dispatched on CUDA", "ce", 4),
    Implementation("kernels_eager", "CE, ce_kernels.fused_moe, eager", "ce", 4),
    Implementation("kernels_graph", "CE, ce_kernels.fused_moe, CUDA graph", "ce", 4),
    Implementation("hf_eager_top8", "top-8, transformers OlmoeExperts eager", "top8", 8),
    Implementation("hf_grouped_mm_top8", "top-8, transformers OlmoeExperts grouped_mm", "top8", 8),
    Implementation("grouped_mm_top8_eager", "top-8, torch._grouped_mm, eager", "top8", 8),
    Implementation("grouped_mm_top8_graph", "top-8, torch._grouped_mm, CUDA graph", "top8", 8),
    Implementation("grouped_mm_top4_eager", "top-4, torch._grouped_mm, eager", "top4", 4),
    Implementation("grouped_mm_top4_graph", "top-4, torch._grouped_mm, CUDA graph", "top4", 4),
]


# ---------------------------------------------------------------- floors

def expected_distinct_experts(tokens: int, per_token: int, experts: int) -> float:
    """Experts touched by T tokens each picking per_token of E uniformly at random."""
    return experts * (1.0 - (1.0 - per_token / experts) ** tokens)


def floor_ms(shape: LayerShape, tokens: int, experts_per_token: int, active_experts: float,
             active_ces_experts: float, ceilings: dict) -> dict:
    h, i = shape.hidden, shape.intermediate
    weight_bytes = active_experts * 3 * h * i * BYTES_BF16
    ces_bytes = active_ces_experts * 3 * h * BYTES_BF16
    activation_bytes = tokens * (2 * h * BYTES_BF16 + shape.experts * 4)  # hidden in, out; fp32 logits
    total_bytes = weight_bytes + ces_bytes + activation_bytes
    flops = 2 * tokens * experts_per_token * 3 * h * i
    bytes_ms = total_bytes / ceilings["copy_bytes_per_s"] * 1e3
    flops_ms = flops / ceilings["bf16_flops_per_s"] * 1e3
    return {"bytes": total_bytes, "flops": flops, "bytes_ms": bytes_ms, "flops_ms": flops_ms,
            "floor_ms": max(bytes_ms, flops_ms), "active_experts": active_experts}


def dry_run(shape: LayerShape, tokens: list[int]) -> int:
    print(f"MoE layer {asdict(shape)}, bf16; floors with {ASSUMED_H100['source']}:")
    print(f"  copy {ASSUMED_H100['copy_bytes_per_s'] / 1e12:.1f} TB/s, "
          f"bf16 matmul {ASSUMED_H100['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    columns = ("experts", "MB", "GFLOP", "bytes ms", "FLOPs ms", "floor ms")
    print(f"{'T':>6} {'routing':>8} " + " ".join(f"{c:>9}" for c in columns))
    for t in tokens:
        for name, per_token in (("CE km=4", shape.km), ("top-8", shape.top_k)):
            active = expected_distinct_experts(t, per_token, shape.experts)
            aux = expected_distinct_experts(t, shape.n_ce, shape.experts) if name.startswith("CE") else 0.0
            f = floor_ms(shape, t, per_token, active, aux, ASSUMED_H100)
            print(f"{t:>6} {name:>8} {active:>8.1f} {f['bytes'] / 1e6:>9.1f} {f['flops'] / 1e9:>9.2f} "
                  f"{f['bytes_ms']:>9.4f} {f['flops_ms']:>9.4f} {f['floor_ms']:>9.4f}")
    print("(expected distinct experts under uniform routing; the GPU run counts the real ones)")
    print("Planned comparisons, each timed at every T and checked against an fp32 reference:")
    for impl in IMPLEMENTATIONS:
        print(f"  {impl.key:<24} {impl.label}  [vs fp32 {impl.reference}]")
    print("  floor                    max(bytes / measured copy rate, FLOPs / measured bf16 matmul rate)")
    return 0


# ---------------------------------------------------------------- implementations (GPU)

def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, experts = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
    return weights, experts


def released_style_ce(hidden, router_logits, gate_up, down, ces, top_k, n_ce):
    """CE in the style of the released code: theta per token, then a python loop over every
    expert with a host sync each (`if not tokens.numel()`)."""
    hidden_size, inter = hidden.shape[1], down.shape[2]
    weights, experts = route(router_logits, top_k)
    km = top_k - n_ce
    aux = weights[:, km:] / weights[:, km:].sum(dim=-1, keepdim=True)
    theta = torch.einsum("tj,tjrc->trc", aux, ces.float()[experts[:, km:]]).to(hidden.dtype)
    out = torch.zeros_like(hidden)
    for expert in range(gate_up.shape[0]):
        tokens, slots = torch.where(experts[:, :km] == expert)
        if not tokens.numel():
            continue
        x, th = hidden[tokens], theta[tokens]
        gate = torch.nn.functional.linear(x * th[:, 0, :hidden_size], gate_up[expert, :inter])
        up = torch.nn.functional.linear(x * th[:, 2, :hidden_size], gate_up[expert, inter:])
        act = torch.nn.functional.silu(gate) * up * th[:, 1, :inter]
        y = torch.nn.functional.linear(act, down[expert]) * weights[tokens, slots, None].to(hidden.dtype)
        out.index_add_(0, tokens, y)
    return out


def grouped_mm_moe(hidden, router_logits, gate_up_t, down_t, top_k):
    """Plain top-k MoE on torch's grouped GEMM, no host sync: sort the (token, slot) pairs by
    expert, gather, two grouped GEMMs over per-expert offsets, weight, unsort and sum."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    num_tokens, num_experts = router_logits.shape
    inter = down_t.shape[1]
    weights, experts = route(router_logits, top_k)
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=hidden.device)
    counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    x = hidden[order // top_k]                                         # [T*K, H] grouped by expert
    gate_up_out = grouped_mm(x, gate_up_t, offs=offsets)               # [T*K, 2I]
    act = torch.nn.functional.silu(gate_up_out[:, :inter]) * gate_up_out[:, inter:]
    y = grouped_mm(act, down_t, offs=offsets).float() * weights.reshape(-1)[order, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.reshape(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def hf_experts(shape: LayerShape, implementation: str, gate_up, down):
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    config = OlmoeConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_experts=shape.experts, num_experts_per_tok=shape.top_k, hidden_act="silu")
    config._experts_implementation = implementation
    with torch.device("meta"):
        experts = OlmoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return experts


def capture_graph(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def build_callable(key: str, ctx: dict, inputs: dict) -> tuple[Callable[[], object], Callable[[], torch.Tensor]]:
    """(the timed callable, a function returning its output after it ran)."""
    shape: LayerShape = ctx["shape"]
    h, logits = inputs["hidden"], inputs["router_logits"]
    gate_up, down, ces = ctx["gate_up"], ctx["down"], ctx["ces"]
    k, n_ce = shape.top_k, shape.n_ce
    last = {}

    def keep(fn):
        def run():
            last["out"] = fn()
        return run, lambda: last["out"]

    if key == "released_loop":
        return keep(lambda: released_style_ce(h, logits, gate_up, down, ces, k, n_ce))
    if key == "reference":
        from ce_export.moe_math import moe_reference
        return keep(lambda: moe_reference(h, logits, gate_up, down, ces, k, n_ce, False))
    if key == "custom_op":
        from ce_export import ops

        def op():
            with ops.strict_kernels():  # a fallback to the reference fails the row instead of being timed
                return ops.moe(h, logits, gate_up, down, ces, k, n_ce, False)
        return keep(op)
    if key.startswith("kernels_"):
        from ce_kernels import fused_moe

        def call():
            return fused_moe(h, logits, gate_up, down, ces, k, n_ce, False)
        if key == "kernels_eager":
            return keep(call)
        replay, out = capture_graph(call)
        return replay, lambda: out
    if key.startswith("hf_"):
        experts = ctx["hf_eager"] if key == "hf_eager_top8" else ctx["hf_grouped_mm"]

        def hf():
            weights, ids = route(logits, k)
            return experts(h, ids, weights.to(h.dtype))
        return keep(hf)
    if key.startswith("grouped_mm_"):
        top = shape.top_k if "top8" in key else shape.km

        def grouped():
            return grouped_mm_moe(h, logits, ctx["gate_up_t"], ctx["down_t"], top)
        if key.endswith("eager"):
            return keep(grouped)
        replay, out = capture_graph(grouped)
        return replay, lambda: out
    raise KeyError(key)


# ---------------------------------------------------------------- measurement (GPU)

def time_ms(fn: Callable[[], object], flush: torch.Tensor, budget_s: float, max_reps: int = 200) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    reps = int(max(5, min(max_reps, budget_s / max(once, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        flush.zero_()  # evict the previous repetition's weights from L2
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [begin.elapsed_time(end) for begin, end in events]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def measure_ceilings(flush: torch.Tensor) -> dict:
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), flush, 1.0)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul = time_ms(lambda: a @ b, flush, 1.0)
    return {"copy_bytes_per_s": 2 * src.numel() * BYTES_BF16 / (copy["median_ms"] / 1e3),
            "bf16_flops_per_s": 2 * n ** 3 / (matmul["median_ms"] / 1e3),
            "source": "measured in this run (1 GiB device copy, read + write; 8192^3 bf16 matmul)"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def make_layer(shape: LayerShape, gen: torch.Generator) -> dict:
    h, i, e = shape.hidden, shape.intermediate, shape.experts

    def rand(*size, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*size, generator=gen, device="cuda")).to(torch.bfloat16)

    gate_up, down = rand(e, 2 * i, h, scale=h ** -0.5), rand(e, h, i, scale=i ** -0.5)
    ctx = {"shape": shape, "gate_up": gate_up, "down": down, "ces": rand(e, 3, h, scale=0.3, offset=1.0),
           "gate_up_t": gate_up.transpose(1, 2), "down_t": down.transpose(1, 2)}
    ctx["fp32"] = {name: ctx[name].float() for name in ("gate_up", "down", "ces")}
    return ctx


def references(ctx: dict, inputs: dict) -> dict[str, torch.Tensor]:
    from ce_export.moe_math import moe_reference

    shape, f = ctx["shape"], ctx["fp32"]
    args = (inputs["hidden"].float(), inputs["router_logits"].float(), f["gate_up"], f["down"])
    return {"ce": moe_reference(*args, f["ces"], shape.top_k, shape.n_ce, False),
            "top8": moe_reference(*args, None, shape.top_k, 0, False),
            "top4": moe_reference(*args, None, shape.km, 0, False)}


def run_gpu(shape: LayerShape, tokens: list[int], budget_s: float) -> dict:
    started = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    ceilings = measure_ceilings(flush)
    print(f"measured: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    ctx = make_layer(shape, gen)
    for name, implementation in (("hf_eager", "eager"), ("hf_grouped_mm", "grouped_mm")):
        try:
            ctx[name] = hf_experts(shape, implementation, ctx["gate_up"], ctx["down"])
        except Exception as exc:  # recorded per row below; the rest of the run goes on
            ctx[name] = None
            print(f"transformers OlmoeExperts ({implementation}) unavailable: {exc!r}")

    results = {"rows": {impl.key: {"label": impl.label, "by_tokens": {}} for impl in IMPLEMENTATIONS},
               "floors": {"ce": {}, "top8": {}, "top4": {}}}
    for t in tokens:
        inputs = {"hidden": torch.randn(t, shape.hidden, generator=gen, device="cuda").to(torch.bfloat16),
                  "router_logits": torch.randn(t, shape.experts, generator=gen, device="cuda")}
        refs = references(ctx, inputs)
        _, experts = route(inputs["router_logits"], shape.top_k)
        touched = {"ce": experts[:, :shape.km].unique().numel(), "top8": experts.unique().numel(),
                   "top4": experts[:, :shape.km].unique().numel()}
        aux_touched = experts[:, shape.km:].unique().numel()
        results["floors"]["ce"][t] = floor_ms(shape, t, shape.km, touched["ce"], aux_touched, ceilings)
        results["floors"]["top8"][t] = floor_ms(shape, t, shape.top_k, touched["top8"], 0, ceilings)
        results["floors"]["top4"][t] = floor_ms(shape, t, shape.km, touched["top4"], 0, ceilings)
        for impl in IMPLEMENTATIONS:
            cell = results["rows"][impl.key]["by_tokens"]
            try:
                if impl.key.startswith("hf_") and ctx["hf_eager" if "eager" in impl.key else "hf_grouped_mm"] is None:
                    raise RuntimeError("transformers OlmoeExperts could not be built")
                fn, output = build_callable(impl.key, ctx, inputs)
                timing = time_ms(fn, flush, budget_s)
                fn()
                torch.cuda.synchronize()
                timing["rel_err"] = relative_error(output(), refs[impl.reference])
                cell[t] = timing
            except Exception as exc:
                cell[t] = {"error": repr(exc)[:300]}
            shown = cell[t].get("median_ms")
            print(f"T={t:>5} {impl.key:<24} " + (f"{shown:9.4f} ms  err {cell[t]['rel_err']:.2e}"
                                                    if shown is not None else cell[t]["error"]), flush=True)
        torch.cuda.empty_cache()
    results["ceilings"] = ceilings
    results["elapsed_s"] = time.perf_counter() - started
    return results


# ---------------------------------------------------------------- reporting

def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    for module in ("triton", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def markdown_table(results: dict, tokens: list[int]) -> str:
    header = "| implementation | " + " | ".join(f"T={t}" for t in tokens) + " |"
    lines = [header, "|" + "---|" * (len(tokens) + 1)]
    for impl in IMPLEMENTATIONS:
        cells = []
        for t in tokens:
            cell = results["rows"][impl.key]["by_tokens"].get(t, {})
            cells.append(f"{cell['median_ms']:.4f} ms ({cell['rel_err']:.1e})" if "median_ms" in cell else "n/a")
        lines.append(f"| {impl.label} | " + " | ".join(cells) + " |")
    for name, label in (("ce", "floor, CE (4 main experts)"), ("top8", "floor, top-8"), ("top4", "floor, top-4")):
        floors = [f"{results['floors'][name][t]['floor_ms']:.4f} ms" for t in tokens]
        lines.append(f"| {label} | " + " | ".join(floors) + " |")
    c = results["ceilings"]
    lines.append("")
    lines.append(f"Milliseconds, median (relative error vs fp32 reference with the same routing). Floors from "
                 f"copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s and bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} "
                 f"TFLOP/s measured in the same run. n/a: see the error in moe_layer.json.")
    return "\n".join(lines) + "\n"


def plot(results: dict, tokens: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for impl in IMPLEMENTATIONS:
        cells = results["rows"][impl.key]["by_tokens"]
        points = [(t, cells[t]["median_ms"]) for t in tokens if "median_ms" in cells.get(t, {})]
        if points:
            style = "-o" if impl.reference == "ce" else "--s"
            ax.plot(*zip(*points), style, label=impl.label, markersize=4)
    for name, label in (("ce", "floor, CE (4 main)"), ("top8", "floor, top-8")):
        ax.plot(tokens, [results["floors"][name][t]["floor_ms"] for t in tokens], ":k" if name == "ce" else ":",
                label=label, linewidth=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("ms per MoE layer (median)")
    ax.set_title(f"One MoE layer, OLMoE-1B-7B shapes, bf16, {environment()['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, shape: LayerShape, tokens: list[int], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"shape": asdict(shape), "dtype": "bf16", "tokens": tokens, "environment": environment(), **results}
    (out_dir / "moe_layer.json").write_text(json.dumps(payload, indent=1, default=str))
    info = payload["environment"]
    (out_dir / "moe_layer.md").write_text(f"One MoE layer on {info['device']}: `{info['command']}`\n\n"
                                          + markdown_table(results, tokens))
    plot(results, tokens, out_dir / "moe_layer.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", help=f"default: {' '.join(map(str, DEFAULT_TOKENS))} "
                        "(cpu: 1 8 64 256 2048)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/<device>, e.g. .../h200 or .../cpu-2core")
    parser.add_argument("--budget-s", type=float, default=0.4, help="seconds of repetitions per measurement")
    parser.add_argument("--dry-run", action="store_true", help="print floors (assumed H100 anchors) and the plan")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: fp32 with ONNX Runtime rows, see moe_layer_cpu.py")
    parser.add_argument("--small", action="store_true", help="a tiny layer (checks the benchmark's code path)")
    args = parser.parse_args(argv)
    shape = LayerShape(hidden=64, intermediate=32, experts=8, top_k=4, n_ce=2) if args.small else LayerShape()
    if args.device == "cpu" and not args.dry_run:
        from moe_layer_cpu import DEFAULT_TOKENS as CPU_TOKENS, run_cpu

        from ce_export.bench import device_slug

        out = args.out or REPO_ROOT / "benchmarks" / "results" / f"moe-layer-{device_slug('cpu')}"
        run_cpu(args.tokens or list(CPU_TOKENS), args.budget_s, out, sys.argv[1:] if argv is None else argv,
                shape=shape)
        return 0
    args.tokens = args.tokens or list(DEFAULT_TOKENS)
    if args.dry_run:
        return dry_run(shape, args.tokens)
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run, or on a GPU machine", file=sys.stderr)
        return 2
    if args.out is None:
        from ce_export.bench import device_slug

        args.out = REPO_ROOT / "benchmarks" / "results" / device_slug("cuda")
    results = run_gpu(shape, args.tokens, args.budget_s)
    write_outputs(results, shape, args.tokens, args.out)
    print(markdown_table(results, args.tokens))
    print(f"wrote {args.out}/moe_layer.{{json,md,png}} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
