"""The parity check's feeds and PyTorch's outputs as polygraphy data, and the `polygraphy run` commands.

While verify runs the logits check, every shape's feed is written as polygraphy input data
(polygraphy/inputs/, one JSON per iteration) and the PyTorch reference's outputs as polygraphy
RunResults (polygraphy/reference/). polygraphy/compare.sh then holds ONNX Runtime (any machine) or a
TensorRT engine built from model.onnx, with our plugin loaded, against that reference with
polygraphy's own comparator:

parity.json's statistic is max|err| / max|reference| (fp32: max; fp16 / bf16: mean|err| / max|reference|)
per output and shape. polygraphy's tolerances are per output over all iterations, so each output's
absolute tolerance is the threshold times its smallest max|reference| over the shapes: the check is
at least as strict as parity.json's on every shape.
"""

from __future__ import annotations

import os
import shlex
from collections import OrderedDict
from pathlib import Path

import torch

from ce_export.io_schema import ATTENTION_MASK, INPUT_IDS, PAST_KEY, PAST_VALUE, POSITION_IDS
from ce_export.manifest import Manifest
from ce_export.verify import PARITY_CASES, TOLERANCES

FOLDER = "polygraphy"
INPUTS, REFERENCE, SCRIPT = f"{FOLDER}/inputs", f"{FOLDER}/reference", f"{FOLDER}/compare.sh"
REFERENCE_RUNNER = "pytorch-fp32-reference"


def support(manifest: Manifest, verify: bool) -> dict:
    """manifest.json's clients.polygraphy: which `polygraphy run` commands the build writes."""
    if not verify:
        return {"supported": False, "reason": "built with --no-verify: no reference outputs were computed"}
    if manifest.quantization is not None and manifest.quantization.activations is not None:
        return {"supported": False,
                "reason": "FP8 activations: parity is synchronized at each quantizer (see parity.json); free-running, "
                          "ONNX Runtime and PyTorch round activations on FP8 midpoints apart, so a plain "
                          "output comparison would fail a good file"}
    tolerance = TOLERANCES[manifest.dtype]
    entry = {"supported": True, "script": SCRIPT, "inputs": INPUTS, "reference": REFERENCE,
             "check": f"{tolerance.statistic.split('_')[0]} absolute error per output <= {tolerance.threshold:g} x "
                      "its smallest max|reference| over the parity shapes",
             "onnxrt": manifest.dtype != "bf16", "tensorrt": manifest.target != "ort"}
    if manifest.dtype == "bf16":
        entry["notes"] = ["no ONNX Runtime command: its CPU provider has no bf16 kernels; the feeds are the parity "
                          "feeds rounded to bf16 (torch tensors), for a TensorRT engine"]
    if manifest.target == "ort":
        entry.setdefault("notes", []).append("no TensorRT command: --target ort uses com.microsoft::MoE, an ONNX "
                                             "Runtime contrib op")
    return entry


