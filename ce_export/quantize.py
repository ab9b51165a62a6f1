"""Quantization with explicit QuantizeLinear / DequantizeLinear in the ONNX (TensorRT 11 is strongly typed).

Modes (`QUANTIZATIONS`): weight-only `int8` (symmetric, round to nearest) and `fp8` (E4M3, largest value
448) with one scale per output channel (per expert and output row for expert weights); weight-only
`int4` / `int4-g128` (symmetric) with one scale per group of 64 / 128 inputs (blocked
DequantizeLinear, opset 21; a row shorter than the group is one group) or `int4-channel` per output
channel; and `fp8-w8a8`: `fp8` weights plus FP8 E4M3 activations with static
per-tensor scales (calibrated amax / 448) at the input of every quantized GEMM. Quantized: the
attention, LM-head, dense-MLP, shared-expert and expert weights; routers, scalar gates (a shared
expert's sigmoid gate) and embeddings stay in float (as in the MoE compression study).

Two halves that agree exactly, by construction, both from `quantize_weight` (q and scale computed in
the artifact's dtype, scales stored in it; dequantized = what ONNX Runtime's DequantizeLinear computes
from them, q * scale rounded once to the output dtype):
- the reference: `dequantized_like_artifact` gives each quantized weight's dequantized value as the
  PyTorch reference is built (pipeline.artifact_weights); `fake_quantize_model` does the same to
  a model already built;
- the file: `store_quantized_weights` replaces each initializer holding a quantized parameter
  (export.WeightInitializer says which parameter, and in which layout: as is, transposed by the
  exporter's folding, or with `--target ort`'s interleaved expert rows) by q and scale feeding a
  DequantizeLinear. q and scale are lazy tensors: computed from the checkpoint, a few thousand rows
  at a time, when the file is written.
Expert weights [E, O, I] are stored as [E*O, I] with per-row scales and reshaped back.

Activations (`fp8-w8a8`): `ce_export::fake_quantize_fp8(x, scale)` = clamp(x / scale, +-448) ->
E4M3 (round to nearest even) -> * scale, evaluated in fp32 whatever x's dtype, which is what ONNX
Runtime's QuantizeLinear(saturate=1) -> DequantizeLinear compute; export.py translates it to that
node pair. It is applied to every nn.Linear's input (shared experts are transformers' own linear
layers; each becomes an InputQuantizedLinear holding the same parameters, in its place) and each
MoE block's hidden input to the experts (not the router input). The experts' intermediate
activation (the down-projection input) is inside the custom MoE op and stays float. Each scale is
amax / 448 of its input over calibration data in the unquantized fp32 model (`activation_ranges`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from ce_export.capture import MoeBlock, activation_sites, is_quantized_linear, replace_module
from ce_export.errors import ExportError

FP8_MAX = 448.0
QUANTIZE_ROWS_PER_CHUNK = 4096  # rows quantized at once: bounds quantize_weight's fp32 temporaries
RANGE_PERCENTILE = 99.99  # activation_ranges' p99_99: a clipping candidate, recorded beside amax


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


def is_quantized(module: nn.Module, attribute: str) -> bool:
    """Whether the quantization modes store `module`'s parameter `attribute` quantized."""
    if isinstance(module, MoeBlock):
        return attribute in ("gate_up", "down")
    return is_quantized_linear(module) and attribute == "weight"


def quantized_weight_names(lm: nn.Module):
    """(module, parameter name, qualified name) of every weight the quantization modes store quantized."""
    for module_name, module in lm.named_modules():
        for name in ("gate_up", "down", "weight"):
            if is_quantized(module, name):
                yield module, name, f"{module_name}.{name}"


