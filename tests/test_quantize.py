"""Weight-only int8: explicit DequantizeLinear in the ONNX, exact against the fake-quantized reference."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ce_export import pipeline
from ce_export.cli import main
from ce_export.quantize import int8_grid

QUIET = dict(report=lambda line: None)


@pytest.mark.parametrize("mode", ["fp8", "int4"])
def test_grid_is_idempotent(mode):
    import torch

    from ce_export.quantize import rounded_to_grid

    weight = torch.randn(4, 9, 128)
    rounded = rounded_to_grid(weight, mode)
    assert torch.equal(rounded_to_grid(rounded, mode), rounded)
    assert not torch.equal(rounded, weight)


def test_int8_grid_puts_each_rows_largest_value_on_127():
    import torch

    weight = torch.randn(6, 5, 7)
    rounded = int8_grid(weight)
    scale = weight.abs().amax(-1, keepdim=True) / 127
    q = rounded / scale
    assert torch.allclose(q, q.round(), atol=1e-4) and torch.allclose(q.abs().amax(-1), torch.full((6, 5), 127.0))
    assert torch.equal(int8_grid(rounded), rounded)  # idempotent: re-quantizing the stored weights is exact


STORED_TYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN, "int4": onnx.TensorProto.INT4}


@pytest.mark.parametrize("checkpoint,target,mode", [("demo_ce", "portable", "int8"), ("demo_plain", "ort", "int8"),
                                                    ("demo_ce", "portable", "fp8"), ("demo_ce", "portable", "int4")])
def test_quantized_build_matches_its_reference_and_reports_quality(checkpoint, target, mode, request, tmp_path, demo_build):
    out = tmp_path / mode
    manifest = pipeline.build(str(request.getfixturevalue(checkpoint)), out,
                              pipeline.BuildOptions(target=target, quantize=mode), **QUIET)
    assert manifest["quantization"]["weights_stored"] == 25  # 16 attention, 8 expert, LM head
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 25
    inits = {i.name: i for i in model.graph.initializer}
    assert all(inits[n.input[0]].data_type == STORED_TYPE[mode] for n in dequantize)
    router = [i for i in inits if i.endswith("mlp.router")]
    assert router and all(numpy_helper.to_array(inits[r]).dtype == np.float32 for r in router)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["quantization"] == mode and parity["logits"]["max_rel"] <= 1e-4
    quality = parity["quality"]
    assert quality["perplexity_onnx"] > 0 and quality["perplexity_delta"] == pytest.approx(
        quality["perplexity_onnx"] - quality["perplexity_torch_fp32"])
    assert quality["onnx_bytes"] < {"int4": 0.4, "int8": 0.6, "fp8": 0.6}[mode] * (demo_build / "model.onnx").stat().st_size
    if mode == "int4":
        assert manifest["onnx"]["opset"] == 21
        assert {a.name: a.i for a in dequantize[0].attribute}["block_size"] == 64


def test_quantize_needs_fp32(tmp_path, capsys):
    code = main(["build", "demo", "--out", str(tmp_path / "o"), "--quantize", "int8", "--dtype", "fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--dtype fp32" in err[0]
    assert not (tmp_path / "o").exists()
