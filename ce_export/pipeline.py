"""The `build` and `verify` jobs: load -> capture -> export -> verify, with manifest.json as the contract.

manifest.json records everything a later stage needs (model facts, the per-layer MoE description,
file names, opset, dtypes, I/O names and dynamic axes, tool versions); parity.json records the
verification. `verify DIR` reruns the checks from those files alone.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ce_export import export as export_stage
from ce_export import verify as verify_stage
from ce_export.artifacts import MANIFEST, PARITY, PARITY_PLOT, checkpoint_of, read_json, staged_folder, write_json
from ce_export.capture import DTYPES, build_torch_model
from ce_export.demo import DEMO_NAME, DEMO_SEED, write_demo_checkpoint
from ce_export.errors import BuildError, ExportError, OutputError, VerifyError
from ce_export.load import load_checkpoint, parameter_count
from ce_export.onnx_precision import OnnxPrecisionView
from ce_export.quantize import QUANTIZATIONS, fake_quantize_model

MANIFEST_FORMAT = 1
CHECKPOINT_COPY = "checkpoint"
TOOLS = ("ce_export", "torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy", "safetensors")


@dataclass(frozen=True)
class BuildOptions:
    target: str = "portable"
    dtype: str = "fp32"
    max_batch: int = 64
    max_seq: int = 4096
    max_context: int = 4096
    force: bool = False
    verify: bool = True
    quantize: str | None = None  # weight-only quantization mode (see quantize.QUANTIZATIONS)
    plugin_library: str | None = None  # our TensorRT plugin (.so), for --target trt
    triton_repo: str | None = None  # also write a Triton Inference Server model repository here


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build(model: str, out: str | Path, options: BuildOptions, report: Callable[[str], None] = print) -> dict:
    """Build every artifact for `model` (a checkpoint folder or "demo") into `out`; returns the manifest."""
    if options.dtype not in DTYPES:
        raise ExportError(f"unknown dtype {options.dtype!r} (choose from {', '.join(DTYPES)})")
    if options.target not in export_stage.TARGETS:
        raise ExportError(f"unknown target {options.target!r} (choose from {', '.join(export_stage.TARGETS)})")
    if options.quantize is not None and options.quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {options.quantize!r} (choose from {', '.join(QUANTIZATIONS)})")
    if options.quantize is not None and options.dtype != "fp32":
        # fp16/bf16 scales make DequantizeLinear round differently from the PyTorch reference; until
        # that is matched and its thresholds measured, quantized builds are fp32 only.
        raise ExportError(f"--quantize {options.quantize} is supported with --dtype fp32 only for now")
    if options.plugin_library is not None:
        if options.target != "trt":
            raise BuildError("--plugin-lib applies to --target trt only")
        if not Path(options.plugin_library).is_file():
            raise BuildError(f"{options.plugin_library}: plugin library not found")
    out = Path(out)
    with staged_folder(out, force=options.force) as staging:
        timer = StageTimer(report)
        with timer("load"):
            if model == DEMO_NAME:
                checkpoint = staging / CHECKPOINT_COPY
                write_demo_checkpoint(checkpoint, compressed=True)
                source = {"kind": "demo", "seed": DEMO_SEED, "path": CHECKPOINT_COPY}
            else:
                checkpoint = Path(model)
                source = {"kind": "checkpoint", "path": str(checkpoint.absolute())}
            loaded = load_checkpoint(checkpoint)
            total, active = parameter_count(loaded)
        report(f"  {loaded.spec.architecture}, {loaded.spec.num_layers} layers, "
               f"{'CE n_ce=' + str(loaded.spec.n_ce) if loaded.spec.use_ce else 'plain MoE'}, "
               f"{total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)")
        with timer("capture"):
            lm = build_torch_model(loaded, DTYPES[options.dtype])
            if options.quantize:
                fake_quantize_model(lm, options.quantize)
        with timer(f"export ({options.target}, {options.dtype}{', ' + options.quantize if options.quantize else ''})"):
            result = export_stage.export_onnx(loaded, lm, staging, options.target, options.max_batch,
                                              options.max_seq, options.max_context, options.quantize)
        manifest = make_manifest(source, loaded, options, result)
        write_json(staging / MANIFEST, manifest)
        if options.verify:
            parity = run_parity(staging, manifest, loaded, timer)
            write_json(staging / PARITY, parity)
            verify_stage.plot_parity(parity, staging / PARITY_PLOT)
        if options.target == "trt":
            from ce_export.engine import build_engine, default_plugin_library
            from ce_export.trtexec import write_trtexec_script

            with timer("build: TensorRT engine"):
                library = options.plugin_library or default_plugin_library()
                manifest["engine"] = build_engine(staging, max_batch=options.max_batch, max_seq=options.max_seq,
                                                  max_context=options.max_context, plugin_library=library, report=report)
            write_json(staging / MANIFEST, manifest)
            write_trtexec_script(staging, engine=manifest["engine"])
    report(f"artifacts: {out.absolute()}")
    if options.triton_repo:
        from ce_export.triton_repo import write_triton_repo

        write_triton_repo(out, options.triton_repo, force=options.force, report=report)
    if options.verify:
        report(summarize(parity))
        if not parity["passed"]:
            raise VerifyError(f"{out / PARITY}: parity FAILED ({failure_reason(parity)}); artifacts kept for inspection")
    return manifest


def make_manifest(source: dict, loaded, options: BuildOptions, result: export_stage.ExportResult) -> dict:
    total, active = parameter_count(loaded)
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "model": loaded.spec.to_json(),
        "parameters": {"total": total, "active_per_token": active},
        "target": options.target,
        "dtype": options.dtype,
        "quantization": result.quantization,
        "onnx": {
            "file": result.onnx_path.name,
            "external_data": "model.onnx.data" if result.external_data else None,
            "opset": result.opset,
            "custom_domain": {"name": "ce_export", "version": 1},
            "inputs": result.input_names,
            "outputs": result.output_names,
            "dynamic_axes": result.dynamic_axes,
            "moe_nodes": result.moe_nodes,
            "limits": {"max_batch": options.max_batch, "max_sequence": options.max_seq, "max_context": options.max_context},
        },
        "tools": tool_versions(),
    }


def verify(folder: str | Path, report: Callable[[str], None] = print) -> dict:
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "manifest (is this a ce_export build folder?)")
    timer = StageTimer(report)
    with timer("load"):
        loaded = load_checkpoint(checkpoint_of(folder, manifest))
    parity = run_parity(folder, manifest, loaded, timer)
    try:
        write_json(folder / PARITY, parity)
        verify_stage.plot_parity(parity, folder / PARITY_PLOT)
    except OSError as error:
        raise OutputError(f"{folder / PARITY}: cannot write ({error.strerror or error})") from None
    report(summarize(parity))
    if not parity["passed"]:
        raise VerifyError(f"{folder / PARITY}: parity FAILED ({failure_reason(parity)})")
    return parity


def run_parity(folder: Path, manifest: dict, loaded, timer: "StageTimer") -> dict:
    dtype_name = manifest["dtype"]
    onnx_path = folder / manifest["onnx"]["file"]
    quantization = (manifest.get("quantization") or {}).get("mode")
    with timer("verify: ONNX Runtime session"):
        view = OnnxPrecisionView(onnx_path, dtype_name)
        runtime = verify_stage.OrtDecoder(view.path_for_runtime(), exact_dequantize=bool(quantization))
    unquantized = build_torch_model(loaded, torch.float32)
    reference = unquantized
    if quantization or view.emulated:
        reference = build_torch_model(loaded, torch.float32)
        if quantization:
            fake_quantize_model(reference, quantization)
        if view.emulated:
            view.round_weights_like_export(reference)
    at_dtype = reference
    if dtype_name != "fp32" and not view.emulated:
        at_dtype = build_torch_model(loaded, DTYPES[dtype_name])
        if quantization:
            fake_quantize_model(at_dtype, quantization)
    runtime_dtype = view.runtime_torch_dtype
    with timer("verify: logits on %d shapes" % len(verify_stage.PARITY_CASES)):
        tolerance = verify_stage.TOLERANCES[dtype_name]
        logits = verify_stage.check_logits(reference, runtime, loaded.spec, manifest["onnx"]["outputs"],
                                           runtime_dtype, tolerance)
    with timer(f"verify: greedy generation of {verify_stage.GENERATION_TOKENS} tokens"):
        generation = verify_stage.check_generation(at_dtype, runtime, loaded.spec, runtime_dtype, tolerance)
    with timer("verify: held-out perplexity, PyTorch fp32 vs the artifact"):
        quality = quality_cost(folder, manifest, loaded, unquantized, runtime, runtime_dtype)
    view.cleanup()
    return {
        "runtime": "onnxruntime CPUExecutionProvider",
        "reference": "PyTorch fp32, MoE blocks through ce_export.moe_math (the reference op)",
        "dtype": dtype_name,
        "quantization": quantization,
        "numerics": view.numerics_note + ("; int8 weights dequantized exactly (ORT's MatMulNBits fusion, which "
                                          "also quantizes activations, disabled)" if quantization else ""),
        "passed": logits["passed"] and generation["passed"],
        "logits": logits,
        "generation": generation,
        "quality": quality,
        "tools": tool_versions(),
    }


def quality_cost(folder: Path, manifest: dict, loaded, unquantized_fp32, runtime, runtime_dtype) -> dict:
    """Model size and the quality cost of the artifact: perplexity on the held-out slice of the
    built-in calibration corpus, unquantized PyTorch fp32 vs the exported file in ONNX Runtime."""
    from ce_calibrate import prepare

    data = prepare(checkpoint_of(folder, manifest), loaded.spec.vocab_size, seq_len=64, eval_fraction=0.25)
    sequences = data.evaluation[:8]
    torch_ppl = verify_stage.perplexity(verify_stage.TorchDecoder(unquantized_fp32), sequences, loaded.spec, torch.float32)
    onnx_ppl = verify_stage.perplexity(runtime, sequences, loaded.spec, runtime_dtype)
    files = [folder / manifest["onnx"]["file"]] + ([folder / manifest["onnx"]["external_data"]] if manifest["onnx"]["external_data"] else [])
    return {"evaluation": f"{len(sequences)} x {sequences.shape[1]} held-out tokens, {data.tokenizer}",
            "perplexity_torch_fp32": torch_ppl, "perplexity_onnx": onnx_ppl,
            "perplexity_delta": onnx_ppl - torch_ppl, "parameters": manifest["parameters"],
            "onnx_bytes": sum(f.stat().st_size for f in files)}


def failure_reason(parity: dict) -> str:
    reasons = []
    logits, generation = parity["logits"], parity["generation"]
    if not logits["passed"]:
        reasons.append(f"{logits['statistic']} {logits['worst']:.2e} > {logits['threshold']:.0e}")
    for index, row in enumerate(generation["rows"]):
        if not row["passed"]:
            reasons.append(f"generated tokens of row {index} differ from step {row['first_difference']} "
                           f"(PyTorch logit margin {row['near_tie_margin']:.2e} is no near-tie)")
    return "; ".join(reasons)


def summarize(parity: dict) -> str:
    logits, generation = parity["logits"], parity["generation"]
    verdict = "PASSED" if parity["passed"] else "FAILED"
    rows = generation["rows"]
    identical = sum(r["identical"] for r in rows)
    ties = sum(not r["identical"] and r["passed"] for r in rows)
    tokens = f"identical in {identical}/{len(rows)} rows" + (f", {ties} diverging at a near-tie" if ties else "")
    quality = parity.get("quality")
    ppl = (f"; held-out perplexity {quality['perplexity_onnx']:.3f} vs {quality['perplexity_torch_fp32']:.3f} "
           f"in PyTorch fp32" if quality else "")
    return (f"parity {verdict} ({parity['dtype']}{', ' + parity['quantization'] if parity.get('quantization') else ''}, "
            f"{parity['runtime']}): {logits['statistic']} "
            f"{logits['worst']:.2e} over {len(logits['cases'])} shapes (threshold {logits['threshold']:.0e}, "
            f"max relative error {logits['max_rel']:.2e}); greedy {generation['new_tokens']} tokens {tokens}{ppl}")


class StageTimer:
    """Prints each stage as it starts and its wall time when it ends."""

    def __init__(self, report: Callable[[str], None]):
        self.report = report

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                timer.report(f"[{name}] ...")
                self.start = time.perf_counter()

            def __exit__(self, exc_type, *rest):
                if exc_type is None:
                    timer.report(f"[{name}] done in {time.perf_counter() - self.start:.1f} s")

        return _Stage()