def dequantized_like_artifact(weight: torch.Tensor, mode: str, artifact_dtype: torch.dtype,
                              dequantized_dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    """quantize_weight's dequantized tensor (what the artifact's DequantizeLinear computes), computed a
    few thousand rows at a time so that its fp32 temporaries stay small."""
    rows = weight.reshape(-1, weight.shape[-1])
    out = torch.empty(rows.shape, dtype=dequantized_dtype)
    for start in range(0, rows.shape[0], QUANTIZE_ROWS_PER_CHUNK):
        out[start:start + QUANTIZE_ROWS_PER_CHUNK] = quantize_weight(
            rows[start:start + QUANTIZE_ROWS_PER_CHUNK], mode, artifact_dtype, dequantized_dtype, name)[2]
    return out.reshape(weight.shape)


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
    """An nn.Linear whose input goes through fake_quantize_fp8 first. It takes the place of `linear`
    in the model and holds the same parameter objects (names, ties and storage unchanged)."""

    def __init__(self, linear: nn.Linear, input_scale: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("input_scale", input_scale, persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.ops.ce_export.fake_quantize_fp8(input, self.input_scale), self.weight, self.bias)


class ActivationRangeCollector:
    """Forward pre-hooks on every quantized GEMM input (capture.activation_sites) until `remove()`:
    per site, `amax` = max |x| over every token seen and `p99_99` = the largest per-call
    RANGE_PERCENTILE-th percentile of |x|."""

    def __init__(self, lm: nn.Module):
        self.ranges: dict[str, dict] = {}
        self.handles = []
        for name, module, kind in activation_sites(lm):
            self.ranges[name] = {"kind": kind, "amax": 0.0, "p99_99": 0.0}
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().float().abs().flatten()
            if x.numel() == 0:
                return
            entry = self.ranges[name]
            entry["amax"] = max(entry["amax"], x.max().item())
            k = max(1, min(x.numel(), math.ceil(x.numel() * RANGE_PERCENTILE / 100)))
            entry["p99_99"] = max(entry["p99_99"], x.kthvalue(k).values.item())
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def activation_ranges(lm: nn.Module, sequences: torch.Tensor, batch_size: int = 4) -> dict[str, dict]:
    """{site name: {kind, amax, p99_99}} of every quantized GEMM input of `lm` over token `sequences` [N, S]."""
    collector = ActivationRangeCollector(lm)
    try:
        for start in range(0, sequences.shape[0], batch_size):
            lm(input_ids=sequences[start:start + batch_size], use_cache=False)
    finally:
        collector.remove()
    return collector.ranges


def activation_scales(ranges: dict, dtype: torch.dtype) -> dict[str, float]:
    """{site: amax / 448} rounded to the artifact's dtype (the scale is stored in it), from
    activation_ranges."""
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
    dtype = getattr(lm, "compute_dtype", None) or next(lm.parameters()).dtype
    for name, module, kind in sites:
        scale = torch.tensor(scales[name], dtype=dtype)
        if kind == "linear":
            replace_module(lm, name, InputQuantizedLinear(module, scale))
        else:
            module.register_buffer("input_scale", scale, persistent=False)
    return len(sites)


# ---------------------------------------------------------------- the ONNX side

def quantized_parameters(lm: nn.Module) -> set[str]:
    """Names (in the captured model) of the parameters the quantization modes store quantized."""
    return {qualified for _, _, qualified in quantized_weight_names(lm)}


def quantize_rows(tensor: torch.Tensor, mode: str, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """quantize_weight's (q, scale) of `tensor` [..., O, I] in its own dtype, as numpy arrays in the
    file's formats, computed a few thousand rows at a time (every row is quantized on its own)."""
    fmt = check_mode(mode)
    rows = tensor.reshape(-1, tensor.shape[-1])
    q = np.empty(rows.shape, dtype=fmt.numpy_dtype)
    scales = []
    for start in range(0, rows.shape[0], QUANTIZE_ROWS_PER_CHUNK):
        chunk_q, chunk_scale, _ = quantize_weight(rows[start:start + QUANTIZE_ROWS_PER_CHUNK], mode, name=name)
        q[start:start + chunk_q.shape[0]] = chunk_q.numpy().astype(fmt.numpy_dtype)
        scales.append(chunk_scale)
    scale = torch.cat(scales).reshape(*tensor.shape[:-1], -1)
    return q.reshape(tensor.shape), to_numpy(scale)


class _QuantizedWeight:
    """One weight's q and scale, computed from the checkpoint when the file writer asks for q (the
    large one, written first); the small scale is kept for the writer's next request."""

    def __init__(self, weight, mode: str, layout: str):
        self.weight, self.mode, self.layout = weight, mode, layout
        self._scale: np.ndarray | None = None

    def _compute(self) -> tuple[np.ndarray, np.ndarray]:
        q, scale = quantize_rows(self.weight.stored.read().to(self.weight.dtype), self.mode, self.weight.parameter)
        return _arrange_quantized(q, scale, self.layout, FORMATS[self.mode])

    def q(self) -> np.ndarray:
        q, self._scale = self._compute()
        return q

    def scale(self) -> np.ndarray:
        scale, self._scale = self._scale, None
        return scale if scale is not None else self._compute()[1]


def _layout_name(layout: tuple, rank: int) -> str | None:
    if layout == ():
        return "rows"  # [O, I] of Gemm(transB=1), or experts [E, O, I]
    if layout == (("transpose", (1, 0)),) and rank == 2:
        return "transposed"  # MatMul(x, W^T), the transpose folded
    if layout == (("interleave",),):
        return "interleaved"  # --target ort's fc1
    return None


def _arrange_quantized(q: np.ndarray, scale: np.ndarray, layout: str, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """q [..., O, I], scale [..., O, G] -> the arrays stored for an initializer of `layout`."""
    if layout == "interleaved":
        q, scale = _interleaved(q), _interleaved(scale)
    if layout == "transposed":  # [I, O]: scales per output column (and block of inputs)
        q, scale = q.T, scale.T
        scale = scale if fmt.block else scale[0]
    else:  # [O, I] or [E, O, I] as [E*O, I]: scales per row (and block of inputs)
        q, scale = q.reshape(-1, q.shape[-1]), scale.reshape(-1, scale.shape[-1])
        scale = scale if fmt.block else scale[:, 0]
    return np.ascontiguousarray(q), np.ascontiguousarray(scale)


def _interleaved(rows: np.ndarray) -> np.ndarray:
    """[E, 2I, ...] gate rows then up rows -> g0, u0, g1, u1, ... (com.microsoft::MoE's fc1 layout)."""
    experts, two_i = rows.shape[:2]
    return rows.reshape(experts, 2, two_i // 2, *rows.shape[2:]).swapaxes(1, 2).reshape(rows.shape)


def store_quantized_weights(model: ir.Model, mode: str, weights: dict, parameters: set[str]) -> dict:
    """Replace each initializer holding one of `parameters` (export.WeightInitializer by initializer
    name says which) by its q + scale and a DequantizeLinear; q and scale are lazy tensors,
    computed from the checkpoint when the file is written."""
    fmt = check_mode(mode)
    graph = model.graph
    found, saved_bytes = set(), 0
    for name, weight in list(weights.items()):
        value = graph.initializers.get(name)
        if weight.parameter not in parameters or value is None or not value.uses():
            continue
        shape = tuple(value.shape)
        layout = _layout_name(weight.layout, len(shape))
        if layout is None:
            raise ExportError(f"--quantize {mode}: {weight.parameter} is stored as {weight.layout}, "
                              f"which has no quantized form")
        columns = weight.stored.shape[-1]
        group = min(fmt.block, columns) if fmt.block else columns
        if columns % group:
            raise ExportError(f"--quantize {mode}: {weight.parameter} has {columns} inputs per row, not a multiple "
                              f"of the group size {group}")
        rows = int(np.prod(weight.stored.shape[:-1]))
        groups = columns // group
        if layout == "transposed":
            q_shape, scale_shape = (columns, rows), ((groups, rows) if fmt.block else (rows,))
            axis = 0 if fmt.block else 1
        else:
            q_shape, scale_shape = (rows, columns), ((rows, groups) if fmt.block else (rows,))
            axis = 1 if fmt.block else 0
        pair = _QuantizedWeight(weight, mode, layout)
        q_type = ir.DataType.from_numpy(np.dtype(fmt.numpy_dtype))
        q_value = ir.Value(name=f"{name}.{mode}", shape=ir.Shape(q_shape), type=ir.TensorType(q_type),
                           const_value=ir.LazyTensor(lambda pair=pair, n=f"{name}.{mode}": ir.tensor(pair.q(), name=n),
                                                     dtype=q_type, shape=ir.Shape(q_shape), name=f"{name}.{mode}"))
        scale_value = ir.Value(name=f"{name}.scale", shape=ir.Shape(scale_shape), type=value.type,
                               const_value=ir.LazyTensor(lambda pair=pair, n=f"{name}.scale": ir.tensor(pair.scale(), name=n),
                                                         dtype=value.type.dtype, shape=ir.Shape(scale_shape),
                                                         name=f"{name}.scale"))
        graph.register_initializer(q_value)
        graph.register_initializer(scale_value)
        attributes = {"axis": axis, **({"block_size": group} if fmt.block else {})}
        dequantize = ir.node("DequantizeLinear", [q_value, scale_value], attributes=attributes,
                             name=f"{name}/DequantizeLinear")
        nodes = [dequantize]
        result = dequantize.outputs[0]
        if q_shape != shape:
            shape_value = ir.Value(name=f"{name}.shape", shape=ir.Shape([len(shape)]),
                                   type=ir.TensorType(ir.DataType.INT64),
                                   const_value=ir.tensor(np.array(shape, dtype=np.int64), name=f"{name}.shape"))
            graph.register_initializer(shape_value)
            reshape = ir.node("Reshape", [result, shape_value], name=f"{name}/Reshape")
            nodes.append(reshape)
            result = reshape.outputs[0]
        first_user = min((node for node, _ in value.uses()), key=lambda node: list(graph).index(node))
        graph.insert_before(first_user, nodes)
        result.name, result.shape, result.type = f"{name}.dequantized", value.shape, value.type
        ir.convenience.replace_all_uses_with(value, result)
        graph.initializers.pop(name)
        del weights[name]
        found.add(weight.parameter)
        saved_bytes += value.const_value.nbytes - q_value.const_value.nbytes - scale_value.const_value.nbytes
    missing = sorted(parameters - found)
    if missing:
        raise ExportError(f"--quantize {mode}: {len(missing)} quantized weight(s) not found among the exported "
                          f"graph's initializers (first: {missing[0]})")
    return {"mode": mode, "weights_stored": len(found), "bytes_saved": int(saved_bytes)}


def fake_quantize_fp8_translation(x, scale):
    """ONNX for ce_export::fake_quantize_fp8: QuantizeLinear to FLOAT8E4M3FN (saturate) -> DequantizeLinear."""
    from onnxscript import opset20 as op

    zero_point = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, saturate=1), scale, zero_point)


ACTIVATION_SCALE_SUFFIX = ".input_scale"  # each FP8 quantizer's scale: the initializer "<module path>.input_scale"


def activation_scale_inputs(model: ir.Model) -> dict[ir.Node, str]:
    """Each FP8 activation Quantize/DequantizeLinear node -> the name of its scale initializer, as
    exported (one per quantized module), for restore_activation_scales."""
    return {node: node.inputs[1].name for node in model.graph
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.inputs[1] is not None
            and (node.inputs[1].name or "").endswith(ACTIVATION_SCALE_SUFFIX)}


def restore_activation_scales(model: ir.Model, scale_inputs: dict[ir.Node, str]) -> None:
    """Give every FP8 quantizer back its own scale initializer. onnxscript's optimizer merges
    initializers of equal value, and two sites' scales are often equal once rounded to bf16: the
    file would then name one site's scale at another site's quantizer, and whatever reads the
    scales by name (synchronized parity, a user's calibration tooling) would take it for that
    site's."""
    graph = model.graph
    for node, name in scale_inputs.items():
        if node.graph is not graph or node.inputs[1].name == name:
            continue  # removed as a duplicate (CSE), or still its own
        scale = graph.initializers.get(name)
        if scale is None:
            shared = node.inputs[1]
            scale = ir.Value(name=name, shape=shared.shape, type=shared.type,
                             const_value=ir.tensor(shared.const_value.numpy(), name=name))
            graph.register_initializer(scale)
        node.replace_input_with(1, scale)
