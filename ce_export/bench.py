"""Stage 6, bench: end-to-end latency of a build folder, every runtime side by side, with parity.

Rows (each on the same inputs, each with its parity vs the fp32 reference):
    transformers eager          stock transformers model, eager experts loop (plain OLMoE only:
                                transformers cannot run compressed experts)
    transformers grouped_mm     stock transformers, its grouped-GEMM experts implementation
    transformers batched_mm     stock transformers, its batched-GEMM experts implementation (gathers
                                each token's experts' weights: for small batches)
    PyTorch (ce_export op)      the captured model with transformers' DynamicCache; MoE blocks
                                through torch.ops.ce_export.moe (our Triton kernels on CUDA)
    ce_export fast path         runtime.FastDecoder: the same model with a static slot cache and,
                                on CUDA, decode replayed from a CUDA graph
    ONNX Runtime <provider>     the exported ONNX file through IO binding; a session that did not get
                                the provider it is labelled with fails instead of being timed
On CUDA the rows run in ops.strict_kernels() mode (a row whose MoE op would fall back to the
reference math fails instead of timing it), after one op call per MoE layer configuration and
token count has compiled the Triton kernels (`warm_up_kernels`). transformers' batched_mm row runs
on CPU only: it gathers every token's experts' weights, which at OLMoE shapes needs more than a
GPU's memory for a 2048-token prompt.
Points: prefill of S tokens (past 0) and one decode step at context C, per batch size. A decode
step is timed by feeding the same past of length C repeatedly, so every repetition sees context C.
The rows are timed one after another, one runtime resident at a time. On the CPU, `in_turn_rounds`
then times the captured PyTorch model and ONNX Runtime called in turn (called_in_turn, calls under
TURN_S as bursts), both resident: the ratio a drifting machine cannot bias.

Parity: the relative error max|row - reference| / max|reference| of the logits at the last input
position (they depend on every earlier token), against the captured model in fp32 with the MoE
blocks through moe_math.py. The reference runs first, one point at a time, and is freed before
any row is timed, so the rows' peak-memory figures are their own.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ce_export import ops
from ce_export.artifacts import atomic_file, environment_errors, write_json, write_text
from ce_export.capture import build_torch_model
from ce_export.dtypes import DTYPES
from ce_export.load import load_checkpoint, parameter_count
from ce_export.manifest import read_manifest
from ce_export.runners import OrtRunner, PreparedStep, TorchRunner
from ce_export.spec import ModelSpec, MoeLayerSpec
from ce_export.verify import compare

BENCH_JSON, BENCH_MD, BENCH_PNG = "bench.json", "bench.md", "bench.png"


@dataclass(frozen=True)
class Point:
    phase: str  # "prefill" or "decode"
    batch: int
    tokens: int  # prefill: sequence length; decode: context (past) length

    @property
    def label(self) -> str:
        return f"{self.phase} b{self.batch} {'S' if self.phase == 'prefill' else 'C'}={self.tokens}"

    @property
    def new_tokens(self) -> int:
        return self.batch * (self.tokens if self.phase == "prefill" else 1)


CPU_POINTS = tuple(Point("prefill", b, s) for b in (1, 4) for s in (128, 512)) + \
    tuple(Point("decode", b, c) for b in (1, 4) for c in (128, 512))


def gpu_points(batches=(1, 8)) -> tuple[Point, ...]:
    return tuple(Point("prefill", b, s) for b in batches for s in (128, 512, 2048)) + \
        tuple(Point("decode", b, c) for b in batches for c in (512, 2048))


GPU_POINTS = gpu_points()  # batch 32 too (gpu_points((1, 8, 32))) takes a GPU check past its time


def point_inputs(point: Point, spec, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The inputs of one point, the same for every row: drawn from a seed per point, on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed + 7919 * point.batch + point.tokens + (point.phase == "decode"))
    seq, past = (point.tokens, 0) if point.phase == "prefill" else (1, point.tokens)
    ids = torch.randint(0, spec.vocab_size, (point.batch, seq), generator=gen, device=device)
    mask = torch.ones(point.batch, past + seq, dtype=torch.int64, device=device)
    positions = torch.arange(past, past + seq, device=device).expand(point.batch, -1).contiguous()
    past_kv = tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for shape in spec.past_shapes(point.batch, past))
    return ids, mask, positions, past_kv


class FastPathRunner:
    """runtime.FastDecoder, one per batch size (its static cache is sized for the batch), behind the
    runners' `prepare`: a point without past is a prefill, one with past a decode step at its context."""

    def __init__(self, lm: torch.nn.Module, spec, max_context: int, compile_decode: bool = False):
        self.lm, self.spec, self.max_context, self.compile_decode = lm, spec, max_context, compile_decode
        self.decoder = None

    def prepare(self, input_ids, attention_mask, position_ids, past) -> PreparedStep:
        from ce_export.runtime import FastDecoder

        batch = input_ids.shape[0]
        if self.decoder is None or self.decoder.batch != batch:
            self.decoder = None
            gc.collect()
            self.decoder = FastDecoder(self.lm, self.spec, batch, self.max_context, compile_decode=self.compile_decode)
        decoder = self.decoder
        ids = input_ids.to(decoder.device)
        out = {}
        if past[0].shape[2] == 0:
            def run():
                out.pop("logits", None)
                out["logits"] = decoder.prefill(ids)
        else:
            decoder.load_past(tuple(t.to(decoder.device, decoder.dtype) for t in past))

            def run():
                out["logits"] = decoder.decode(ids, advance=False)
        return PreparedStep(run, lambda: out["logits"][:, -1].float().cpu())


