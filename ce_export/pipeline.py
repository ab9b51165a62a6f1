"""The `build` and `verify` jobs: load -> capture -> export -> verify, with manifest.json as the contract.

manifest.json records everything a later stage needs (model facts, the per-layer MoE description,
file names, opset, dtypes, I/O names and dynamic axes, tool versions); parity.json records the
verification. `verify DIR` reruns the checks from those files alone.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ce_export import clients
from ce_export import export as export_stage
from ce_export import polygraphy_reference
from ce_export import quantize as quantize_stage
from ce_export import runners
from ce_export import verify as verify_stage
from ce_export.artifacts import MANIFEST, PARITY, PARITY_PLOT, staged_folder, writing
from ce_export.calibration_data import BUILTIN, CHECKPOINT_TASK, prepare
from ce_export.capture import LOGITS, build_torch_model, build_traced_model, empty_past, parameter_dtype
from ce_export.demo import DEMO_NAME, write_demo_checkpoint
from ce_export.dtypes import DTYPES
from ce_export.errors import BuildError, ExportError, OutputError, VerifyError
from ce_export.load import load_checkpoint, parameter_count
from ce_export.manifest import (TARGETS, EvaluationData, FreeRunning, FreeRunningGeneration, FreeRunningLogits,
                                Manifest, Parity, Quality, TaskQuality, read_manifest, recorded_files)
from ce_export.onnx_precision import OnnxPrecisionView
from ce_export.progress import progress_bar
from ce_export.quantize import quantize_activations
from ce_export.task import TASK_FILE, compare_exact_match, exact_match, held_out_sequences, read_task, task_tokenizer

MANIFEST_FORMAT = 1
CHECKPOINT_COPY = "checkpoint"
# Calibration / evaluation data (calibration_data.prepare): sequences of EVAL_SEQ_LEN tokens; the last
# quarter is held out, and its first EVAL_SEQUENCES give the perplexity of the quality report; the
# first CALIBRATION_SEQUENCES of the rest give the FP8 activation ranges (fp8-w8a8).
EVAL_SEQ_LEN, EVAL_FRACTION, EVAL_SEQUENCES, CALIBRATION_SEQUENCES = 64, 0.25, 8, 32
TASK_PERPLEXITY_SEQUENCES = 16  # a task checkpoint's perplexity: its held-out problems' text, 16 x 64 tokens
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
    quantize: str | None = None  # quantization mode (see quantize.QUANTIZATIONS)
    calib: str | None = None  # calibration data (text / JSONL / .npy / .json); None: the built-in corpus
    logits: str | None = None  # "all" positions or the "last" one; None: export.DEFAULT_LOGITS[target]
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


def build(model: str, out: str | Path, options: BuildOptions, report: Callable[[str], None] = print) -> Manifest:
    """Build every artifact for `model` (a checkpoint folder or "demo") into `out`; returns the manifest."""
    if options.dtype not in DTYPES:
        raise ExportError(f"unknown dtype {options.dtype!r} (choose from {', '.join(DTYPES)})")
    if options.target not in TARGETS:
        raise ExportError(f"unknown target {options.target!r} (choose from {', '.join(TARGETS)})")
    if options.quantize is not None:
        quantize_stage.check_mode(options.quantize)
    if options.logits not in (None, *LOGITS):
        raise ExportError(f"unknown logits {options.logits!r} (choose from {', '.join(LOGITS)})")
    if options.plugin_library is not None:
        if options.target != "trt":
            raise BuildError("--plugin-lib applies to --target trt only")
        if not Path(options.plugin_library).is_file():
            raise BuildError(f"{options.plugin_library}: plugin library not found")
    out = Path(out)
    with staged_folder(out, force=options.force, report=report) as staging:
        timer = StageTimer(report)
        with timer("load"):
            if model == DEMO_NAME:
                checkpoint = staging / CHECKPOINT_COPY
                write_demo_checkpoint(checkpoint, compressed=True)
                source = {"kind": "demo", "weights": "trained CE demo (ce_export/demo/weights/training.json)",
                          "path": CHECKPOINT_COPY}
            else:
                checkpoint = Path(model)
                source = {"kind": "checkpoint", "path": str(checkpoint.absolute())}
            loaded = load_checkpoint(checkpoint)
            total, active = parameter_count(loaded)
            activation_quantized = bool(options.quantize and quantize_stage.FORMATS[options.quantize].activations)
            has_task = read_task(checkpoint) is not None  # its quality report needs no calibration data
            needs_data = (options.verify and not has_task) or activation_quantized or options.calib is not None
            data = calibration_data(checkpoint, loaded, options.calib) if needs_data else None
        report(f"  {loaded.spec.architecture}, {loaded.spec.num_layers} layers, "
               f"{'CE n_ce=' + str(loaded.spec.n_ce) if loaded.spec.use_ce else 'plain MoE'}, "
               f"{total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)")
        activations = None
        with timer("capture"):
            lm = build_traced_model(loaded, DTYPES[options.dtype], separate_head=bool(options.quantize))
        if activation_quantized:
            with timer(f"calibrate: FP8 activation ranges on {min(len(data.calibration), CALIBRATION_SEQUENCES)} "
                       f"x {EVAL_SEQ_LEN} tokens ({'built-in corpus' if options.calib is None else options.calib})"):
                activations = calibrate_activations(loaded, data, DTYPES[options.dtype])
                quantize_activations(lm, activations["scales"])
        onnx_bytes = None if options.quantize else total * DTYPES[options.dtype].itemsize  # about, unquantized
        with timer(f"export ({options.target}, {options.dtype}{', ' + options.quantize if options.quantize else ''})"), \
                writing(staging / "model.onnx", onnx_bytes):
            result = export_stage.export_onnx(loaded, lm, staging, options.target, options.max_batch,
                                              options.max_seq, options.max_context, options.quantize,
                                              options.logits or export_stage.DEFAULT_LOGITS[options.target])
        del lm
        report(f"  weights: {result.weight_bytes / 1e6:.2f} MB as stored"
               + (f" ({options.quantize}: {result.quantization['weights_stored']} weights quantized)" if options.quantize else ""))
        written = make_manifest(source, loaded, options, result, data, activations, has_task)
        exported = Manifest.from_json(written, staging / MANIFEST)
        written["clients"] = clients.write_client_files(staging, checkpoint, exported)
        polygraphy = written["clients"]["polygraphy"] = polygraphy_reference.support(exported, options.verify)
        manifest = Manifest.from_json(written, staging / MANIFEST)
        manifest.write(staging)
        if options.verify:
            reference = polygraphy_reference.ReferenceWriter(staging, manifest) if polygraphy["supported"] else None
            parity = run_parity(staging, manifest, loaded, timer, record_reference=reference)
            if reference is not None:
                reference.write_script()
            parity.write(staging)
            verify_stage.plot_parity(parity, staging / PARITY_PLOT)
        if options.target == "trt":
            from ce_export.engine import build_engine, default_plugin_library
            from ce_export.trtexec import write_trtexec_script

            with timer("build: TensorRT engine"):
                library = options.plugin_library or default_plugin_library()
                manifest = manifest.with_engine(build_engine(
                    staging, max_batch=options.max_batch, max_seq=options.max_seq, max_context=options.max_context,
                    plugin_library=library, report=report))
            manifest.write(staging)
            write_trtexec_script(staging)
    report(f"artifacts: {out.absolute()}")
    if options.triton_repo:
        from ce_export.triton_repo import write_triton_repo

        write_triton_repo(out, options.triton_repo, force=options.force, report=report)
    if options.verify:
        report(summarize(parity))
        if not parity.passed:
            raise VerifyError(f"{out / PARITY}: parity FAILED ({failure_reason(parity)}); artifacts kept for inspection")
    return manifest


def calibration_data(checkpoint: Path, loaded, data: str | None):
    """The build's calibration / evaluation sequences (calibration_data.prepare): `data`, or the built-in corpus."""
    return prepare(checkpoint, loaded.spec.vocab_size, data, seq_len=EVAL_SEQ_LEN, eval_fraction=EVAL_FRACTION)


