"""Weight-only quantization with explicit DequantizeLinear in the ONNX (TensorRT 11 is strongly typed).

Modes: `int8` (symmetric, round to nearest) and `fp8` (E4M3, the format's largest value 448), one
scale per output channel (per expert and output row for expert weights), for the attention,
LM-head, shared-expert and expert weights; routers and embeddings stay in float (as in the MoE
compression study).

Two halves that must agree exactly:
- `fake_quantize_model` rounds the PyTorch model's weights to their grid (W <- q * s), so the
  captured model is the reference the exported artifact is checked against;
- `store_quantized_weights` replaces each such float initializer of the exported graph by the
  quantized values and scales feeding a DequantizeLinear. Re-quantizing an already-rounded weight
  gives back the same q and s, because every output channel's largest value sits exactly on the
  format's largest value.
Expert weights [E, O, I] are stored as [E*O, I] with per-row scales (DequantizeLinear per-axis,
opset 13+) and reshaped back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from dataclasses import dataclass

from ce_export.capture import MoeBlock, SharedExpert
from ce_export.errors import ExportError

import ml_dtypes


@dataclass(frozen=True)
class Format:
    largest: float
    numpy_dtype: object
    torch_dtype: torch.dtype | None  # None: integer rounding
    block: int | None = None  # scales per group of this many inputs (None: per output channel)
    opset: int = 20  # the default-domain opset DequantizeLinear needs for this format


FORMATS = {
    "int8": Format(127.0, np.int8, None),
    "fp8": Format(448.0, ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
    "int4": Format(7.0, ml_dtypes.int4, None, block=64, opset=21),  # blocked DequantizeLinear: opset 21
}
QUANTIZATIONS = tuple(FORMATS)
# Input positions of the expert weights: ce_export nodes (gate_up, down), com.microsoft::MoE (fc1, fc2).
EXPERT_WEIGHT_INPUTS = {"ce_export": (2, 3), "com.microsoft": (2, 4)}


def rounded_to_grid(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """W rounded to the format's grid with one scale per row, or per block of a row (last axis)."""
    fmt = FORMATS[mode]
    columns = weight.shape[-1]
    group = fmt.block or columns
    if columns % group:
        raise ExportError(f"{mode} quantization needs input sizes divisible by {group}, got {columns}")
    grouped = weight.float().reshape(*weight.shape[:-1], columns // group, group)
    scale = grouped.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fmt.largest
    scaled = (grouped / scale).clamp(-fmt.largest, fmt.largest)
    q = scaled.round() if fmt.torch_dtype is None else scaled.to(fmt.torch_dtype).float()
    return (q * scale).reshape(weight.shape).to(weight.dtype)


def int8_grid(weight: torch.Tensor) -> torch.Tensor:
    return rounded_to_grid(weight, "int8")


def fake_quantize_model(lm: nn.Module, mode: str) -> int:
    """Round every weight that `store_weights_as_int8` stores to its int8 grid; returns how many.

    Parameters are replaced, not written in place: they may share storage with the loaded checkpoint.
    """
    if mode not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {mode!r} (choose from {', '.join(QUANTIZATIONS)})")
    rounded = 0
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, (MoeBlock, SharedExpert)):
                names = ("gate_up", "down")
            elif isinstance(module, nn.Linear):
                names = ("weight",)
            else:
                continue
            for name in names:
                setattr(module, name, nn.Parameter(rounded_to_grid(getattr(module, name), mode), requires_grad=False))
                rounded += 1
    return rounded


def quantize_rows(values: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """[R, C] float -> (q [R, C] in the format, scale [R] or [R, C / block]) with values ~= q * scale."""
    fmt = FORMATS[mode]
    rows, columns = values.shape
    group = fmt.block or columns
    grouped = values.reshape(rows, columns // group, group)
    scale = (np.maximum(np.abs(grouped).max(axis=2), 1e-12) / fmt.largest).astype(np.float32)
    scaled = np.clip(grouped / scale[:, :, None], -fmt.largest, fmt.largest).reshape(rows, columns)
    if fmt.torch_dtype is None:
        scaled = np.rint(scaled)
    return scaled.astype(fmt.numpy_dtype), (scale if fmt.block else scale[:, 0])


def store_quantized_weights(model: ir.Model, mode: str) -> dict:
    """Replace expert weights (inputs of MoE nodes) and MatMul weights by `mode` values + DequantizeLinear."""
    graph = model.graph
    stored, saved_bytes = 0, 0
    for value in list(graph.initializers.values()):
        if value.const_value is None or not value.uses():
            continue
        consumers = {(node.domain, node.op_type, index) for node, index in value.uses()}
        matmul_weight = consumers == {("", "MatMul", 1)} and len(value.shape) == 2
        expert_weight = len(value.shape) == 3 and all(
            index in EXPERT_WEIGHT_INPUTS.get(domain, ()) for domain, _, index in consumers)
        if not (matmul_weight or expert_weight):
            continue
        weights = value.const_value.numpy()
        float_dtype = weights.dtype
        block = FORMATS[mode].block
        if matmul_weight:  # [in, out]: scales per output column (and block of inputs)
            q, scale = quantize_rows(weights.astype(np.float32).T, mode)
            q, scale, axis = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), 0 if block else 1
        else:  # [E, O, I] as [E*O, I]: scales per expert and output row (and block of inputs)
            q, scale = quantize_rows(weights.astype(np.float32).reshape(-1, weights.shape[-1]), mode)
            axis = 1 if block else 0
        name = value.name
        stored_tensor = ir.tensor(q, name=f"{name}.{mode}")
        q_value = ir.Value(name=f"{name}.{mode}", shape=ir.Shape(q.shape), type=ir.TensorType(stored_tensor.dtype),
                           const_value=stored_tensor)
        scale_value = ir.Value(name=f"{name}.scale", shape=ir.Shape(scale.shape),
                               type=ir.TensorType(ir.DataType.from_numpy(np.dtype(float_dtype))),
                               const_value=ir.tensor(scale.astype(float_dtype), name=f"{name}.scale"))
        graph.register_initializer(q_value)
        graph.register_initializer(scale_value)
        attributes = {"axis": axis, **({"block_size": block} if block else {})}
        dequantize = ir.node("DequantizeLinear", [q_value, scale_value], attributes=attributes,
                             name=f"{name}/DequantizeLinear")
        nodes = [dequantize]
        result = dequantize.outputs[0]
        if expert_weight:
            shape = ir.Value(name=f"{name}.shape", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64),
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
        stored += 1
        stored_bytes = q.size // 2 if mode == "int4" else q.nbytes  # int4 is packed two per byte on disk
        saved_bytes += weights.nbytes - stored_bytes - scale.astype(float_dtype).nbytes
    return {"mode": mode, "weights_stored": stored, "bytes_saved": int(saved_bytes)}
