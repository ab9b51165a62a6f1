"""How verify runs an artifact whose precision ONNX Runtime CPU cannot execute.

ONNX Runtime's CPU provider has fp32 and fp16 kernels for our graphs but no bf16 arithmetic (MatMul,
Where, ...). A bf16 artifact is therefore checked through an fp32 view of the same file: the
arithmetic is fp32, while every stored weight is read from the artifact itself, as stored, in bf16.
The view (functions inlined, so that the function bodies can be rewritten too):
- keeps every bf16 weight (initializers over 4 KiB; smaller ones, such as scales, are copied to
  fp32), and every value derived from one by data movement only (Gather, Split, Reshape, Transpose,
  Slice, ...: ops ONNX Runtime runs in bf16; and the slices a Scan hands its body, so that the
  sparse experts form casts one expert's weights per iteration), in bf16;
- casts such a value to fp32 right where an arithmetic op consumes it (bf16 -> fp32 is exact), so
  only the weights one op uses exist in fp32 at a time, never an fp32 copy of the model;
- turns every other bf16 type, Cast target and constant (Constant, ConstantOfShape's fill value)
  into fp32.
The view is handed to ONNX Runtime from memory and refers to the artifact's own external-data file,
so nothing is copied. ONNX Runtime must not fold the casts of the weights into fp32 initializers:
verify's sessions disable constant folding (runners.OrtRunner). The reference then uses the same
bf16-rounded weights in fp32. parity.json says so in "numerics".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch

from ce_export.dtypes import DTYPES

BF16, FP32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
# Ops that only move data, with the inputs whose data they move: ONNX Runtime's CPU provider runs
# these in bf16 (checked one by one on onnxruntime 1.32), so weights stay bf16 through them.
DATA_MOVEMENT = {"Gather": 0, "GatherElements": 0, "Split": 0, "Reshape": 0, "Transpose": 0, "Slice": 0,
                 "Squeeze": 0, "Unsqueeze": 0, "Flatten": 0, "Identity": 0}
SHAPE_ONLY = {"Shape", "Size"}  # read a tensor's shape, not its values
WIDEN_UP_TO_BYTES = 4096  # smaller bf16 initializers (scalars, scales, norms) are simply copied to fp32


class OnnxPrecisionView:
    def __init__(self, onnx_path: Path, dtype_name: str):
        self.onnx_path = Path(onnx_path)
        self.dtype_name = dtype_name
        self.emulated = dtype_name == "bf16"

    @property
    def runtime_torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.emulated else DTYPES[self.dtype_name]

    @property
    def round_to(self) -> torch.dtype | None:
        """The dtype the reference's weights are rounded to, to hold what the artifact holds."""
        return torch.bfloat16 if self.emulated else None

    @property
    def numerics_note(self) -> str:
        if self.emulated:
            return ("bf16 weights and graph, fp32 arithmetic: ONNX Runtime CPU has no bf16 kernels, so the artifact "
                    "runs through an fp32 view (weights read in bf16 from the artifact, cast to fp32 where used); "
                    "bf16 arithmetic is exercised only by GPU runtimes")
        return f"{self.dtype_name} arithmetic in ONNX Runtime"

    def model_for_runtime(self) -> Path | ir.Model:
        """The artifact's path, or its fp32 view (an onnx_ir model whose weights stay in the artifact's
        external-data file; runners.OrtRunner opens either)."""
        if not self.emulated:
            return self.onnx_path
        model = ir.load(self.onnx_path)  # external weights stay on disk
        widen_bf16(model)
        return model


def widen_bf16(model: ir.Model) -> None:
    """Rewrite `model` (in place) into the fp32 view described in the module docstring."""
    common_passes.InlinePass()(model)
    kept = keep_weights_bf16(model)
    for value in model.graph.initializers.values():
        if value not in kept:
            widen_value(value)
    for graph in [model.graph, *model.functions.values()]:
        for value in [*graph.inputs, *graph.outputs]:
            if value not in kept:
                widen_value(value)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.outputs:
                if value not in kept:
                    widen_value(value)
            if node.op_type == "Cast" and node.attributes["to"].as_int() == BF16.value:
                node.attributes["to"] = ir.AttrInt64("to", FP32.value)
            constant = node.attributes.get("value") if node.op_type in ("Constant", "ConstantOfShape") else None
            if constant is not None and constant.as_tensor().dtype == BF16:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(constant.as_tensor().numpy().astype(np.float32)))


def keep_weights_bf16(model: ir.Model) -> set[ir.Value]:
    """Leave the bf16 initializers, and what data movement makes of them, in bf16; cast each to fp32
    just before each op that computes with it. Returns the values left in bf16."""
    kept: set[ir.Value] = set()
    pending = [value for value in model.graph.initializers.values()
               if value.const_value is not None and value.const_value.dtype == BF16
               and value.const_value.nbytes > WIDEN_UP_TO_BYTES]
    casts = 0

    def cast_to_fp32(value: ir.Value) -> ir.Node:
        nonlocal casts
        casts += 1  # names unique in the whole model: ONNX Runtime checks them across subgraphs
        cast = ir.node("Cast", [value], attributes={"to": FP32.value}, name=f"fp32_view/Cast_{casts}")
        output = cast.outputs[0]
        output.name, output.type, output.shape = f"fp32_view.{casts}", ir.TensorType(FP32), value.shape
        return cast

    while pending:
        value = pending.pop()
        if value in kept:
            continue
        kept.add(value)
        for node, index in list(value.uses()):
            if node.domain == "" and node.op_type in SHAPE_ONLY:
                continue
            if node.domain == "" and DATA_MOVEMENT.get(node.op_type) == index:
                pending.extend(node.outputs)
                continue
            body_input = scanned_in_body(node, index)
            if body_input is not None:  # each iteration's slice is cast in the body: one expert at a time
                body_input.type = ir.TensorType(BF16)
                pending.append(body_input)
                continue
            cast = cast_to_fp32(value)
            node.graph.insert_before(node, cast)
            node.replace_input_with(index, cast.outputs[0])
    for graph in graphs_of(model):  # a bf16 value a (sub)graph returns is cast on the way out
        for position, output in enumerate(graph.outputs):
            if output in kept:
                cast = cast_to_fp32(output)
                graph.append(cast)
                name, output.name = output.name, None
                graph.outputs[position] = cast.outputs[0]
                cast.outputs[0].name = name
    return kept


def scanned_in_body(node: ir.Node, index: int) -> ir.Value | None:
    """The body input that receives the slices of a Scan's scan input `index` (Scan slices its scan
    inputs without copying them: data movement), or None."""
    if node.domain != "" or node.op_type != "Scan":
        return None
    first_scan_input = len(node.inputs) - node.attributes["num_scan_inputs"].as_int()
    if index < first_scan_input or node.attributes.get("scan_input_axes") is not None:
        return None
    return node.attributes["body"].as_graph().inputs[index]


def graphs_of(model: ir.Model):
    yield model.graph
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                yield attribute.value
            elif attribute.type == ir.AttributeType.GRAPHS:
                yield from attribute.value


def widen_value(value: ir.Value) -> None:
    if value.type is not None and isinstance(value.type, ir.TensorType) and value.type.dtype == BF16:
        value.type = ir.TensorType(FP32)
    if value.const_value is not None and value.const_value.dtype == BF16:
        value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