def calibrate_activations(loaded, data, dtype: torch.dtype) -> dict:
    """FP8 activation scales (amax / 448, in the artifact's dtype) of every quantized GEMM input,
    from the unquantized fp32 model on the calibration split (never the held-out slice)."""
    sequences = data.calibration[:CALIBRATION_SEQUENCES]
    lm = build_torch_model(loaded, torch.float32, keep_expert_dtype=True)
    ranges = quantize_stage.activation_ranges(lm, sequences)
    return {"format": "FP8 E4M3 (float8e4m3fn), QuantizeLinear saturate=1 -> DequantizeLinear",
            "granularity": "one static scale per tensor", "scale": "amax / 448, stored in the model dtype",
            "calibration": f"{sequences.shape[0]} x {sequences.shape[1]} tokens, {data.source}",
            "quantized": quantize_stage.ACTIVATIONS_NOTE,
            "scales": quantize_stage.activation_scales(ranges, dtype), "ranges": ranges}


def make_manifest(source: dict, loaded, options: BuildOptions, result: export_stage.ExportResult, data=None,
                  activations: dict | None = None, has_task: bool = False) -> dict:
    total, active = parameter_count(loaded)
    quantization = result.quantization
    if quantization is not None:
        quantization = {**quantization, "summary": quantize_stage.FORMATS[quantization["mode"]].summary,
                        "weights": "explicit DequantizeLinear (q and scales in the file); routers and embeddings float"}
        if activations is not None:
            quantization["activations"] = activations
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "model": loaded.spec.to_json(),
        "parameters": {"total": total, "active_per_token": active, "weight_bytes": result.weight_bytes},
        "target": options.target,
        "dtype": options.dtype,
        "quantization": quantization,
        "calibration_data": None if data is None else {
            **data.describe(), "kind": data_kind(data.source),
            "used_for": ", ".join(use for use, wanted in (("held-out perplexity", not has_task or options.calib),
                                                          ("FP8 activation scales", activations)) if wanted) or None},
        "onnx": {
            "file": result.onnx_path.name,
            "external_data": "model.onnx.data" if result.external_data else None,
            "opset": result.opset,
            "custom_domain": {"name": "ce_export", "version": 1},
            "inputs": result.input_names,
            "outputs": result.output_names,
            "dynamic_axes": result.dynamic_axes,
            "moe_nodes": result.moe_nodes,
            "experts_form": result.experts_form,
            "logits": result.logits,
            "limits": {"max_batch": options.max_batch, "max_sequence": options.max_seq, "max_context": options.max_context},
            "files": recorded_files(result.onnx_path.parent, [result.onnx_path.name] + (
                ["model.onnx.data"] if result.external_data else [])),
        },
        "tools": tool_versions(),
    }


