"""Quantization: explicit Q/DQ in the ONNX, checked against a reference that dequantizes exactly like it."""

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from checkpoints import demo_resized
from ce_export import ort_support, pipeline, verify
from ce_export.cli import main
from ce_export.errors import VerifyError
from ce_export.manifest import recorded_files
from ce_export.quantize import FORMATS, QUANTIZATIONS, quantize_weight

QUIET = dict(report=lambda line: None)
ROOT = Path(__file__).resolve().parent.parent
STORED_TYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN,
               "fp8-w8a8": onnx.TensorProto.FLOAT8E4M3FN, "int4": onnx.TensorProto.INT4,
               "int4-g128": onnx.TensorProto.INT4, "int4-channel": onnx.TensorProto.INT4}
FLOAT_TYPE = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


@pytest.fixture(scope="session")
def demo_h256(tmp_path_factory):
    """The demo with hidden size 256: the attention and gate/up projections have two int4-g128 groups per row."""
    return demo_resized(tmp_path_factory.mktemp("ckpt") / "demo_h256", hidden_size=256)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"Sample {i}: a user's own calibration text, line {i * 7 % 13}." for i in range(48)))
    return path


def on_grid(weight, mode):
    """The weight the PyTorch reference holds: q * scale on `mode`'s grid."""
    return quantize_weight(weight, mode)[2]


@pytest.mark.parametrize("mode", ["fp8", "int4", "int4-g128", "int4-channel"])
def test_grid_is_idempotent(mode):
    weight = torch.randn(4, 9, 256)
    rounded = on_grid(weight, mode)
    assert torch.equal(on_grid(rounded, mode), rounded)
    assert not torch.equal(rounded, weight)


def test_int8_grid_puts_each_rows_largest_value_on_127():
    weight = torch.randn(6, 5, 7)
    rounded = on_grid(weight, "int8")
    scale = weight.abs().amax(-1, keepdim=True) / 127
    q = rounded / scale
    assert torch.allclose(q, q.round(), atol=1e-4) and torch.allclose(q.abs().amax(-1), torch.full((6, 5), 127.0))
    assert torch.equal(on_grid(rounded, "int8"), rounded)  # idempotent: re-quantizing the stored weights is exact


