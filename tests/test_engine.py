"""`--target trt` -> TensorRT engine (ce_export/engine.py).

TensorRT-RTX (pip `tensorrt-rtx`) parses and builds on a machine with no GPU, without plugin
layers: the plugin-less engine, MoE nodes inlined from their ONNX function bodies. The plugin
engine needs full TensorRT, a GPU and our plugin library; that test skips elsewhere.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import onnx
import pytest

from ce_export.artifacts import MANIFEST, read_json
from ce_export.engine import (DECODE, PLAN, PLUGIN_LIBRARY_ENV, PLUGIN_NAMESPACE, PLUGIN_VERSION, PREFILL,
                              build_engine, default_plugin_library, load_tensorrt, profile_axes, profile_shapes)
from ce_export.errors import BuildError
from ce_export.io_schema import onnx_io
from ce_export.manifest import Manifest
from checkpoints import trt_demo



def trt_demo_engine(tmp_path_factory, lines: list[str] | None = None) -> tuple[Path, dict]:
    """trt_demo plus its plugin-less engine, recorded in manifest["engine"] as the CLI does; the record as written."""
    folder = trt_demo(tmp_path_factory)
    manifest = Manifest.read(folder)
    if manifest.engine is None or not (folder / PLAN).is_file():
        _, flavour = load_tensorrt()
        # TensorRT-RTX has no plugin layers: a library given to it is recorded, never loaded.
        library = "/nonexistent/libce_export_trt.so" if flavour == "tensorrt_rtx" else None
        manifest.with_engine(build_engine(folder, plugin_library=library, report=(
            lines.append if lines is not None else lambda line: None))).write(folder)
    return folder, read_json(folder / MANIFEST)["engine"]


@pytest.fixture(scope="module")
def tensorrt_available():
    try:
        load_tensorrt()
    except BuildError as error:
        pytest.skip(f"no TensorRT builder: {error}")


def test_moe_nodes_carry_plugin_attributes(tmp_path_factory):
    folder = trt_demo(tmp_path_factory)
    manifest = read_json(folder / MANIFEST)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    moe = [node for node in model.graph.node if node.domain == PLUGIN_NAMESPACE]
    assert len(moe) == manifest["model"]["num_layers"] == len(manifest["onnx"]["moe_nodes"]) == 4
    functions = {(f.domain, f.name) for f in model.functions}
    for node in moe:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert attributes["plugin_version"] == PLUGIN_VERSION.encode()
        assert {"top_k", "n_ce", "norm_topk_prob"} <= attributes.keys()
        assert node.op_type == "CompressedMoE" and (node.domain, node.op_type) in functions
    assert [n.name for n in moe] == [entry["name"] for entry in manifest["onnx"]["moe_nodes"]]


def test_profiles_cover_prefill_and_decode():
    axes = profile_axes(max_batch=64, max_seq=4096, max_context=4096)
    assert list(axes) == [PREFILL, DECODE]
    assert axes[PREFILL] == {"batch": (1, 1, 64), "sequence": (1, 512, 4096), "past_sequence": (0, 0, 0),
                             "total_sequence": (1, 512, 4096)}
    assert axes[DECODE] == {"batch": (1, 8, 64), "sequence": (1, 1, 1), "past_sequence": (0, 512, 4096),
                            "total_sequence": (1, 513, 4097)}
    small = profile_axes(max_batch=2, max_seq=16, max_context=32)
    assert small[PREFILL]["sequence"] == (1, 16, 16) and small[DECODE]["past_sequence"] == (0, 32, 32)
    assert small[DECODE]["batch"] == (1, 2, 2)


def test_profile_shapes_follow_the_graph_inputs(tmp_path_factory):
    folder = trt_demo(tmp_path_factory)
    inputs, outputs = onnx_io(folder / "model.onnx")
    manifest = read_json(folder / MANIFEST)
    assert [s.name for s in inputs] == manifest["onnx"]["inputs"]
    assert [s.name for s in outputs] == manifest["onnx"]["outputs"]
    past = next(s for s in inputs if s.name == "past_key_values.3.value")
    heads, head_dim = past.dims[1], past.dims[3]
    assert isinstance(heads, int) and isinstance(head_dim, int) and past.dims[0] == "batch"
    decode = profile_shapes(inputs, profile_axes(4, 64, 1024)[DECODE])
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode["attention_mask"] == ((1, 1), (4, 513), (4, 1025))
    assert decode["past_key_values.3.value"] == ((1, heads, 0, head_dim), (4, heads, 512, head_dim),
                                                 (4, heads, 1024, head_dim))
    prefill = profile_shapes(inputs, profile_axes(4, 64, 128)[PREFILL])
    assert prefill["position_ids"] == ((1, 1), (1, 64), (4, 64))
    assert prefill["past_key_values.0.key"][2] == (4, heads, 0, head_dim)


def test_plugin_less_engine_builds_with_both_profiles(tmp_path_factory, tensorrt_available):
    lines: list[str] = []
    folder, result = trt_demo_engine(tmp_path_factory, lines)
    trt, flavour = load_tensorrt()
    plan = folder / PLAN
    assert plan.is_file() and plan.stat().st_size == result["plan_bytes"] > 0
    assert not list(folder.glob(".*partial*"))
    assert result["runtime"].startswith(flavour + " ") and result["runtime_version"] == trt.__version__
    assert result["strongly_typed"] is True
    assert result["plugin"]["bound"] is False and "inlined" in result["plugin"]["reason"]
    assert result["moe_nodes"] == {"count": 4, "plugin_layers": 0, "bound": 0, "inlined": 4}
    assert result["num_optimization_profiles"] == 2
    assert [p["name"] for p in result["profiles"]] == [PREFILL, DECODE]
    decode = result["profiles"][1]["axes"]
    assert decode["past_sequence"] == [0, 128, 128] and decode["sequence"] == [1, 1, 1]
    assert result["limits"] == {"max_batch": 4, "max_sequence": 64, "max_context": 128}
    assert 0 < result["build_seconds"] < 60
    if lines:  # built in this test (not reused): progress was reported
        assert any("building the engine" in line for line in lines)
        if hasattr(trt, "IProgressMonitor"):
            assert any("Building engine" in line and "done in" in line for line in lines)


def test_limits_above_the_export_are_refused(tmp_path_factory, tensorrt_available):
    folder = trt_demo(tmp_path_factory)
    with pytest.raises(BuildError, match="max_context 4096 exceeds the export limit 128"):
        build_engine(folder, max_context=4096, report=lambda line: None)


def test_parse_error_names_the_node(tmp_path_factory, tmp_path, tensorrt_available):
    """A MoE node without its function body (and no plugin) cannot be parsed: one line naming the node."""
    folder = trt_demo(tmp_path_factory)
    shutil.copy(folder / MANIFEST, tmp_path / MANIFEST)
    model = onnx.load(str(folder / "model.onnx"))
    del model.functions[:]
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(BuildError) as caught:
        build_engine(tmp_path, report=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message
    assert "/model/layers.0/mlp/CompressedMoE" in message and "cannot parse" in message
    assert not (tmp_path / PLAN).exists()


def _plugin_library() -> Path | None:
    library = default_plugin_library()
    return library if library is not None and library.is_file() else None


def test_plugin_engine_binds_every_moe_node(tmp_path_factory, tmp_path):
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        pytest.skip("full TensorRT (`import tensorrt`) is not installed: only TensorRT-RTX, which has no plugin "
                    "layers (TensorRT's libs wheels are only on NVIDIA's index)")
    if not hasattr(trt, "Builder"):
        pytest.skip("`tensorrt` is installed without its libraries (no Builder)")
    library = _plugin_library()
    if library is None:
        pytest.skip(f"no plugin library: set {PLUGIN_LIBRARY_ENV} or build plugins/trt (libce_export_trt.so)")
    folder = trt_demo(tmp_path_factory)
    for name in (MANIFEST, "model.onnx"):
        shutil.copy(folder / name, tmp_path / name)
    result = build_engine(tmp_path, plugin_library=library, report=lambda line: None)
    assert result.plugin.bound is True and result.plugin.library == str(library)
    assert result.moe_nodes.bound == result.moe_nodes.count == 4
    assert result.moe_nodes.inlined == 0 and result.moe_nodes.plugin_layers >= 4
    assert (tmp_path / PLAN).stat().st_size == result.plan_bytes