def verify(folder: str | Path, report: Callable[[str], None] = print) -> Parity:
    folder = Path(folder)
    manifest = read_manifest(folder)
    timer = StageTimer(report)
    with timer("load"):
        loaded = load_checkpoint(manifest.source.checkpoint(folder))
    parity = run_parity(folder, manifest, loaded, timer)
    try:
        parity.write(folder)
        verify_stage.plot_parity(parity, folder / PARITY_PLOT)
    except OSError as error:
        raise OutputError(f"{folder / PARITY}: cannot write ({error.strerror or error})") from None
    report(summarize(parity))
    if not parity.passed:
        raise VerifyError(f"{folder / PARITY}: parity FAILED ({failure_reason(parity)})")
    return parity


def run_parity(folder: Path, manifest: Manifest, loaded, timer: "StageTimer", record_reference=None) -> Parity:
    """Parity of the artifact with PyTorch, in two phases whose memory peaks do not add up: ONNX Runtime
    first, on every input (parity shapes, greedy generation, held-out perplexity, the task's held-out
    problems), keeping only its outputs; the session is then released and the PyTorch models are built and run one at a time,
    each keeping the routed experts' weights in the checkpoint's dtype (upcast per expert).
    `record_reference`: receives the logits check's feeds and reference outputs (polygraphy_reference)."""
    dtype_name = manifest.dtype
    spec = loaded.spec
    onnx_path = folder / manifest.onnx.file
    quantization = manifest.quantization.mode if manifest.quantization else None
    scales = manifest.quantization.activations.scales if quantization and manifest.quantization.activations else None
    artifact_dtype = DTYPES[dtype_name]
    tolerance = verify_stage.TOLERANCES[dtype_name]
    view = OnnxPrecisionView(onnx_path, dtype_name)
    runtime_dtype = view.runtime_torch_dtype
    evaluation = evaluation_inputs(folder, manifest, loaded)
    sequences = evaluation.sequences
    cases, new_tokens = verify_stage.PARITY_CASES, verify_stage.GENERATION_TOKENS
    logits_kept = manifest.onnx.logits
    with timer("verify: ONNX Runtime session"):
        runtime = runners.OrtRunner(view.model_for_runtime(), exact_dequantize=bool(quantization),
                                    weights_as_stored=True, path=onnx_path)
        runtime.check_names(manifest.onnx.inputs, manifest.onnx.outputs, folder / MANIFEST)
    with timer(f"verify: ONNX Runtime on {len(cases)} shapes, {new_tokens} greedy tokens, "
               f"{len(sequences)} held-out sequences" + (", the task's held-out problems" if evaluation.task else "")), \
            progress_bar(total=len(cases) + new_tokens + len(sequences) + bool(evaluation.task),
                         desc="  ONNX Runtime") as bar:
        recorded = verify_stage.record_logits(runtime, spec, runtime_dtype, cases, progress=bar)
        ids, mask = verify_stage.generation_prompt(spec.vocab_size)
        start = time.perf_counter()
        onnx_tokens, _ = runners.greedy_tokens(runtime, ids, mask, empty_past(spec, ids.shape[0], 0, runtime_dtype),
                                               new_tokens, progress=bar)
        onnx_seconds = time.perf_counter() - start
        onnx_perplexity = verify_stage.perplexity(runtime, sequences, spec, runtime_dtype, logits_kept, progress=bar)
        onnx_task = None
        if evaluation.task is not None:
            onnx_task = exact_match(runtime, evaluation.task, evaluation.tokenizer, spec, runtime_dtype)
            bar.update(1)
    del runtime
    gc.collect()

    def weights_like_artifact(dequantized_dtype: torch.dtype):
        return artifact_weights(loaded, view.round_to, quantization, artifact_dtype, dequantized_dtype)

    def torch_model(name: str, dtype: torch.dtype, weights, like_artifact: bool = True):
        with timer(f"verify: PyTorch {name} model"):
            lm = build_torch_model(loaded, dtype, weights=weights, keep_expert_dtype=True, progress=True)
            if scales and like_artifact:
                quantize_activations(lm, scales)
        return lm

    reference_weights = weights_like_artifact(torch.float32 if view.emulated else artifact_dtype)
    reference = torch_model("reference (fp32)", torch.float32, reference_weights)
    with timer(f"verify: PyTorch logits on {len(cases)} shapes"), \
            progress_bar(total=len(cases), desc="  PyTorch") as bar:
        logits = verify_stage.compare_logits(reference, recorded, manifest.onnx.outputs, tolerance, progress=bar,
                                             record=record_reference, logits=logits_kept)
    del recorded
    low_precision_torch = dtype_name != "fp32" and not view.emulated

    def generation_with(lm):
        with timer(f"verify: PyTorch greedy generation of {new_tokens} tokens"), \
                progress_bar(total=new_tokens, desc="  PyTorch") as bar:
            return verify_stage.check_generation(lm, None, spec, runtime_dtype, tolerance,
                                                 onnx_tokens=onnx_tokens.tolist(), onnx_seconds=onnx_seconds,
                                                 progress=bar)

    generation = None if low_precision_torch else generation_with(reference)
    free_running = None
    if scales:
        # FP8 activations: the free-running checks are reported; the pass criterion is the same
        # checks with the reference synchronized at each FP8 quantizer (synchronized.py says why).
        # This check runs ONNX Runtime and the reference side by side: both models are resident.
        free_logits = FreeRunningLogits(statistic=logits.statistic, worst=logits.worst, max_rel=logits.max_rel,
                                        min_top1_agreement=min(case.logits_top1_agreement for case in logits.cases))
        from ce_export import synchronized

        with timer("verify: logits and greedy generation, synchronized at each FP8 quantizer"):
            pair = synchronized.SynchronizedPair(view.model_for_runtime(), reference, logits=logits_kept,
                                                 path=onnx_path)
            try:
                logits = synchronized.check_logits(pair, spec, manifest.onnx.outputs, runtime_dtype, tolerance)
                synchronized_generation = synchronized.check_generation(pair, spec, runtime_dtype, tolerance)
            finally:
                pair.close()
    torch_quality = None
    if reference_weights is None and not scales:  # the reference is also the unquantized fp32 model
        torch_quality = torch_fp32_quality(reference, evaluation, spec, timer)
    del reference
    gc.collect()
    if low_precision_torch:
        at_dtype = torch_model(f"{dtype_name}", artifact_dtype, weights_like_artifact(artifact_dtype))
        generation = generation_with(at_dtype)
        del at_dtype
        gc.collect()
        if not generation["passed"]:
            reference = torch_model("reference (fp32)", torch.float32, reference_weights)
            accept_fp32_reference_tokens(generation, generation_with(reference))
            del reference
            gc.collect()
    if scales:
        free_running = FreeRunning(logits=free_logits, generation=free_generation(generation))
        generation = synchronized_generation
    if torch_quality is None:
        unquantized = torch_model("fp32 (unquantized)", torch.float32, None, like_artifact=False)
        torch_quality = torch_fp32_quality(unquantized, evaluation, spec, timer)
        del unquantized
        gc.collect()
    torch_perplexity, torch_task = torch_quality
    quality = quality_report(folder, manifest, evaluation, torch_perplexity, onnx_perplexity, torch_task, onnx_task)
    return Parity.model_validate({
        "runtime": "onnxruntime CPUExecutionProvider",
        "reference": "PyTorch fp32, MoE blocks through ce_export.moe_math (the reference op)",
        "dtype": dtype_name,
        "quantization": quantization,
        "numerics": view.numerics_note + (f"; {quantization}: Q/DQ run as written (ONNX Runtime's QDQ fusions, "
                                          "e.g. MatMulNBits, which also quantizes activations, disabled)"
                                          if quantization else ""),
        "passed": logits.passed and generation["passed"],
        "logits": logits,
        "generation": generation,
        **({"free_running": free_running} if free_running is not None else {}),
        "quality": quality,
        "tools": tool_versions(),
    })


