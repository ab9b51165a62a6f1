"""How verify runs an artifact whose precision ONNX Runtime CPU cannot execute.

ONNX Runtime's CPU provider has fp32 and fp16 kernels for our graphs but no bf16 kernels (Where,
MatMul, ...). A bf16 artifact is therefore checked through an fp32 view of the same file: every
bf16 tensor type, initializer, constant and Cast target becomes fp32 (bf16 -> fp32 is exact), so
the graph structure and every stored weight are checked, while the arithmetic is fp32. The
reference then uses the same bf16-rounded weights in fp32. parity.json says so in "numerics".
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

BF16, FP32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT


class OnnxPrecisionView:
    def __init__(self, onnx_path: Path, dtype_name: str):
        self.onnx_path = Path(onnx_path)
        self.dtype_name = dtype_name
        self.emulated = dtype_name == "bf16"
        self._tmp: Path | None = None

    @property
    def runtime_torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.float32}[self.dtype_name]

    @property
    def numerics_note(self) -> str:
        if self.emulated:
            return ("bf16 weights and graph, fp32 arithmetic: ONNX Runtime CPU has no bf16 kernels, so the artifact "
                    "runs through an fp32 view; bf16 arithmetic is exercised only by GPU runtimes")
        return f"{self.dtype_name} arithmetic in ONNX Runtime"

    def path_for_runtime(self) -> Path:
        if not self.emulated:
            return self.onnx_path
        model = ir.load(self.onnx_path)
        widen_bf16(model)
        self._tmp = Path(tempfile.mkdtemp(prefix="ce_export_fp32_view_"))
        path = self._tmp / "model_fp32_view.onnx"
        ir.save(model, path, external_data="model_fp32_view.onnx.data")
        return path

    def round_weights_like_export(self, lm: torch.nn.Module) -> torch.nn.Module:
        """Round every parameter to bf16 and back; parameters are replaced, not written in place,
        since they may share storage with the loaded checkpoint."""
        with torch.no_grad():
            for module in lm.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, torch.nn.Parameter(param.to(torch.bfloat16).float(), requires_grad=False))
        return lm

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def widen_bf16(model: ir.Model) -> None:
    for init in model.graph.initializers.values():
        widen_value(init)
    for graph in [model.graph, *model.functions.values()]:
        for value in [*graph.inputs, *graph.outputs]:
            widen_value(value)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.outputs:
                widen_value(value)
            if node.op_type == "Cast" and node.attributes["to"].as_int() == BF16.value:
                node.attributes["to"] = ir.AttrInt64("to", FP32.value)
            constant = node.attributes.get("value") if node.op_type == "Constant" else None
            if constant is not None and constant.as_tensor().dtype == BF16:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(constant.as_tensor().numpy().astype(np.float32)))


def widen_value(value: ir.Value) -> None:
    if value.type is not None and isinstance(value.type, ir.TensorType) and value.type.dtype == BF16:
        value.type = ir.TensorType(FP32)
    if value.const_value is not None and value.const_value.dtype == BF16:
        value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