PYTORCH_ROW = "PyTorch (ce_export op)"


@dataclass
class Row:
    name: str
    make: Callable[[], object]  # -> a runner with prepare(input_ids, attention_mask, position_ids, past)


def transformers_rows(checkpoint: Path, dtype: torch.dtype, device: torch.device, logits: str = "all") -> list[Row]:
    from transformers import AutoModelForCausalLM

    implementations = ("eager", "grouped_mm") if device.type == "cuda" else ("eager", "grouped_mm", "batched_mm")

    def make(experts: str):
        def build():
            return TorchRunner(AutoModelForCausalLM.from_pretrained(
                checkpoint, attn_implementation="sdpa", experts_implementation=experts, dtype=dtype,
                trust_remote_code=False, use_safetensors=True).to(device).eval(), logits)
        return build

    return [Row(f"transformers {experts}", make(experts)) for experts in implementations]


def stock_transformers_can_run(loaded) -> bool:
    spec = loaded.spec
    return (not spec.use_ce and spec.architecture == "olmoe"
            and all(isinstance(layer, MoeLayerSpec) for layer in spec.moe_layers))


@dataclass(frozen=True)
class OnnxFile:
    """The exported file a bench times with ONNX Runtime, and what its manifest says about it."""

    path: Path
    dtype: str
    target: str
    quantized: bool = False
    logits: str = "all"  # every position, or the last one (capture.LOGITS)

    @classmethod
    def of_build(cls, folder: Path, manifest) -> "OnnxFile":
        return cls(folder / manifest.onnx.file, manifest.dtype, manifest.target, manifest.quantized,
                   manifest.onnx.logits)


def rows_for(checkpoint: Path, onnx: OnnxFile | None, loaded, device: torch.device, dtype: torch.dtype,
             max_context: int, skipped: dict, compile_decode: bool = False, no_onnx_reason: str = "") -> list[Row]:
    rows = []
    logits = onnx.logits if onnx else "all"  # the PyTorch rows do the same work as the ONNX file
    if stock_transformers_can_run(loaded):
        rows += transformers_rows(checkpoint, dtype, device, logits)
    else:
        skipped["transformers"] = ("transformers' own classes cannot run this model "
                                   "(compressed experts, trimmed layers or not OLMoE)")
    rows.append(Row(PYTORCH_ROW, lambda: TorchRunner(build_torch_model(loaded, dtype).to(device), logits)))
    rows.append(Row("ce_export fast path", lambda: FastPathRunner(build_torch_model(loaded, dtype).to(device),
                                                                  loaded.spec, max_context)))
    if compile_decode:
        rows.append(Row("ce_export fast path + compile", lambda: FastPathRunner(
            build_torch_model(loaded, dtype).to(device), loaded.spec, max_context, compile_decode=True)))
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if onnx is None:
        skipped["ONNX Runtime"] = no_onnx_reason or "no ONNX export to run"
    elif onnx.dtype == "bf16" and device.type == "cpu":
        skipped["ONNX Runtime"] = "ONNX Runtime has no bf16 kernels on CPU"
    elif provider in ort.get_available_providers():
        label = f"ONNX Runtime {'CUDA' if device.type == 'cuda' else 'CPU'} ({onnx.dtype})"
        rows.append(Row(label, lambda: OrtRunner(onnx.path, device, exact_dequantize=onnx.quantized)))
    else:
        skipped["ONNX Runtime"] = f"{provider} not available (install onnxruntime-gpu)"
    if device.type == "cuda":
        skipped["TensorRT"] = tensorrt_absence()
    return rows