def free_generation(generation: dict) -> FreeRunningGeneration:
    return FreeRunningGeneration(identical_rows=sum(row["identical"] for row in generation["rows"]),
                                 rows=generation["rows"])


def artifact_weights(loaded, round_to: torch.dtype | None, quantization: str | None, artifact_dtype: torch.dtype,
                     dequantized_dtype: torch.dtype):
    """build_torch_model's `weights`: each tensor as the artifact holds it, i.e. rounded to its dtype
    (bf16 view) and, for the weights quantization stores quantized, its q and scales (computed in
    the artifact's dtype) dequantized as its runtime does. None when that is the checkpoint itself."""
    stored = {t.dtype for t in loaded.dense_tensors.stored.values()} | {
        t.dtype for source in loaded.moe_weights.sources.values() for _, t in source.items()}
    if quantization is None and (round_to is None or stored <= {round_to}):
        return None

    def weights(name, module, tensor):
        if quantization and quantize_stage.is_quantized(module, name.rpartition(".")[2]):
            return quantize_stage.dequantized_like_artifact(tensor, quantization, artifact_dtype, dequantized_dtype, name)
        if round_to is None or parameter_dtype(module, name.rpartition(".")[2], round_to) != round_to:
            return tensor  # kept fp32 in the artifact (an fp32 router, a score bias): nothing rounded
        return tensor.to(round_to)

    return weights


