"""What keeps a GPU run honest, checked without a GPU: the CUDA op says when it runs the reference
instead of the kernels (or refuses, in strict mode), an ONNX Runtime session that did not get the
provider its row is labelled with fails, the export respects what the installed onnxruntime loads
and computes correctly, and the kernels' tile tables are picked per dtype and shared memory."""

from __future__ import annotations

import inspect
import sys
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ce_export import moe_math, ops, ort_support, runners

# ---------------------------------------------------------------- the CUDA op's fallback


def small_layer(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(5, 16, generator=gen).to(dtype), torch.randn(5, 4, generator=gen),
            (0.3 * torch.randn(4, 24, 16, generator=gen)).to(dtype), (0.3 * torch.randn(4, 16, 12, generator=gen)).to(dtype))


@pytest.fixture
def fresh_reports(monkeypatch):
    monkeypatch.setattr(ops, "_reported", set())
    monkeypatch.delenv(ops.STRICT_ENV, raising=False)


def test_cuda_op_warns_once_when_it_runs_the_reference(fresh_reports, monkeypatch):
    """The CUDA implementation, called on CPU tensors with the kernels made unimportable."""
    monkeypatch.setitem(sys.modules, "ce_kernels", None)
    hidden, logits, gate_up, down = small_layer()
    with pytest.warns(ops.KernelFallbackWarning, match="cannot be imported"):
        out = ops._moe_cuda(hidden, logits, gate_up, down, None, 2, 0, False)
    torch.testing.assert_close(out, moe_math.moe_reference(hidden, logits, gate_up, down, None, 2, 0, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops._moe_cuda(hidden, logits, gate_up, down, None, 2, 0, False)  # same reason: reported once


def test_strict_mode_raises_instead_of_running_the_reference(fresh_reports, monkeypatch):
    monkeypatch.setitem(sys.modules, "ce_kernels", None)
    hidden, logits, gate_up, down = small_layer()
    with ops.strict_kernels(), pytest.raises(ops.FallbackError, match="not the Triton kernels"):
        ops._moe_cuda(hidden, logits, gate_up, down, None, 2, 0, False)
    monkeypatch.setenv(ops.STRICT_ENV, "1")
    with pytest.raises(ops.FallbackError):
        ops._moe_cuda(hidden, logits, gate_up, down, None, 2, 0, False)
    with ops.reference_math():  # asking for the reference is not a fallback
        ops._moe_cuda(hidden, logits, gate_up, down, None, 2, 0, False)


def test_reasons_the_kernels_cannot_run():
    hidden, _, gate_up, down = small_layer()
    assert "mixed dtypes" in ops.why_not_kernels(hidden, gate_up.half(), down)
    assert "float64" in ops.why_not_kernels(hidden.double(), gate_up.double(), down.double())


# ---------------------------------------------------------------- ONNX Runtime provider labels


def identity_model(path, ir_version=None):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=ir_version or ort_support.max_ir_version())
    onnx.save(model, path)
    return path


def test_ort_row_labelled_cuda_fails_on_a_session_that_got_the_cpu_provider(tmp_path):
    """onnxruntime without CUDA (this machine) starts a CUDA-requested session on the CPU provider."""
    path = identity_model(tmp_path / "identity.onnx")
    with pytest.raises(runners.ProviderError, match="did not give the session CUDAExecutionProvider"):
        runners.OrtRunner(path, torch.device("cuda"))
    assert runners.OrtRunner(path, torch.device("cpu")).session.get_providers() == ["CPUExecutionProvider"]


# ---------------------------------------------------------------- onnxruntime versions


def test_com_microsoft_moe_gate_by_version_and_dtype():
    assert "1.30" in ort_support.moe_lowering_blocker("fp32", (1, 30))
    assert ort_support.moe_lowering_blocker("fp32", (1, 31)) is not None  # not checked: counts as wrong
    assert ort_support.moe_lowering_blocker("fp32", (1, 32)) is None
    assert ort_support.moe_lowering_blocker("fp16", (1, 30)) is None


def test_ir_version_is_what_the_installed_runtime_loads(tmp_path, monkeypatch):
    supported = ort_support.max_ir_version()
    assert supported is not None and supported >= 10
    import onnxruntime as ort

    ort.InferenceSession(str(identity_model(tmp_path / "m.onnx", supported)), providers=["CPUExecutionProvider"])
    if supported < onnx.IR_VERSION:
        with pytest.raises(Exception, match="IR version"):
            ort.InferenceSession(str(identity_model(tmp_path / "new.onnx", supported + 1)),
                                 providers=["CPUExecutionProvider"])
    monkeypatch.setattr(ort_support, "max_ir_version", lambda: 13)  # onnxruntime 1.30
    assert ort_support.ir_version_for_runtime(14, {"": 21}) == 13
    assert ort_support.ir_version_for_runtime(10, {"": 20}) == 10
    monkeypatch.setattr(ort_support, "max_ir_version", lambda: 9)
    assert ort_support.ir_version_for_runtime(14, {"": 21}) == 10  # opset 21 needs IR 10: not lowered below it


def test_ort_target_keeps_function_bodies_where_onnxruntime_computes_moe_wrongly(tmp_path, monkeypatch):
    from architectures import save_tiny
    from ce_export import pipeline

    monkeypatch.setattr(ort_support, "installed_version", lambda: (1, 30))
    folder = save_tiny("olmoe", tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="computes com.microsoft::MoE wrongly in fp32"):
        manifest = pipeline.build(str(folder), tmp_path / "build", pipeline.BuildOptions(target="ort", verify=False),
                                  report=lambda line: None)
    # The function bodies: exact on every onnxruntime (tests/test_export.py checks their parity).
    assert {node.domain for node in manifest.onnx.moe_nodes} == {"ce_export"}


def test_cuda_op_hands_the_kernels_every_argument_but_weights_on_input(monkeypatch):
    """What the CUDA implementation passes to fused_moe, by name (on CPU tensors, fused_moe replaced)."""
    import ce_kernels

    received = {}
    monkeypatch.setattr(ce_kernels, "fused_moe", lambda **arguments: received.update(arguments) or arguments["hidden"])
    hidden, logits, gate_up, down = small_layer()
    ops._moe_cuda(hidden, logits, gate_up, down, None, 2, 0, False, routing_scale=2.5, swiglu_limit=7.0)
    expected = [name for name in inspect.signature(moe_math.moe_reference).parameters if name != "weights_on_input"]
    assert list(received) == expected
    assert (received["routing_scale"], received["swiglu_limit"], received["top_k"]) == (2.5, 7.0, 2)