def tensorrt_absence() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "no TensorRT runtime in this environment (run `ce_export bench --trtexec` where TensorRT exists)"
    return "a TensorRT runtime is present but this harness has no TensorRT row yet: use `ce_export bench --trtexec`"


# Before each call timed in turn: a runtime's threads spin for a while after a call (ONNX Runtime's
# intra-op pool, OpenMP's), and a call started at once shares the cores with them (measured: up to
# 1.6x slower, ratios biased by 20%; 0.1 s was enough).
TURN_PAUSE_S = 0.2


# A call far shorter than the pause runs cold after it (its thread pool asleep, its caches taken by
# the other runtime): measured on the demo model, ONNX Runtime's decode steps of about 1 ms took about
# twice as long after a pause, and the rounds' ratios spread several-fold. `turn_s` makes such a
# call's turn a burst.
TURN_S = 0.05
MAX_BURST = 50


def called_in_turn(calls: dict[str, Callable[[], object]], rounds: int, pause_s: float = TURN_PAUSE_S,
                   turn_s: float | None = None) -> dict:
    """Two calls, both warmed up, then called in turn `rounds` times, each turn after `pause_s`: each
    one's median ms and the median, min and max of the rounds' ratios (first / second). On a machine
    whose speed drifts between minutes, calls timed one after another can drift apart; calls in turn
    cannot. With `turn_s`, a call whose warm-up took less than `turn_s` runs as a burst in each turn:
    one untimed call, then as many timed calls as fill `turn_s` (at most MAX_BURST), the turn's time
    their median (`calls_per_turn` says how many); other calls run once per turn."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    burst: dict[str, int] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()  # warm-up
        once = time.perf_counter() - start
        burst[name] = 1 if turn_s is None or once >= turn_s else min(MAX_BURST, math.ceil(turn_s / max(once, 1e-6)))
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(pause_s)
            if burst[name] > 1:
                call()
            samples = []
            for _ in range(burst[name]):
                start = time.perf_counter()
                call()
                samples.append(1e3 * (time.perf_counter() - start))
            times[name].append(statistics.median(samples))
    first, second = times.values()
    ratios = [a / b for a, b in zip(first, second)]
    return {"median_ms": {name: statistics.median(values) for name, values in times.items()}, "rounds": rounds,
            "calls_per_turn": burst, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def interleaved(folder: str | Path, runtimes: tuple[str, str], point: Point, rounds: int = 7,
                report: Callable[[str], None] = print) -> dict:
    """Two of `bench`'s CPU rows of build folder `folder` on `point`, both resident and timed by
    called_in_turn."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    checkpoint = manifest.source.checkpoint(folder)
    loaded = load_checkpoint(checkpoint)
    skipped: dict[str, str] = {}
    max_context = point.tokens + (point.phase == "decode")
    rows = rows_for(checkpoint, OnnxFile.of_build(folder, manifest), loaded, torch.device("cpu"), torch.float32,
                    max_context, skipped)
    names = [row.name for row in rows]
    missing = [name for name in runtimes if name not in names]
    if missing:
        raise ValueError(f"no row {missing[0]!r} for {folder} (rows: {', '.join(names)}; not run: {skipped})")
    return in_turn(rows, runtimes, (point,), loaded.spec, torch.float32, rounds, report)[0]


def in_turn(rows: list[Row], runtimes: tuple[str, str], points, spec: ModelSpec, dtype: torch.dtype, rounds: int,
            report: Callable[[str], None], turn_s: float | None = None) -> list[dict]:
    """Rows `runtimes` (two of `rows`, on the CPU) both resident, timed by called_in_turn on each point."""
    by_name = {row.name: row for row in rows}
    runners = {name: by_name[name].make() for name in runtimes}
    results = []
    for point in points:
        steps = {name: runner.prepare(*point_inputs(point, spec, dtype, torch.device("cpu")))
                 for name, runner in runners.items()}
        result = {"point": asdict(point), "label": point.label, "runtimes": list(runtimes),
                  **called_in_turn({name: step.run for name, step in steps.items()}, rounds, turn_s=turn_s)}
        report(f"  {point.label}: {' / '.join(runtimes)}, called in turn: {result['ratio_median']:.2f}x "
               f"({rounds} rounds, {result['ratio_min']:.2f}-{result['ratio_max']:.2f})")
        results.append(result)
    return results


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def time_ms(fn: Callable[[], object], device: torch.device, min_reps: int = 5, budget_s: float = 1.0,
            warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "repetitions": len(times)}