def torch_fp32_quality(lm, evaluation: "Evaluation", spec, timer) -> tuple[float, dict | None]:
    """The unquantized PyTorch fp32 model's side of the quality report: (held-out perplexity, its
    exact_match on the task's held-out problems, or None without a task)."""
    decoder = runners.TorchRunner(lm)
    sequences = evaluation.sequences
    with timer("verify: quality (held-out perplexity" + (", the task's held-out problems" if evaluation.task else "")
               + "), PyTorch fp32"), \
            progress_bar(total=len(sequences) + bool(evaluation.task), desc="  PyTorch") as bar:
        perplexity = verify_stage.perplexity(decoder, sequences, spec, torch.float32, progress=bar)
        task = None
        if evaluation.task is not None:
            task = exact_match(decoder, evaluation.task, evaluation.tokenizer, spec, torch.float32)
            bar.update(1)
    return perplexity, task


def accept_fp32_reference_tokens(generation: dict, against_fp32: dict) -> None:
    """fp16 builds: a row whose tokens differ from PyTorch fp16's passes when they equal those of
    the fp32 reference (with the same quantized weights, when quantized). PyTorch's CPU fp16 arithmetic
    leaves the fp32 path at least as often as ONNX Runtime's fp16 (measured on the demo, 12 greedy
    rows: PyTorch fp16 diverged from fp32 in 4 / 7 / 8 rows unquantized / int8 / fp8, ONNX Runtime
    fp16 in 5 / 4 / 6), so a row where PyTorch fp16 alone left the fp32 path says nothing against
    the artifact."""
    for row, fp32_row in zip(generation["rows"], against_fp32["rows"]):
        if not row["passed"] and fp32_row["identical"]:
            row.update(passed=True, identical_to_fp32_reference=True)
    generation["fp32_reference_tokens"] = against_fp32["torch_tokens"]
    generation["passed"] = all(row["passed"] for row in generation["rows"])