def ort_run(nodes, inputs, outputs, initializers=(), feeds=None):
    import onnxruntime as ort

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                              ir_version=ort_support.ir_version_for_runtime(onnx.IR_VERSION, {"": 21}))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds or {})


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_weights_equal_onnx_runtime_dequantize_linear(mode, dtype):
    """q * scale with scales in the artifact dtype, as ONNX Runtime's DequantizeLinear computes it."""
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(0)) * 0.2
    q, scale, dequantized = quantize_weight(weight, mode, dtype)
    block = FORMATS[mode].block
    q_np = q.numpy().astype(FORMATS[mode].numpy_dtype)
    attributes = dict(axis=1, block_size=block) if block else dict(axis=0)
    scale_np = scale.numpy() if block else scale[:, 0].numpy()
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(scale_np.dtype))
    (out,) = ort_run([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], **attributes)], [],
                     [helper.make_tensor_value_info("y", elem, None)],
                     [numpy_helper.from_array(q_np, "q"), numpy_helper.from_array(scale_np, "s")])
    assert scale.dtype == dtype and dequantized.dtype == dtype
    assert np.array_equal(out, dequantized.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fake_quantize_fp8_op_equals_onnx_runtime_q_dq(dtype):
    from ce_export import quantize  # noqa: F401  (registers the op)

    x = (np.random.default_rng(0).standard_normal(100_000) * 3).astype(dtype)
    x[:4] = [1000, -1000, 0.0, 15.5 * 0.0137]  # saturation both ways, zero, a midpoint
    scale = np.array(0.0137, dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    zero = numpy_helper.from_array(np.zeros((), dtype=ml_dtypes.float8_e4m3fn), "zp")
    (out,) = ort_run([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], saturate=1),
                      helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
                     [helper.make_tensor_value_info("x", elem, None), helper.make_tensor_value_info("s", elem, [])],
                     [helper.make_tensor_value_info("y", elem, None)], [zero], {"x": x, "s": scale})
    mine = torch.ops.ce_export.fake_quantize_fp8(torch.from_numpy(x), torch.from_numpy(scale)).numpy()
    assert np.array_equal(out, mine)
    assert abs(mine[0]) == pytest.approx(448 * 0.0137, rel=1e-3)


BUILDS = [  # checkpoint, target, mode, dtype
    ("demo_ce", "portable", "int8", "fp32"), ("demo_plain", "ort", "int8", "fp32"),
    ("demo_ce", "portable", "fp8", "fp32"), ("demo_ce", "portable", "int4", "fp32"),
    ("demo_h256", "portable", "int4-g128", "fp32"), ("demo_ce", "portable", "fp8-w8a8", "fp32"),
    ("demo_ce", "portable", "int4-g128", "fp32"), ("demo_ce", "portable", "int4-channel", "fp32"),
    ("demo_ce", "portable", "int8", "fp16"), ("demo_ce", "portable", "fp8", "fp16"),
    ("demo_ce", "portable", "fp8-w8a8", "fp16"), ("demo_ce", "portable", "int4", "bf16"),
    ("demo_ce", "portable", "fp8-w8a8", "bf16"),  # the trained demo's scales: several equal once in bf16
]
ACTIVATION_SITES = 21  # per layer q, k, v, o projections and the experts' input; the LM head


def test_every_mode_is_built_by_the_acceptance_tests():
    assert {mode for checkpoint, _, mode, dtype in BUILDS if dtype == "fp32" and checkpoint != "demo_h256"} \
        == set(QUANTIZATIONS)  # the issue's acceptance: every mode on the demo model itself


@pytest.mark.parametrize("checkpoint,target,mode,dtype", BUILDS)
def test_quantized_build_matches_its_reference_and_reports_quality(checkpoint, target, mode, dtype, request, tmp_path):
    out = tmp_path / mode
    pipeline.build(str(request.getfixturevalue(checkpoint)), out,
                   pipeline.BuildOptions(target=target, quantize=mode, dtype=dtype), **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["weights_stored"] == 25  # 16 attention, 8 expert, LM head
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dequantize if n.input[0] in inits and inits[n.input[0]].data_type == STORED_TYPE[mode]]
    assert len(weights) == 25
    assert all(inits[n.input[1]].data_type == FLOAT_TYPE[dtype] for n in weights)  # scales in the model dtype
    router = [i for i in inits if i.endswith(".router")]
    assert router and all(inits[r].data_type == FLOAT_TYPE[dtype] for r in router)
    block = FORMATS[mode].block
    if block:
        assert manifest["onnx"]["opset"] == 21
        assert {a.name: a.i for a in weights[0].attribute}["block_size"] == block

    parity = json.loads((out / "parity.json").read_text())
    tolerance = verify.TOLERANCES[dtype]
    assert parity["passed"] and parity["quantization"] == mode and parity["dtype"] == dtype
    assert (parity["logits"]["statistic"], parity["logits"]["threshold"]) == (tolerance.statistic, tolerance.threshold)
    if dtype == "fp32":
        assert parity["logits"]["max_rel"] <= 1e-4  # exact up to float summation order
    if FORMATS[mode].activations:  # checked synchronized at each FP8 quantizer; free-running reported
        assert len(parity["logits"]["synchronized_at_fp8_quantizers"]) == 13  # q/k/v share one
        quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert len({n.input[1] for n in quantizers}) == len(quantizers) == 13  # each its own scale
        assert all(n.input[1].endswith(".input_scale") for n in quantizers)
        assert any(name.startswith("fp8 input of") for name in parity["logits"]["cases"][0]["outputs"])
        assert parity["generation"]["synchronized_at_fp8_quantizers"] and "free_running" in parity
    else:
        assert "free_running" not in parity
    quality = parity["quality"]
    if checkpoint == "demo_h256":  # random weights, no task: perplexity on the built-in corpus
        assert quality["data"]["source"] == "builtin" and "task" not in quality
    else:  # the trained demo: exact match on its task in ONNX Runtime, beside unquantized PyTorch fp32's
        task = quality["task"]
        assert quality["data"]["kind"] == "the checkpoint's task (held-out problems)" and task["problems"] == 300
        assert task["accuracy_torch_fp32"] >= 0.9 and 0 <= task["accuracy_onnx"] <= 1
    assert quality["perplexity_onnx"] > 0 and quality["perplexity_delta"] == pytest.approx(
        quality["perplexity_onnx"] - quality["perplexity_torch_fp32"])
    parameters = manifest["parameters"]
    assert quality["parameters"] == parameters and parameters["active_per_token"] < parameters["total"]
    unquantized = 4 * parameters["total"]  # this model's weights in fp32
    assert quality["weight_bytes"] == parameters["weight_bytes"] < {"int4": 0.25, "int4-g128": 0.3, "int4-channel": 0.25}.get(mode, 0.35) * unquantized
    assert quality["onnx_bytes"] >= quality["weight_bytes"]


def test_fp8_activations_with_user_calibration_data(demo_ce, calib_text, tmp_path, capsys):
    out = tmp_path / "w8a8"
    assert main(["build", str(demo_ce), "--out", str(out), "--quantize", "fp8-w8a8", "--calib", str(calib_text)]) == 0
    assert "parity PASSED (fp32, fp8-w8a8" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    activations = manifest["quantization"]["activations"]
    assert "intermediate" in activations["quantized"] and "router" in activations["quantized"]
    assert str(calib_text.absolute()) in activations["calibration"]
    scales, ranges = activations["scales"], activations["ranges"]
    assert len(scales) == ACTIVATION_SITES and set(scales) == set(ranges)
    for name, scale in scales.items():
        assert scale == float(np.float32(ranges[name]["amax"] / 448))
    assert manifest["calibration_data"]["source"] == str(calib_text.absolute())

    model = onnx.load(out / "model.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all({a.name: a.i for a in n.attribute}["saturate"] == 1 for n in quantize)
    assert all(inits[n.input[2]].dtype == ml_dtypes.float8_e4m3fn for n in quantize)
    used = {n.input[1].removeprefix("lm.").removesuffix(".input_scale") for n in quantize}
    shared = {name for name in scales if name.endswith(("k_proj", "v_proj"))}
    assert used == set(scales) - shared  # k and v use q's QuantizeLinear (same input, same scale)
    assert all(scales[name] == scales[name[:-6] + "q_proj"] for name in shared)
    for n in quantize:
        assert float(inits[n.input[1]]) == scales[n.input[1].removeprefix("lm.").removesuffix(".input_scale")]
    for moe in [n for n in model.graph.node if n.domain == "ce_export"]:
        assert producer[moe.input[0]].op_type == "DequantizeLinear"  # the experts' input: FP8
        router = producer[moe.input[1]]  # the router logits: a float GEMM of the unquantized hidden
        assert router.input[1].endswith(".router") and producer[router.input[0]].op_type != "DequantizeLinear"

    parity = json.loads((out / "parity.json").read_text())
    assert parity["logits"]["statistic"] == "max_rel" and parity["logits"]["worst"] <= 1e-4  # synchronized
    assert parity["quality"]["data"] == {"source": str(calib_text.absolute()), "kind": "user data (--calib)",
                                         "tokenizer": parity["quality"]["data"]["tokenizer"]}
    assert "8 x 64 held-out tokens" in parity["quality"]["evaluation"]
    again = pipeline.verify(out, **QUIET)  # the reference is rebuilt from the manifest's scales alone
    assert again.passed and again.logits.worst == parity["logits"]["worst"]

    # A file with one quantizer bypassed fails, although later quantizers hide it from the outputs.
    import onnx_ir as ir

    broken = ir.load(out / "model.onnx")
    q = next(n for n in broken.graph if n.op_type == "QuantizeLinear"
             and n.inputs[1].name == "lm.model.layers.1.self_attn.o_proj.input_scale")
    dq = next(node for node, _ in q.outputs[0].uses())
    ir.convenience.replace_all_uses_with(dq.outputs[0], q.inputs[0])
    ir.save(broken, out / "model.onnx")
    # as if the build had written it so (a wrong export, not an edit, which the file record catches first)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["onnx"]["files"] = recorded_files(out, list(manifest["onnx"]["files"]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="parity FAILED"):
        pipeline.verify(out, **QUIET)
    worst = json.loads((out / "parity.json").read_text())["logits"]["cases"][-1]["outputs"]
    assert worst["fp8 input of model.layers.1.mlp.experts"]["max_rel"] > 1e-3


def test_fp8_activations_replace_the_linear_modules_of_this_model_only(demo_ce):
    """quantize_activations puts a new module in each nn.Linear's place, holding the same parameters;
    the old modules and nn.Linear itself are unchanged."""
    from torch import nn

    from ce_export.capture import build_torch_model
    from ce_export.load import load_checkpoint
    from ce_export.quantize import InputQuantizedLinear, activation_ranges, activation_scales, quantize_activations

    lm = build_torch_model(load_checkpoint(demo_ce))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    scales = activation_scales(activation_ranges(lm, ids), torch.float32)
    linear_forward, old = nn.Linear.forward, dict(lm.named_modules())
    with torch.no_grad():
        unquantized = lm(ids).logits
        assert quantize_activations(lm, scales) == ACTIVATION_SITES
        quantized = lm(ids).logits
    assert nn.Linear.forward is linear_forward
    for name, module in lm.named_modules():
        if isinstance(module, InputQuantizedLinear):
            assert type(old[name]) is nn.Linear and module is not old[name]
            assert module.weight is old[name].weight and module.bias is old[name].bias
            assert module.input_scale.item() == pytest.approx(scales[name])
    assert lm.lm_head.weight is lm.model.embed_tokens.weight or not lm.config.tie_word_embeddings
    assert sum(isinstance(module, InputQuantizedLinear) for module in lm.modules()) == ACTIVATION_SITES - 4
    assert not torch.equal(quantized, unquantized)
    x = torch.randn(3, lm.lm_head.in_features, generator=torch.Generator().manual_seed(1))
    fp8_x = torch.ops.ce_export.fake_quantize_fp8(x, lm.lm_head.input_scale)
    assert torch.equal(lm.lm_head(x), old["lm_head"](fp8_x)) and not torch.equal(fp8_x, x)


@pytest.mark.parametrize("args,message", [
    (["--quantize", "fp8-w8a8", "--calib", "missing.txt"], "calibration data file does not exist"),
])
def test_unsupported_combinations_are_refused_in_one_line(args, message, tmp_path, capsys):
    code = main(["build", "demo", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_groups_rows_shorter_than_a_group_form_one_and_other_sizes_are_refused():
    from ce_export.errors import ExportError
    from ce_export.quantize import quantize_weight

    q, scale, _ = quantize_weight(torch.randn(3, 64), "int4-g128")  # the demo's down projection: 64 inputs
    assert scale.shape == (3, 1) and q.abs().amax(-1).eq(7).all()
    _, scale, _ = quantize_weight(torch.randn(3, 256), "int4-g128")
    assert scale.shape == (3, 2)
    with pytest.raises(ExportError, match="w has 192 inputs per row, not a multiple of the group size 128"):
        quantize_weight(torch.randn(3, 192), "int4-g128", name="w")


def test_docs_state_every_mode_against_its_dtypes_threshold():
    text = (ROOT / "docs" / "quantization.md").read_text()
    section = text.split("<!-- generated: quantization-modes -->")[1].split("<!-- end generated -->")[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", section, flags=re.M)}
    assert set(rows) == set(QUANTIZATIONS)
    for mode in QUANTIZATIONS:
        for dtype in ("fp32", "fp16", "bf16"):
            tolerance = verify.TOLERANCES[dtype]
            assert f"{dtype} {tolerance.statistic} " in rows[mode], (mode, dtype)


def two_quantizers_with_equal_scales() -> onnx.ModelProto:
    """x -> Q/DQ(scale of site a) -> Q/DQ(scale of site b), the two scales equal in value."""
    zero = numpy_helper.from_array(np.zeros((), dtype=ml_dtypes.float8_e4m3fn), "zero")
    scales = [numpy_helper.from_array(np.array(0.0125, dtype=np.float32), f"lm.{site}.input_scale") for site in "ab"]
    nodes = []
    for index, site in enumerate("ab"):
        source = "x" if index == 0 else "y0"
        nodes += [helper.make_node("QuantizeLinear", [source, f"lm.{site}.input_scale", "zero"], [f"q{index}"]),
                  helper.make_node("DequantizeLinear", [f"q{index}", f"lm.{site}.input_scale", "zero"], [f"d{index}"]),
                  helper.make_node("Relu", [f"d{index}"], [f"y{index}"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, [4])], [zero, *scales])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_each_fp8_quantizer_keeps_its_own_scale_through_the_optimizer():
    import onnx_ir as ir

    from ce_export import export

    model = ir.from_proto(two_quantizers_with_equal_scales())
    export.optimize(model, {})
    scale_of = {node.outputs[0].name: node.inputs[1].name for node in model.graph
                if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert scale_of == {"q0": "lm.a.input_scale", "d0": "lm.a.input_scale",
                        "q1": "lm.b.input_scale", "d1": "lm.b.input_scale"}


def test_synchronized_parity_refuses_quantizers_sharing_one_sites_scale():
    import onnx_ir as ir

    from ce_export.synchronized import SynchronizedPair

    proto = two_quantizers_with_equal_scales()
    for node in proto.graph.node:  # what the optimizer alone makes of it: site b's quantizer on a's scale
        node.input[:] = [name.replace("lm.b.", "lm.a.") for name in node.input]
    with pytest.raises(VerifyError, match=r"^model.onnx: two FP8 quantizers use the scale of a: "):
        SynchronizedPair(ir.from_proto(proto), reference_lm=None, path="model.onnx")