def reference_logits(loaded, points, device: torch.device, input_dtype: torch.dtype, report) -> dict:
    from ce_export.runtime import set_attention

    lm = build_torch_model(loaded, torch.float32).to(device)
    set_attention(lm, "sdpa")  # eager attention would hold [B, heads, S, S] fp32 scores per layer
    runner = TorchRunner(lm)
    expected = {}
    with ops.reference_math():
        for point in points:
            step = runner.prepare(*point_inputs(point, loaded.spec, input_dtype, device))
            step.run()
            expected[point] = step.logits()
    report(f"  reference: {len(points)} points, fp32, MoE through moe_math.py")
    del lm, runner
    free_memory(device)
    return expected


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up_kernels(spec: ModelSpec, token_counts, dtype: torch.dtype, device: torch.device,
                    report: Callable[[str], None] = print) -> None:
    """Compile, before anything is timed, the Triton kernels the op launches for each MoE layer
    configuration and each token count (Triton specialises on the shapes' divisibility, so the
    exact counts): one op call on random weights each. Nothing to do off CUDA."""
    if device.type != "cuda":
        return
    started = time.perf_counter()
    counts = sorted(set(token_counts))
    moe_layers = [layer for layer in spec.moe_layers if isinstance(layer, MoeLayerSpec)]
    layers = list(dict.fromkeys(kernel_configuration(layer) for layer in moe_layers))
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, logits_fp32=False):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t if logits_fp32 else t.to(dtype)

    for layer in layers:
        experts, hidden, inter = layer.num_experts, layer.hidden_size, layer.intermediate_size
        gate_up, down = rand(experts, 2 * inter, hidden, scale=hidden ** -0.5), rand(experts, hidden, inter)
        ces = rand(experts, 3, layer.ces_width) + 1 if layer.n_ce else None
        score_bias = rand(experts, logits_fp32=True) if layer.score_bias else None
        biases = (rand(experts, 2 * inter), rand(experts, hidden)) if layer.expert_bias else (None, None)
        for tokens in counts:
            torch.ops.ce_export.moe(rand(tokens, hidden), rand(tokens, experts, logits_fp32=layer.router_fp32),
                                    gate_up, down, ces, layer.top_k, layer.n_ce, layer.norm_topk_prob,
                                    layer.routing, layer.routing_scale, layer.jitter_eps, score_bias, layer.n_group,
                                    layer.topk_group, *biases, layer.activation, layer.swiglu_alpha,
                                    layer.swiglu_limit, layer.weights_on_input)
        del gate_up, down, ces, score_bias, biases
    torch.cuda.synchronize(device)
    report(f"  Triton kernels compiled for {len(layers)} MoE layer configuration(s) x T in {counts}: "
           f"{time.perf_counter() - started:.1f} s")


def kernel_configuration(layer: MoeLayerSpec) -> MoeLayerSpec:
    """The layer spec with the fields that do not reach the MoE op blanked: equal for layers that
    launch the same kernels."""
    return replace(layer, layer=0, expert_ids=(), module="")