@dataclass
class Evaluation:
    """What the quality report evaluates (chosen before anything runs): for a checkpoint with a task
    (task.json, ce_export/task.py; the demo's), exact-match accuracy on its held-out problems;
    perplexity on the held-out slice of --calib DATA when given, else on the task's held-out
    problems, else on the built-in corpus's held-out slice."""

    sequences: torch.Tensor  # [N, S] held-out tokens (perplexity)
    description: str  # the quality report's `evaluation`
    data: EvaluationData
    task: object = None  # task.Task
    tokenizer: object = None
    task_source: str = ""


def evaluation_inputs(folder: Path, manifest: Manifest, loaded) -> Evaluation:
    checkpoint = manifest.source.checkpoint(folder)
    task = read_task(checkpoint)
    source = manifest.calibration_data.source if manifest.calibration_data else BUILTIN
    user_data = source not in (BUILTIN, CHECKPOINT_TASK)
    tokenizer = task_tokenizer(checkpoint, loaded.spec.vocab_size) if task is not None else None
    task_source = str(checkpoint / TASK_FILE)
    if task is not None and not user_data:
        sequences = held_out_sequences(task, tokenizer, EVAL_SEQ_LEN, TASK_PERPLEXITY_SEQUENCES)
        description = (f"{len(task.held_out)} held-out problems of {task.name!r} (exact match); "
                       f"perplexity on {len(sequences)} x {sequences.shape[1]} tokens of their text")
        evaluation_data = EvaluationData(source=task_source, kind="the checkpoint's task (held-out problems)",
                                         tokenizer=type(tokenizer).__name__)
    else:
        data = calibration_data(checkpoint, loaded, source if user_data else None)
        sequences = data.evaluation[:EVAL_SEQUENCES]
        description = f"{len(sequences)} x {sequences.shape[1]} held-out tokens, {data.tokenizer}"
        evaluation_data = EvaluationData(source=data.source, kind=data_kind(data.source), tokenizer=data.tokenizer)
    return Evaluation(sequences=sequences, description=description, data=evaluation_data, task=task,
                      tokenizer=tokenizer, task_source=task_source)