class ReferenceWriter:
    """Receives each parity shape's feed and PyTorch outputs (verify.check_logits' `record`) and writes
    them as polygraphy data; `write_script` then writes compare.sh with the tolerances."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self.input_names = manifest.onnx.inputs
        self.output_names = manifest.onnx.outputs
        self.bf16 = manifest.dtype == "bf16"
        self.smallest_scale: dict[str, float] = {}
        self.index = 0
        for sub in (INPUTS, REFERENCE):
            (self.folder / sub).mkdir(parents=True)

    def __call__(self, inputs: tuple, expected: tuple) -> None:
        from polygraphy.comparator import IterationResult, RunResults
        from polygraphy.json import to_json

        ids, mask, positions, past = inputs
        feed = OrderedDict(zip(self.input_names, [ids, mask, positions, *past]))
        if self.bf16:  # torch tensors: numpy has no bfloat16
            feed = OrderedDict((name, t.to(torch.bfloat16) if t.is_floating_point() else t.clone())
                               for name, t in feed.items())
        else:
            feed = OrderedDict((name, t.detach().contiguous().numpy()) for name, t in feed.items())
        outputs = OrderedDict((name, t.detach().float().contiguous().numpy()) for name, t in zip(self.output_names, expected))
        for name, array in outputs.items():
            scale = float(abs(array).max()) if array.size else 0.0
            self.smallest_scale[name] = min(scale, self.smallest_scale.get(name, scale))
        result = RunResults([(REFERENCE_RUNNER, [IterationResult(outputs, runner_name=REFERENCE_RUNNER)])])
        name = f"{self.index:010d}.json"  # polygraphy's per-iteration file names (IterationWriter)
        (self.folder / INPUTS / name).write_text(to_json(feed))
        (self.folder / REFERENCE / name).write_text(to_json(result))
        self.index += 1

    def write_script(self) -> Path:
        tolerance = TOLERANCES[self.manifest.dtype]
        entry = support(self.manifest, verify=True)
        atol = [f"{name}:{tolerance.threshold * scale!r}" for name, scale in self.smallest_scale.items()]
        compare = ["--load-inputs", INPUTS, "--load-outputs", REFERENCE, "--check-error-stat",
                   tolerance.statistic.split("_")[0], "--rtol", "0", "--atol", *atol]
        onnxrt = ["polygraphy", "run", self.manifest.onnx.file, "--onnxrt", "--providers", "cpu"]
        if self.manifest.quantization:
            # The Q/DQ nodes as written (parity runs them so too): with its graph optimizations ONNX
            # Runtime fuses DequantizeLinear + MatMul into MatMulNBits, which also quantizes activations.
            onnxrt += ["--graph-optimization-level", "ORT_DISABLE_ALL"]
        trt = ["polygraphy", "run", self.manifest.onnx.file, "--trt", "--strongly-typed"]
        for flag, pick in (("--trt-min-shapes", min), ("--trt-opt-shapes", max), ("--trt-max-shapes", max)):
            trt += [flag, *self.profile_shapes(pick)]
        lines = [
            "#!/usr/bin/env bash",
            f"# polygraphy: this build against PyTorch on the {len(PARITY_CASES)} parity shapes of parity.json.",
            f"#   {INPUTS}/     the feeds (polygraphy input data, one JSON per iteration)",
            f"#   {REFERENCE}/  PyTorch fp32's outputs for them (polygraphy RunResults)",
            f"# Pass: {entry['check']}",
            f"# (parity.json: {tolerance.statistic} <= {tolerance.threshold:g} per output and shape).",
            "# usage: bash polygraphy/compare.sh onnxrt [POLYGRAPHY_ARGS]   # ONNX Runtime CPU, any machine",
            "#        bash polygraphy/compare.sh trt [--plugins LIBRARY] [POLYGRAPHY_ARGS]",
            "#          TensorRT from model.onnx, on a GPU machine. With our plugin (--plugins",
            "#          plugins/trt/build/libce_export_trt.so, or $CE_EXPORT_PLUGIN_LIB) the MoE nodes of a",
            "#          --target trt build bind to it; without it TensorRT inlines the ONNX function bodies.",
            *(f"# note: {note}" for note in entry.get("notes", [])),
            "set -euo pipefail",
            'cd "$(dirname "$0")/.."',
            'case "${1:-onnxrt}" in',
        ]
        if entry["onnxrt"]:
            lines.append(f'  onnxrt) shift || true; exec {shlex.join(onnxrt + compare)} "$@" ;;')
        if entry["tensorrt"]:
            lines.append(f'  trt) shift; exec {shlex.join(trt + compare)} '
                         '${CE_EXPORT_PLUGIN_LIB:+--plugins "$CE_EXPORT_PLUGIN_LIB"} "$@" ;;')
        usage = " | ".join(name for name, on in (("onnxrt", entry["onnxrt"]), ("trt", entry["tensorrt"])) if on)
        lines += [f'  *) echo "usage: bash {SCRIPT} {usage}" >&2; exit 2 ;;', "esac", ""]
        path = self.folder / SCRIPT
        path.write_text("\n".join(lines))
        os.chmod(path, 0o755)
        return path

    def profile_shapes(self, pick) -> list[str]:
        """One TensorRT optimization profile covering every parity shape (`pick` = min or max per dimension)."""
        batch = pick(case.batch for case in PARITY_CASES)
        sequence = pick(case.sequence for case in PARITY_CASES)
        past = pick(case.past for case in PARITY_CASES)
        total = pick(case.past + case.sequence for case in PARITY_CASES)
        model = self.manifest.model
        shapes = {INPUT_IDS: [batch, sequence], ATTENTION_MASK: [batch, total], POSITION_IDS: [batch, sequence]}
        for layer in range(model.num_layers):
            shapes[PAST_KEY % layer] = [batch, model.kv_heads, past, model.key_dim]
            shapes[PAST_VALUE % layer] = [batch, model.kv_heads, past, model.value_dim]
        return [f"{name}:[{','.join(map(str, dims))}]" for name, dims in shapes.items()]