def bench(folder: str | Path, points=CPU_POINTS, budget_s: float = 1.0, device: str = "cpu",
          dtype: str | None = None, compile_decode: bool = False, in_turn_rounds: int = 0,
          report: Callable[[str], None] = print) -> dict:
    """Time every row of build folder `folder` on `points`; `dtype` is the PyTorch rows' (default fp32 on
    CPU, bf16 on CUDA); `compile_decode` adds a fast-path row whose decode step goes through torch.compile;
    `in_turn_rounds` > 0 also times the captured PyTorch model and ONNX Runtime called in turn (CPU)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    onnx = OnnxFile.of_build(folder, manifest)
    data = bench_checkpoint(manifest.source.checkpoint(folder), points, budget_s, device, dtype, compile_decode,
                            report, onnx=onnx, in_turn_rounds=in_turn_rounds)
    data["build"] = str(folder.absolute())
    data["tools"] = manifest.tools | data["tools"]
    return data


def bench_checkpoint(checkpoint: str | Path, points=CPU_POINTS, budget_s: float = 1.0, device: str = "cpu",
                     dtype: str | None = None, compile_decode: bool = False,
                     report: Callable[[str], None] = print, onnx: OnnxFile | None = None,
                     no_onnx_reason: str = "", in_turn_rounds: int = 0) -> dict:
    """Time every PyTorch row of a checkpoint folder, and the ONNX Runtime row when `onnx` is given
    (else it is listed as not run, with `no_onnx_reason`). The rows are timed one after another, one
    runtime resident at a time; with `in_turn_rounds` > 0 on the CPU, the captured PyTorch model and
    ONNX Runtime are then also timed called in turn, both resident (in_turn_pair)."""
    checkpoint = Path(checkpoint)
    device = torch.device(device)
    dtype_name = dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch_dtype = DTYPES[dtype_name]
    loaded = load_checkpoint(checkpoint)
    max_context = max(p.tokens + (p.phase == "decode") for p in points)
    expected = reference_logits(loaded, points, device, torch_dtype, report)
    skipped: dict[str, str] = {}
    results = []
    strict = ops.strict_kernels() if device.type == "cuda" else contextlib.nullcontext()
    with strict:
        try:
            warm_up_kernels(loaded.spec, [p.new_tokens for p in points], torch_dtype, device, report)
        except Exception as error:  # the op's rows then fail one by one with the same error; the others run
            report(f"  Triton kernel warm-up failed: {type(error).__name__}: {error}")
        rows = rows_for(checkpoint, onnx, loaded, device, torch_dtype, max_context, skipped, compile_decode,
                        no_onnx_reason)
        for row in rows:
            try:
                runner = row.make()
            except Exception as error:  # one row failing must not lose the others' measurements
                skipped[row.name] = f"could not start: {type(error).__name__}: {error}"
                report(f"  {row.name}: {skipped[row.name]}")
                continue
            for point in points:
                try:
                    results.append(measure(row.name, runner, point, loaded.spec, torch_dtype, device,
                                           expected[point], budget_s, report))
                except Exception as error:
                    results.append({"point": asdict(point), "label": point.label, "runtime": row.name,
                                    "error": f"{type(error).__name__}: {error}"})
                    report(f"  {point.label:<22} {row.name:<30} FAILED: {type(error).__name__}: {error}")
            del runner
            free_memory(device)
    called = []
    if in_turn_rounds > 0:
        pair = in_turn_pair(rows, device, loaded, skipped)
        if pair:
            report(f"== called in turn: {' / '.join(pair)}, both resident, {in_turn_rounds} rounds")
            try:
                called = in_turn(rows, pair, points, loaded.spec, torch_dtype, in_turn_rounds, report, turn_s=TURN_S)
            except Exception as error:  # the rows' measurements above stand without it
                skipped[IN_TURN] = f"failed: {type(error).__name__}: {error}"
    for name, why in skipped.items():
        report(f"  not run: {name}: {why}")
    return {"build": str(checkpoint.absolute()), "model": loaded.spec.architecture,
            "compressed": loaded.spec.use_ce, "target": onnx.target if onnx else None,
            "dtype": onnx.dtype if onnx else None, "logits": onnx.logits if onnx else "all",
            "torch_dtype": dtype_name, "device": str(device),
            "machine": machine_facts(device), "tools": runtime_versions(), "parity": "max relative error of the "
            "last position's logits vs the fp32 reference (captured model, MoE through moe_math.py)",
            "skipped": skipped, "results": results, "called_in_turn": called}


IN_TURN = "called in turn"


def in_turn_pair(rows: list[Row], device: torch.device, loaded, skipped: dict) -> tuple[str, str] | None:
    """The captured PyTorch model's row and the ONNX Runtime row, if both ran and fit in memory
    together; else None, with the reason in `skipped`."""
    names = [row.name for row in rows if row.name not in skipped]
    onnx_rows = [name for name in names if name.startswith("ONNX Runtime")]
    if device.type != "cpu":
        skipped[IN_TURN] = "on the CPU only"
    elif not onnx_rows or PYTORCH_ROW not in names:
        skipped[IN_TURN] = f"needs the rows {PYTORCH_ROW!r} and ONNX Runtime"
    else:
        total, _ = parameter_count(loaded)
        needed, available = 2 * 4 * total, available_memory_bytes()  # two fp32 copies of the weights
        if available is not None and needed > available:
            skipped[IN_TURN] = (f"both runtimes resident need about {needed / 2**30:.1f} GiB, "
                                f"{available / 2**30:.1f} GiB available")
        else:
            return PYTORCH_ROW, onnx_rows[0]
    return None


def measure(name: str, runner, point: Point, spec, input_dtype, device, expected, budget_s, report) -> dict:
    step = runner.prepare(*point_inputs(point, spec, input_dtype, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = time.perf_counter()
    step.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - first
    parity = compare(expected, step.logits())
    # A call slower than the whole budget (transformers' batched_mm prefill on CPU takes seconds)
    # gets the fewest repetitions that still give a median: the first call above was its warm-up.
    slow = first > budget_s
    timing = time_ms(step.run, device, min_reps=3 if slow else 5, budget_s=budget_s, warmup=0 if slow else 2)
    row = {"point": asdict(point), "label": point.label, "runtime": name, **timing,
           "tokens_per_s": point.new_tokens / (timing["median_ms"] / 1e3), "parity_max_rel": parity["max_rel"],
           "parity_mean_rel": parity["mean_rel"]}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        row["peak_torch_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["device_used_mib"] = (total - free) / 2**20
    report(f"  {point.label:<22} {name:<30} {timing['median_ms']:9.3f} ms   parity max rel {parity['max_rel']:.1e}")
    return row


def runtime_versions() -> dict:
    versions = {"torch_threads": torch.get_num_threads(), "torch_runtime": torch.__version__}
    try:
        import onnxruntime as ort

        versions["onnxruntime_runtime"] = ort.__version__
        versions["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import triton

        versions["triton_runtime"] = triton.__version__
    except ImportError:
        pass
    import transformers

    versions["transformers_runtime"] = transformers.__version__
    return versions


def machine_facts(device: torch.device | None = None) -> dict:
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
        facts["cuda"] = torch.version.cuda
    return facts


def device_slug(device: torch.device | str | None = None) -> str:
    """A short name of the machine that times `device` (default: the first GPU if any, else the CPU)
    for result folders and files: the GPU model ("h200", "h100", "a100") or "cpu-<cores>core"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        model = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", name)
        return (model.group(1) if model else re.sub(r"\W+", "-", name).strip("-")).lower()
    return f"cpu-{os.cpu_count()}core"


