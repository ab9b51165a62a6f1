"""Quantization with explicit QuantizeLinear / DequantizeLinear in the ONNX (TensorRT 11 is strongly typed).

Modes (`QUANTIZATIONS`): weight-only `int8` (symmetric, round to nearest) and `fp8` (E4M3, largest value
448) with one scale per output channel (per expert and output row for expert weights); weight-only
`int4` / `int4-g128` (symmetric) with one scale per group of 64 / 128 inputs (blocked
DequantizeLinear, opset 21; a row shorter than the group is one group) or `int4-channel` per output
channel; and `fp8-w8a8`: `fp8` weights plus FP8 E4M3 activations with static
per-tensor scales (calibrated amax / 448) at the input of every quantized GEMM. Quantized: the
attention, LM-head, dense-MLP, shared-expert and expert weights; routers, scalar gates (a shared
expert's sigmoid gate) and embeddings stay in float (as in the MoE compression study).

Two halves that agree exactly, by construction:
- `fake_quantize_model` computes each weight's (q, scale) in the artifact's dtype (scales are
  stored in it) and replaces the PyTorch weight by what ONNX Runtime's DequantizeLinear computes
  from them (q * scale, rounded once to the output dtype), so the captured model is the reference
  the exported artifact is checked against. It returns the (q, scale) of every weight;
- `store_quantized_weights` finds each of those weights among the exported graph's initializers
  (by value: the exporter folds transposes into new, anonymous initializers; `--target ort`
  interleaves expert rows) and replaces it by the recorded q and scale feeding a DequantizeLinear.
Expert weights [E, O, I] are stored as [E*O, I] with per-row scales and reshaped back.

Activations (`fp8-w8a8`): `ce_export::fake_quantize_fp8(x, scale)` = clamp(x / scale, +-448) ->
E4M3 (round to nearest even) -> * scale, evaluated in fp32 whatever x's dtype, which is what ONNX
Runtime's QuantizeLinear(saturate=1) -> DequantizeLinear compute; export.py translates it to that
node pair. It is applied to every nn.Linear's input (shared experts are transformers' own linear
layers) and each MoE block's hidden input to the experts (not the router input). The experts' intermediate activation
(the down-projection input) is inside the custom MoE op and stays float.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from ce_export.capture import MoeBlock, activation_sites, is_quantized_linear
from ce_export.errors import ExportError

FP8_MAX = 448.0


@dataclass(frozen=True)
class Format:
    largest: float
    numpy_dtype: object
    torch_dtype: torch.dtype | None  # None: integer rounding
    block: int | None = None  # scales per group of this many inputs (None: per output channel)
    opset: int = 20  # the default-domain opset DequantizeLinear needs for this format
    activations: bool = False  # also FP8 activations with static per-tensor scales
    summary: str = ""


FORMATS = {
    "int8": Format(127.0, np.int8, None, summary="int8 weights, per output channel"),
    "fp8": Format(FP8_MAX, ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn, summary="FP8 E4M3 weights, per output channel"),
    "fp8-w8a8": Format(FP8_MAX, ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn, activations=True,
                       summary="FP8 E4M3 weights per output channel + FP8 E4M3 activations, static per-tensor scales"),
    "int4": Format(7.0, ml_dtypes.int4, None, block=64, opset=21, summary="int4 weights, per group of 64 inputs"),
    "int4-g128": Format(7.0, ml_dtypes.int4, None, block=128, opset=21, summary="int4 weights, per group of 128 inputs"),
    "int4-channel": Format(7.0, ml_dtypes.int4, None, opset=21, summary="int4 weights, per output channel"),
}
QUANTIZATIONS = tuple(FORMATS)
ACTIVATIONS_NOTE = ("FP8 E4M3 with one static scale per tensor (calibration amax / 448) at the input of every "
                    "nn.Linear (attention projections, LM head, dense MLPs, shared experts) and of the "
                    "routed experts (the MoE block's hidden input, before CE's input scaling); not quantized: "
                    "router inputs, and the experts' intermediate activation (down-projection input), which is "
                    "inside the custom MoE op and stays float")


def check_mode(mode: str) -> Format:
    if mode not in FORMATS:
        raise ExportError(f"unknown quantization {mode!r} (choose from {', '.join(QUANTIZATIONS)})")
    return FORMATS[mode]


@dataclass
class QuantizedWeight:
    """One weight as the artifact stores it: q [..., O, I] in the format, scale [..., O, G] in the
    artifact dtype (G = I / block, or 1), and the tensor the PyTorch model holds instead."""

    name: str
    q: np.ndarray
    scale: np.ndarray
    dequantized: torch.Tensor


def smallest_positive(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps  # the smallest subnormal


def quantize_weight(weight: torch.Tensor, mode: str, artifact_dtype: torch.dtype | None = None,
                    dequantized_dtype: torch.dtype | None = None, name: str = "weight"):
    """(q, scale, dequantized) of `weight` [..., O, I] on `mode`'s grid.

    artifact_dtype: the dtype the exported file stores weights and scales in (default: weight's).
    The scale is computed in fp32 from the weight as that dtype holds it, then rounded to it; q =
    round(clamp(w / scale)). dequantized = q * scale in fp32, rounded to dequantized_dtype (default
    artifact_dtype), which is exactly ONNX Runtime's DequantizeLinear for that output dtype.
    """
    fmt = check_mode(mode)
    artifact_dtype = artifact_dtype or weight.dtype
    dequantized_dtype = dequantized_dtype or artifact_dtype
    source = weight.detach().to(artifact_dtype).float()
    columns = source.shape[-1]
    group = min(fmt.block, columns) if fmt.block else columns  # a row shorter than a group is one group
    if columns % group:
        raise ExportError(f"--quantize {mode}: {name} has {columns} inputs per row, not a multiple of the "
                          f"group size {group}")
    grouped = source.reshape(*source.shape[:-1], columns // group, group)
    scale = (grouped.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fmt.largest).to(artifact_dtype)
    scale = scale.masked_fill(scale == 0, smallest_positive(artifact_dtype)).float()
    scaled = (grouped / scale).clamp(-fmt.largest, fmt.largest)
    q = scaled.round() if fmt.torch_dtype is None else scaled.to(fmt.torch_dtype).float()
    dequantized = (q * scale).to(dequantized_dtype).reshape(source.shape)
    return q.reshape(source.shape), scale.squeeze(-1).to(artifact_dtype), dequantized


def quantized_weight_names(lm: nn.Module):
    """(module, parameter name, qualified name) of every weight the quantization modes store quantized."""
    for module_name, module in lm.named_modules():
        if isinstance(module, MoeBlock):
            names = ("gate_up", "down")
        elif is_quantized_linear(module):
            names = ("weight",)
        else:
            continue
        for name in names:
            yield module, name, f"{module_name}.{name}"


def fake_quantize_model(lm: nn.Module, mode: str, artifact_dtype: torch.dtype | None = None,
                        dequantized_dtype: torch.dtype | None = None) -> dict[str, QuantizedWeight]:
    """Replace every quantized weight of `lm` by its dequantized value; returns {name: QuantizedWeight}.

    artifact_dtype / dequantized_dtype as in `quantize_weight` (defaults: lm's dtype). A reference
    for an fp16 artifact is the fp32 model with artifact_dtype=fp16; for a bf16 artifact run
    through the fp32 view, artifact_dtype=bf16 and dequantized_dtype=fp32 (the view's
    DequantizeLinear computes q * scale in fp32). Parameters are replaced, not written in place:
    they may share storage with the loaded checkpoint.
    """
    check_mode(mode)
    quantized = {}
    with torch.no_grad():
        for module, name, qualified in quantized_weight_names(lm):
            weight = getattr(module, name)
            q, scale, dequantized = quantize_weight(weight, mode, artifact_dtype, dequantized_dtype, qualified)
            stored = dequantized.to(weight.dtype)
            setattr(module, name, nn.Parameter(stored, requires_grad=False))
            quantized[qualified] = QuantizedWeight(qualified, q.numpy().astype(FORMATS[mode].numpy_dtype),
                                                   to_numpy(scale), stored)
    return quantized


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.detach().contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.detach().contiguous().numpy()


# ---------------------------------------------------------------- activations (fp8-w8a8)

@torch.library.custom_op("ce_export::fake_quantize_fp8", mutates_args=())
def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear(x, scale, E4M3 zero, saturate=1) -> DequantizeLinear, as ONNX Runtime computes
    them for fp32 and fp16 x: x / scale in fp32, saturated to +-448, rounded to nearest even E4M3,
    times scale in fp32, rounded once to x's dtype."""
    s = scale.float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


@fake_quantize_fp8.register_fake
def _fake_quantize_fp8_fake(x, scale):
    return torch.empty_like(x)


class InputQuantizedLinear(nn.Linear):
    """nn.Linear whose input goes through fake_quantize_fp8 first (parameter names unchanged)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.ops.ce_export.fake_quantize_fp8(input, self.input_scale), self.weight, self.bias)


def activation_scales(ranges: dict, dtype: torch.dtype) -> dict[str, float]:
    """{site: amax / 448} rounded to the artifact's dtype (the scale is stored in it), from
    calibration's activation_ranges."""
    scales = {}
    for name, entry in ranges.items():
        scale = torch.tensor(max(float(entry["amax"]), 1e-12) / FP8_MAX, dtype=torch.float32).to(dtype)
        if scale.item() == 0:
            scale = torch.tensor(smallest_positive(dtype), dtype=dtype)
        scales[name] = float(scale.float())
    return scales


def quantize_activations(lm: nn.Module, scales: dict[str, float]) -> int:
    """Insert fake_quantize_fp8 with `scales` (site name -> scale) before every quantized GEMM input."""
    sites = list(activation_sites(lm))
    missing = [name for name, _, _ in sites if name not in scales]
    if missing:
        raise ExportError(f"no activation scale for {missing[0]} (and {len(missing) - 1} more); "
                          f"calibration does not match this model")
    dtype = next(lm.parameters()).dtype
    for name, module, kind in sites:
        if kind == "linear":
            module.__class__ = InputQuantizedLinear
        module.register_buffer("input_scale", torch.tensor(scales[name], dtype=dtype), persistent=False)
    return len(sites)


# ---------------------------------------------------------------- the ONNX side

def _key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).digest()


def _interleaved(rows: np.ndarray) -> np.ndarray:
    """[E, 2I, ...] gate rows then up rows -> g0, u0, g1, u1, ... (com.microsoft::MoE's fc1 layout)."""
    experts, two_i = rows.shape[:2]
    return rows.reshape(experts, 2, two_i // 2, *rows.shape[2:]).swapaxes(1, 2).reshape(rows.shape)


def _lookup(quantized: dict[str, QuantizedWeight]) -> dict:
    """Value key -> (QuantizedWeight, layout): how each weight can appear among the graph's initializers."""
    table = {}
    for entry in quantized.values():
        values = to_numpy(entry.dequantized)
        if values.ndim == 2:
            table[_key(values.T)] = (entry, "transposed")  # MatMul(x, W^T), the transpose folded
            table.setdefault(_key(values), (entry, "rows"))  # Gemm(transB=1)
        else:
            table[_key(values)] = (entry, "rows")
            if values.shape[1] % 2 == 0:
                table.setdefault(_key(_interleaved(values)), (entry, "interleaved"))
    return table


def store_quantized_weights(model: ir.Model, mode: str, quantized: dict[str, QuantizedWeight]) -> dict:
    """Replace each initializer holding one of `quantized`'s weights by its q + scale and a DequantizeLinear."""
    fmt = check_mode(mode)
    graph = model.graph
    table = _lookup(quantized)
    found, saved_bytes = set(), 0
    for value in list(graph.initializers.values()):
        if value.const_value is None or not value.uses() or len(value.shape) not in (2, 3):
            continue
        weights = value.const_value.numpy()
        match = table.get(_key(weights))
        if match is None:
            continue
        entry, layout = match
        q, scale = entry.q, entry.scale  # [..., O, I], [..., O, G]
        group = q.shape[-1] // scale.shape[-1]
        if layout == "interleaved":
            q, scale = _interleaved(q), _interleaved(scale)
        if layout == "transposed":  # [I, O]: scales per output column (and block of inputs)
            q, scale = q.T, scale.T
            axis = 0 if fmt.block else 1
            scale = scale if fmt.block else scale[0]
        else:  # [O, I] or [E, O, I] as [E*O, I]: scales per row (and block of inputs)
            q, scale = q.reshape(-1, q.shape[-1]), scale.reshape(-1, scale.shape[-1])
            axis = 1 if fmt.block else 0
            scale = scale if fmt.block else scale[:, 0]
        q, scale = np.ascontiguousarray(q), np.ascontiguousarray(scale)
        name = value.name
        q_value = ir.Value(name=f"{name}.{mode}", shape=ir.Shape(q.shape), const_value=ir.tensor(q, name=f"{name}.{mode}"))
        q_value.type = ir.TensorType(q_value.const_value.dtype)
        scale_value = ir.Value(name=f"{name}.scale", shape=ir.Shape(scale.shape), type=value.type,
                               const_value=ir.tensor(scale, name=f"{name}.scale"))
        if scale_value.const_value.dtype != value.type.dtype:
            raise ExportError(f"{entry.name}: scales in {scale_value.const_value.dtype}, weights in {value.type.dtype}")
        graph.register_initializer(q_value)
        graph.register_initializer(scale_value)
        attributes = {"axis": axis, **({"block_size": group} if fmt.block else {})}
        dequantize = ir.node("DequantizeLinear", [q_value, scale_value], attributes=attributes,
                             name=f"{name}/DequantizeLinear")
        nodes = [dequantize]
        result = dequantize.outputs[0]
        if q.shape != weights.shape:
            shape = ir.Value(name=f"{name}.shape", shape=ir.Shape([len(weights.shape)]),
                             type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.tensor(np.array(weights.shape, dtype=np.int64), name=f"{name}.shape"))
            graph.register_initializer(shape)
            reshape = ir.node("Reshape", [result, shape], name=f"{name}/Reshape")
            nodes.append(reshape)
            result = reshape.outputs[0]
        first_user = min((node for node, _ in value.uses()), key=lambda node: list(graph).index(node))
        graph.insert_before(first_user, nodes)
        result.name, result.shape, result.type = f"{name}.dequantized", value.shape, value.type
        ir.convenience.replace_all_uses_with(value, result)
        graph.initializers.pop(name)
        found.add(entry.name)
        saved_bytes += value.const_value.nbytes - q_value.const_value.nbytes - scale_value.const_value.nbytes
    missing = sorted(set(quantized) - found)
    if missing:
        raise ExportError(f"--quantize {mode}: {len(missing)} quantized weight(s) not found among the exported "
                          f"graph's initializers (first: {missing[0]})")
    return {"mode": mode, "weights_stored": len(found), "bytes_saved": int(saved_bytes)}


def fake_quantize_fp8_translation(x, scale):
    """ONNX for ce_export::fake_quantize_fp8: QuantizeLinear to FLOAT8E4M3FN (saturate) -> DequantizeLinear."""
    from onnxscript import opset20 as op

    zero_point = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, saturate=1), scale, zero_point)