def quality_report(folder: Path, manifest: Manifest, evaluation: Evaluation, torch_ppl: float, onnx_ppl: float,
                   torch_task: dict | None, onnx_task: dict | None) -> Quality:
    """Model size and the quality cost of the artifact, unquantized PyTorch fp32 vs the exported
    file in ONNX Runtime (their results recorded in verify's two phases)."""
    task = None if evaluation.task is None else TaskQuality(
        source=evaluation.task_source, **compare_exact_match(evaluation.task, evaluation.tokenizer, torch_task, onnx_task))
    files = [folder / name for name in manifest.onnx.file_names()]
    return Quality(**({"task": task} if task is not None else {}), evaluation=evaluation.description,
                   data=evaluation.data, perplexity_torch_fp32=torch_ppl, perplexity_onnx=onnx_ppl,
                   perplexity_delta=onnx_ppl - torch_ppl, parameters=manifest.parameters,
                   weight_bytes=manifest.parameters.weight_bytes, onnx_bytes=sum(f.stat().st_size for f in files))


def data_kind(source: str) -> str:
    return {BUILTIN: "built-in corpus", CHECKPOINT_TASK: "the checkpoint's task (calibration text)"}.get(
        source, "user data (--calib)")


def failure_reason(parity: Parity) -> str:
    reasons = []
    logits, generation = parity.logits, parity.generation
    if not logits.passed:
        reasons.append(f"{logits.statistic} {logits.worst:.2e} > {logits.threshold:.0e}")
    for index, row in enumerate(generation.rows):
        if not row.passed:
            router = f", closest router margin {row.router_margin:.2e}" if row.router_margin is not None else ""
            reasons.append(f"generated tokens of row {index} differ from step {row.first_difference} "
                           f"(PyTorch logit margin {row.near_tie_margin:.2e}{router}: no near-tie)")
    return "; ".join(reasons)


def summarize(parity: Parity) -> str:
    logits, generation = parity.logits, parity.generation
    verdict = "PASSED" if parity.passed else "FAILED"
    rows = generation.rows
    identical = sum(r.identical for r in rows)
    fp32 = sum(r.identical_to_fp32_reference for r in rows)
    ties = sum(not r.identical and r.passed for r in rows) - fp32
    tokens = (f"identical in {identical}/{len(rows)} rows" + (f", {ties} diverging at a near-tie" if ties else "")
              + (f", {fp32} identical to the fp32 reference instead" if fp32 else ""))
    quality = parity.quality
    task = quality.task if quality is not None else None
    answers = (f"; task exact match {task.accuracy_onnx:.1%} of {task.problems} held-out problems vs "
               f"{task.accuracy_torch_fp32:.1%} in PyTorch fp32" if task is not None else "")
    ppl = (f"{answers}; held-out perplexity {quality.perplexity_onnx:.3f} vs {quality.perplexity_torch_fp32:.3f} "
           f"in PyTorch fp32 (delta {quality.perplexity_delta:+.4f})" if quality is not None else "")
    free = parity.free_running
    synchronized = (f"; synchronized at each FP8 quantizer (free-running: max relative error "
                    f"{free.logits.max_rel:.2e}, greedy tokens identical in "
                    f"{free.generation.identical_rows}/{len(rows)} rows)" if free is not None else "")
    return (f"parity {verdict} ({parity.dtype}{', ' + parity.quantization if parity.quantization else ''}, "
            f"{parity.runtime}): {logits.statistic} "
            f"{logits.worst:.2e} over {len(logits.cases)} shapes (threshold {logits.threshold:.0e}, "
            f"max relative error {logits.max_rel:.2e}); greedy {generation.new_tokens} tokens {tokens}{ppl}"
            f"{synchronized}")


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