def measure_ceilings(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, budget_s: float = 0.5) -> dict:
    """The device's memory bandwidth (a large copy: bytes read + written per second; a large sum:
    bytes read per second; `bandwidth_bytes_per_s` the faster) and matmul rate in `dtype`, measured
    now: the rates a floor divides by. GPU: 1 GiB copy, 8192^3 matmul;
    CPU: 256 MiB (8x a server L3) copy, 2048^3 matmul (on a 2-core EPYC 1024^3 ran at 130-150
    GFLOP/s, below what ONNX Runtime's MLAS reaches on a layer's projections, about 170)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    elements = (1 << 30 if on_gpu else 1 << 28) // torch.finfo(dtype).bits * 8
    src = torch.randn(elements, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device, budget_s=budget_s)
    read = time_ms(lambda: src.sum(), device, budget_s=budget_s)
    n = 8192 if on_gpu else 2048
    a, b = (torch.randn(n, n, device=device, dtype=torch.float32).to(dtype) for _ in range(2))
    matmul = time_ms(lambda: a @ b, device, budget_s=budget_s)
    copy_rate = 2 * src.numel() * src.element_size() / (copy["median_ms"] / 1e3)
    read_rate = src.numel() * src.element_size() / (read["median_ms"] / 1e3)
    # Weight streaming only reads; on a CPU a read-only stream outruns a copy's read + write rate,
    # so a floor divides by the faster of the two to stay a lower bound.
    ceilings = {"copy_bytes_per_s": copy_rate, "read_bytes_per_s": read_rate,
                "bandwidth_bytes_per_s": max(copy_rate, read_rate),
                "matmul_flops_per_s": 2 * n ** 3 / (matmul["median_ms"] / 1e3),
                "dtype": str(dtype).removeprefix("torch."), "device": device_slug(device),
                "source": f"measured in this run: {src.numel() * src.element_size() >> 20} MiB copy, "
                          f"{n}^3 matmul, median of repetitions"}
    del src, dst, a, b
    free_memory(device)
    return ceilings


def machine_name(data: dict) -> str:
    machine = data["machine"]
    if data.get("device", "cpu").startswith("cuda"):
        return machine.get("gpu", "GPU")
    return f"{machine.get('cpu_model', machine['processor'])} ({machine['cpu_count']} cores)"


def markdown_table(data: dict) -> str:
    timed = [r for r in data["results"] if "median_ms" in r]
    runtimes = list(dict.fromkeys(r["runtime"] for r in data["results"]))
    labels = list(dict.fromkeys(r["label"] for r in data["results"]))
    cell = {(r["label"], r["runtime"]): r for r in data["results"]}
    onnx = f"target {data['target']}, ONNX {data['dtype']}" if data.get("target") else "no ONNX export"
    lines = [f"Model: {data['model']} ({'CE' if data['compressed'] else 'plain MoE'}), {onnx}, "
             f"PyTorch rows {data.get('torch_dtype', 'fp32')}; machine: {machine_name(data)}. "
             f"Median ms (parity: max relative error of the last position's logits vs the fp32 reference).",
             "", "| point | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]
    for label in labels:
        cells = []
        for runtime in runtimes:
            row = cell.get((label, runtime))
            if row is None:
                cells.append("-")
            elif "error" in row:
                cells.append("failed")
            else:
                cells.append(f"{row['median_ms']:.3f} ({row['parity_max_rel']:.0e})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any("peak_torch_allocated_mib" in r for r in timed):
        lines += ["", "Peak GPU memory allocated by PyTorch (MiB) / device memory in use after the point (MiB):", "",
                  "| point | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]
        for label in labels:
            cells = [f"{cell[label, rt]['peak_torch_allocated_mib']:.0f} / {cell[label, rt]['device_used_mib']:.0f}"
                     if "peak_torch_allocated_mib" in cell.get((label, rt), {}) else "-" for rt in runtimes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    called = data.get("called_in_turn") or []
    if called:
        first, second = called[0]["runtimes"]
        lines += ["", f"Called in turn: {first} and {second} both resident, each turn after a {TURN_PAUSE_S} s pause "
                  f"(the rows above are timed one after another, which a machine whose speed drifts can bias), "
                  f"{called[0]['rounds']} rounds; a call shorter than {1e3 * TURN_S:.0f} ms runs as a burst in its turn "
                  f"(one untimed call, then up to {MAX_BURST} timed, their median). Median ms, the median (min-max) of "
                  f"the rounds' ratios, and the calls timed per turn:", "",
                  f"| point | {first} | {second} | {first} / {second} | calls per turn |", "|---|---|---|---|---|"]
        for entry in called:
            ms = entry["median_ms"]
            per_turn = entry.get("calls_per_turn", {})
            lines.append(f"| {entry['label']} | {ms[first]:.3f} | {ms[second]:.3f} | {entry['ratio_median']:.2f}x "
                         f"({entry['ratio_min']:.2f}-{entry['ratio_max']:.2f}) | "
                         f"{per_turn.get(first, 1)} / {per_turn.get(second, 1)} |")
    for name, why in data.get("skipped", {}).items():
        lines.append(f"\nNot run: {name}: {why}")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in data["results"] if "median_ms" in r]
    runtimes = list(dict.fromkeys(r["runtime"] for r in timed))
    labels = list(dict.fromkeys(r["label"] for r in timed))
    cell = {(r["label"], r["runtime"]): r["median_ms"] for r in timed}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(labels)), 4.5))
    width = 0.8 / max(1, len(runtimes))
    for i, runtime in enumerate(runtimes):
        xs = [x + i * width for x, label in enumerate(labels) if (label, runtime) in cell]
        ax.bar(xs, [cell[label, runtime] for label in labels if (label, runtime) in cell], width, label=runtime)
    ax.set_xticks([x + width * (len(runtimes) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median latency (ms, log scale)")
    ax.set_title(f"{data['model']} {'CE' if data['compressed'] else 'plain'} on {machine_name(data)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as partial:
        fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)


def write_results(data: dict, out_dir: Path) -> list[Path]:
    with environment_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / BENCH_JSON, data)
    write_text(out_dir / BENCH_MD, markdown_table(data))
    plot(data, out_dir / BENCH_PNG)
    return [out_dir / BENCH_JSON, out_dir / BENCH_MD, out_dir / BENCH_PNG]
